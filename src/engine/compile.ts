import { createHash } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { writeOnnxModel } from '../../kernels/onnx.js';
import { writeDirAtomic } from '../files/atomic-dir.js';
import { buildServingGraph, type ServingLayout } from '../models/graph.js';
import { lmHeadQuantOptions, quantizedLinear, type ModelQuant } from '../models/linear.js';
import { loadModelDir } from '../models/load.js';
import { f32ArrayToF16Bits } from '../models/safetensors.js';
import type { ModelSpec } from '../models/spec.js';
import { modelIdentity, resolveContentKey, type ContentKeyOptions } from './model-identity.js';

/** Bump whenever the serving graph or a codec changes what it writes: old cache entries are then ignored. */
export const ENGINE_VERSION = 'loraplex-engine-7';

export interface CompileOptions extends ContentKeyOptions {
  quant: ModelQuant;
  /** Where quantized graphs are cached (one folder per key; model file identities under identities/). */
  cacheDir: string;
}

export interface CompiledModel {
  modelDir: string;
  modelPath: string;
  spec: ModelSpec;
  layout: ServingLayout;
  notes: string[];
  /** Cache key: model content (see model-identity.ts) + quantization settings + engine version. */
  key: string;
  /** True when the graph came from the cache (no quantization ran). */
  cached: boolean;
  /** True when the weights were read to hash them: first start, or the model's files changed since. */
  contentHashed: boolean;
  seconds: number;
}

interface CacheMeta {
  engineVersion: string;
  spec: ModelSpec;
  layout: ServingLayout;
  notes: string[];
  quant: ModelQuant;
  /** sha256 of the model files the entry was built from (contentKey), for checking an entry by hand. */
  contentKey?: string;
}

/** Canonical quant settings so equivalent option objects share one cache entry. */
function quantKeyPart(q: ModelQuant): string {
  const head = lmHeadQuantOptions(q);
  return JSON.stringify({ kind: q.kind, blockSize: q.blockSize ?? null, symmetric: q.symmetric ?? true, accuracyLevel: q.accuracyLevel ?? 0, lmHead: head.kind });
}

/**
 * Quantizes a Hugging Face model directory into the serving graph, or reuses the cached result.
 * The cache entry is written to a temporary folder and renamed into place, so a crash never leaves a torn entry.
 */
export function compileModel(modelDir: string, opts: CompileOptions): CompiledModel {
  const t0 = performance.now();
  const { spec, weights, notes } = loadModelDir(modelDir);
  const content = resolveContentKey(modelDir, join(opts.cacheDir, 'identities'), opts);
  const key = createHash('sha256').update(`${content.contentKey}\n${quantKeyPart(opts.quant)}\n${ENGINE_VERSION}`).digest('hex').slice(0, 32);
  const entry = join(opts.cacheDir, key);
  const metaPath = join(entry, 'meta.json');
  if (existsSync(metaPath)) {
    const meta = JSON.parse(readFileSync(metaPath, 'utf8')) as CacheMeta;
    // Entries written before LoRA modules recorded their base norms are recomputed, not used without them.
    if (meta.engineVersion === ENGINE_VERSION && meta.layout.loraModules.every((m) => typeof m.baseNorm === 'number')) {
      return { modelDir, modelPath: join(entry, 'model.onnx'), spec: meta.spec, layout: meta.layout, notes: meta.notes, key, cached: true, contentHashed: content.hashed, seconds: (performance.now() - t0) / 1000 };
    }
  }
  const { graph, layout } = buildServingGraph(spec, weights, {
    linear: quantizedLinear(opts.quant),
    lmHeadLinear: quantizedLinear(lmHeadQuantOptions(opts.quant)),
    embeddingFp16: opts.quant.kind !== 'none',
    toFp16: f32ArrayToF16Bits,
  });
  // The weights were read once more while quantizing: an entry must hold exactly the content its key names.
  if (JSON.stringify(modelIdentity(modelDir)) !== JSON.stringify(content.identity)) {
    throw new Error(`the model files in ${modelDir} changed while they were quantized; start again once they are complete`);
  }
  try {
    // An entry of an older engine version is replaced.
    writeDirAtomic(
      entry,
      (tmp) => {
        writeOnnxModel(graph.toOnnx(), tmp, 'model');
        const meta: CacheMeta = { engineVersion: ENGINE_VERSION, spec, layout, notes, quant: opts.quant, contentKey: content.contentKey };
        writeFileSync(join(tmp, 'meta.json'), JSON.stringify(meta));
      },
      { replace: true },
    );
  } catch (e) {
    if (!existsSync(metaPath)) throw e;
    // Another process finished the same entry first; use theirs.
  }
  return { modelDir, modelPath: join(entry, 'model.onnx'), spec, layout, notes, key, cached: false, contentHashed: content.hashed, seconds: (performance.now() - t0) / 1000 };
}
