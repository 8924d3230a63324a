import type { QuantOptions } from '../../kernels/quant/index.js';
import { LM_HEAD_QUANTS, type LmHeadQuant, type ModelQuant } from '../models/linear.js';
import type { EngineSettings } from '../config/server-config.js';
import { cacheDirDefault, defaultBlockSize, defaultOf, QUANT_KINDS, type Setting } from '../config/schema.js';
import { UsageError } from '../config/usage-error.js';
import { num, str } from './args.js';
import { schemaSetting, settingOptions } from './help.js';

/** The serve settings that commands running the model (`generate`) take as flags, with serve's defaults and bounds. */
const ENGINE_FLAG_SETTINGS = ['model', 'quant', 'blockSize', 'accuracyLevel', 'asymmetric', 'lmHeadQuant', 'threads', 'cacheDir', 'maxModelLen', 'maxNumSeqs', 'maxLoras', 'maxLoraRank', 'prefillChunk', 'allowSpinning'] as const;

const flagName = (s: Setting) => s.flag.slice('--'.length);

/** Options shared by every command that runs the model (`serve` reads its settings from src/config instead). */
export const engineOptions = settingOptions(ENGINE_FLAG_SETTINGS);

/** The title of the engine options in help. */
export const ENGINE_ABOUT = "Model and engine (loraplex serve's settings, same defaults and limits)";

export function defaultCacheDir(): string {
  return process.env['LORAPLEX_CACHE_DIR'] || cacheDirDefault(process.env);
}

/** A numeric flag checked against the schema's bounds (a short value list counts as its range). */
function numericFlag(v: Record<string, unknown>, name: string, def: number): number {
  const s = schemaSetting(name);
  const values = s.values as readonly number[] | undefined;
  const min = s.min ?? (values ? Math.min(...values) : undefined);
  const max = s.max ?? (values ? Math.max(...values) : undefined);
  return num(v, flagName(s), def, { integer: s.type === 'int', ...(min !== undefined ? { min } : {}), ...(max !== undefined ? { max } : {}) });
}

/** A numeric flag whose default is the schema's. */
const numericSetting = (v: Record<string, unknown>, name: string) => numericFlag(v, name, defaultOf(schemaSetting(name), process.env) as number);

/**
 * --quant, --block-size, --asymmetric (and --accuracy-level, unless `accuracyLevel` fixes it) as serve reads
 * them: schema defaults and bounds, and the same refusal of a setting the kind does not use.
 */
export function quantFromFlags(v: Record<string, unknown>, fixed: { accuracyLevel?: number } = {}): ModelQuant {
  const kind = str(v, 'quant', defaultOf(schemaSetting('quant'), process.env) as QuantOptions['kind'], QUANT_KINDS);
  const unused = (names: string[], why: string) => {
    const given = names.map(schemaSetting).find((s) => v[flagName(s)] !== undefined);
    if (given) throw new UsageError(`${given.flag}: ${why}, and --quant is ${kind}`);
  };
  const quant: ModelQuant = { kind };
  if (kind === 'none') unused(['blockSize', 'asymmetric', 'accuracyLevel', 'lmHeadQuant'], 'only applies to quantized weights');
  else {
    quant.blockSize = numericFlag(v, 'blockSize', defaultBlockSize(kind));
    quant.lmHead = str(v, 'lm-head-quant', defaultOf(schemaSetting('lmHeadQuant'), process.env) as LmHeadQuant, LM_HEAD_QUANTS);
  }
  if (kind === 'int4' || kind === 'int8') {
    quant.accuracyLevel = fixed.accuracyLevel ?? numericSetting(v, 'accuracyLevel');
    quant.symmetric = !v['asymmetric'];
  } else if (kind === 'nf4') unused(['asymmetric', 'accuracyLevel'], 'only applies to int4 and int8');
  return quant;
}

/** --threads with serve's default (min(2, CPUs)) and bounds. */
export const threadsFromFlags = (v: Record<string, unknown>): number => numericSetting(v, 'threads');

export function engineSettings(v: Record<string, unknown>, modelDir: string): EngineSettings {
  return {
    modelDir,
    quant: quantFromFlags(v),
    threads: threadsFromFlags(v),
    cacheDir: typeof v['cache-dir'] === 'string' ? v['cache-dir'] : defaultCacheDir(),
    maxModelLen: v['max-model-len'] === undefined ? null : numericFlag(v, 'maxModelLen', 0),
    maxNumSeqs: numericSetting(v, 'maxNumSeqs'),
    maxLoras: numericSetting(v, 'maxLoras'),
    maxLoraRank: numericSetting(v, 'maxLoraRank'),
    prefillChunk: numericSetting(v, 'prefillChunk'),
    allowSpinning: Boolean(v['allow-spinning']),
  };
}
