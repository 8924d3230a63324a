import type { QuantOptions } from '../../kernels/quant/index.js';
import type { EngineSettings } from '../config/server-config.js';
import { cacheDirDefault, defaultBlockSize, defaultOf, QUANT_KINDS, SETTINGS_BY_NAME, type Setting } from '../config/schema.js';
import { num, str } from './args.js';

/** The serve settings that commands running the model (`generate`) take as flags, with serve's defaults and bounds. */
const ENGINE_FLAG_SETTINGS = ['model', 'quant', 'blockSize', 'accuracyLevel', 'asymmetric', 'threads', 'cacheDir', 'maxModelLen', 'maxNumSeqs', 'maxLoras', 'maxLoraRank', 'prefillChunk', 'allowSpinning'] as const;

const schemaSetting = (name: string): Setting => SETTINGS_BY_NAME.get(name)!;
const flagName = (s: Setting) => s.flag.slice('--'.length);

/** Flags shared by every command that runs the model (`serve` reads its settings from src/config instead). */
export const engineFlags = Object.fromEntries(
  ENGINE_FLAG_SETTINGS.map((name) => [flagName(schemaSetting(name)), { type: schemaSetting(name).type === 'bool' ? 'boolean' : 'string' } as const]),
);

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

export function engineSettings(v: Record<string, unknown>, modelDir: string): EngineSettings {
  const kind = str(v, 'quant', defaultOf(schemaSetting('quant'), process.env) as QuantOptions['kind'], QUANT_KINDS);
  const quant: QuantOptions = { kind };
  if (kind !== 'none') quant.blockSize = numericFlag(v, 'blockSize', defaultBlockSize(kind));
  if (kind === 'int4' || kind === 'int8') {
    quant.accuracyLevel = numericSetting(v, 'accuracyLevel');
    quant.symmetric = !v['asymmetric'];
  }
  return {
    modelDir,
    quant,
    threads: numericSetting(v, 'threads'),
    cacheDir: typeof v['cache-dir'] === 'string' ? v['cache-dir'] : defaultCacheDir(),
    maxModelLen: v['max-model-len'] === undefined ? null : numericFlag(v, 'maxModelLen', 0),
    maxNumSeqs: numericSetting(v, 'maxNumSeqs'),
    maxLoras: numericSetting(v, 'maxLoras'),
    maxLoraRank: numericSetting(v, 'maxLoraRank'),
    prefillChunk: numericSetting(v, 'prefillChunk'),
    allowSpinning: Boolean(v['allow-spinning']),
  };
}
