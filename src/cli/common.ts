import { availableParallelism } from 'node:os';
import type { QuantKind, QuantOptions } from '../../kernels/quant/index.js';
import { compileModel, type CompiledModel } from '../engine/compile.js';
import { Engine } from '../engine/engine.js';
import { loadTokenizer, type Tokenizer } from '../tokenizer/index.js';
import { cacheDirDefault, QUANT_KINDS } from '../config/schema.js';
import { num, str } from './args.js';

export const QUANT_FLAG_KINDS: readonly QuantKind[] = QUANT_KINDS;

/** Flags shared by every command that runs the model (`serve` reads its settings from src/config instead). */
export const engineFlags = {
  model: { type: 'string' },
  quant: { type: 'string' },
  'block-size': { type: 'string' },
  'accuracy-level': { type: 'string' },
  asymmetric: { type: 'boolean' },
  threads: { type: 'string' },
  'cache-dir': { type: 'string' },
  'max-model-len': { type: 'string' },
  'max-num-seqs': { type: 'string' },
  'max-loras': { type: 'string' },
  'max-lora-rank': { type: 'string' },
  'prefill-chunk': { type: 'string' },
  'allow-spinning': { type: 'boolean' },
} as const;

export interface EngineSettings {
  modelDir: string;
  quant: QuantOptions;
  threads: number;
  cacheDir: string;
  maxModelLen: number | null;
  maxNumSeqs: number;
  maxLoras: number;
  maxLoraRank: number;
  prefillChunk: number;
  allowSpinning: boolean;
  /** onnxruntime execution provider; default cpu. */
  executionProvider?: 'cpu' | 'cuda';
}

export function defaultCacheDir(): string {
  return process.env['LORAPLEX_CACHE_DIR'] || cacheDirDefault(process.env);
}

export function engineSettings(v: Record<string, unknown>, modelDir: string): EngineSettings {
  const kind = str(v, 'quant', 'int4', QUANT_FLAG_KINDS);
  const quant: QuantOptions = { kind };
  if (kind !== 'none') quant.blockSize = num(v, 'block-size', kind === 'nf4' ? 64 : 32, { integer: true, min: 16, max: 256 });
  if (kind === 'int4' || kind === 'int8') {
    quant.accuracyLevel = num(v, 'accuracy-level', 4, { integer: true, min: 0, max: 4 });
    quant.symmetric = !v['asymmetric'];
  }
  return {
    modelDir,
    quant,
    threads: num(v, 'threads', Math.min(2, availableParallelism()), { integer: true, min: 1, max: 256 }),
    cacheDir: typeof v['cache-dir'] === 'string' ? v['cache-dir'] : defaultCacheDir(),
    maxModelLen: v['max-model-len'] === undefined ? null : num(v, 'max-model-len', 0, { integer: true, min: 2, max: 1 << 20 }),
    maxNumSeqs: num(v, 'max-num-seqs', 8, { integer: true, min: 1, max: 1024 }),
    maxLoras: num(v, 'max-loras', 4, { integer: true, min: 1, max: 256 }),
    maxLoraRank: num(v, 'max-lora-rank', 16, { integer: true, min: 1, max: 1024 }),
    prefillChunk: num(v, 'prefill-chunk', 64, { integer: true, min: 1, max: 1 << 16 }),
    allowSpinning: Boolean(v['allow-spinning']),
  };
}

export interface LoadedEngine {
  engine: Engine;
  compiled: CompiledModel;
  tokenizer: Tokenizer;
  maxModelLen: number;
  /** Seconds from the start of loading until the engine accepted steps. */
  startSeconds: number;
}

/** Quantizes (or reuses the cache), starts the engine worker and loads the tokenizer. */
export async function startEngine(s: EngineSettings): Promise<LoadedEngine> {
  const t0 = performance.now();
  const compiled = compileModel(s.modelDir, { quant: s.quant, cacheDir: s.cacheDir });
  const maxModelLen = Math.min(s.maxModelLen ?? compiled.spec.maxPositions, compiled.spec.maxPositions);
  const [engine, tokenizer] = await Promise.all([
    Engine.start({
      modelPath: compiled.modelPath,
      layout: compiled.layout,
      maxNumSeqs: s.maxNumSeqs,
      maxModelLen,
      slots: s.maxLoras + 1,
      maxLoraRank: s.maxLoraRank,
      intraOpThreads: s.threads,
      executionProviders: [s.executionProvider ?? 'cpu'],
      allowSpinning: s.allowSpinning,
    }),
    loadTokenizer(s.modelDir),
  ]);
  return { engine, compiled, tokenizer, maxModelLen, startSeconds: (performance.now() - t0) / 1000 };
}
