import { parseArgs, type ParseArgsConfig } from 'node:util';
import { UsageError } from '../config/usage-error.js';

type Options = NonNullable<ParseArgsConfig['options']>;

/** parseArgs with one clear message for unknown or malformed flags. */
export function parse(args: string[], options: Options): Record<string, string | boolean | undefined> {
  try {
    return parseArgs({ args, options, strict: true, allowPositionals: false }).values as Record<string, string | boolean | undefined>;
  } catch (e) {
    throw new UsageError(e instanceof Error ? e.message : String(e));
  }
}

/** A numeric flag, checked against a range; the message names the flag and the limit. */
export function num(values: Record<string, unknown>, flag: string, def: number, opts: { min?: number; max?: number; integer?: boolean; minExclusive?: boolean } = {}): number {
  const raw = values[flag];
  if (raw === undefined) return def;
  const v = Number(raw);
  const { min, max, integer, minExclusive } = opts;
  const bad =
    !Number.isFinite(v) ||
    (integer && !Number.isInteger(v)) ||
    (min !== undefined && (minExclusive ? v <= min : v < min)) ||
    (max !== undefined && v > max);
  if (bad) {
    const range = `${min !== undefined ? (minExclusive ? `> ${min}` : `>= ${min}`) : ''}${min !== undefined && max !== undefined ? ' and ' : ''}${max !== undefined ? `<= ${max}` : ''}`;
    throw new UsageError(`--${flag} ${String(raw)}: must be ${integer ? 'an integer' : 'a number'}${range ? ` ${range}` : ''}`);
  }
  return v;
}

export function str<T extends string>(values: Record<string, unknown>, flag: string, def: T, allowed?: readonly T[]): T {
  const raw = values[flag];
  if (raw === undefined) return def;
  if (allowed && !allowed.includes(raw as T)) throw new UsageError(`--${flag} ${String(raw)}: must be one of ${allowed.join(', ')}`);
  return raw as T;
}
