import type { EngineSettings } from '../config/server-config.js';
import { loadTokenizer, type Tokenizer } from '../tokenizer/index.js';
import { compileModel, type CompiledModel } from './compile.js';
import { Engine } from './engine.js';

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
      ...(s.exactBatches === false ? { exactBatches: false } : {}),
      ...(s.kvCacheBytes !== undefined ? { kvCacheBytes: s.kvCacheBytes } : {}),
    }),
    loadTokenizer(s.modelDir),
  ]);
  return { engine, compiled, tokenizer, maxModelLen, startSeconds: (performance.now() - t0) / 1000 };
}
