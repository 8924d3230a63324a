import { createHash } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { writeOnnxModel } from '../../kernels/onnx.js';
import { writeDirAtomic } from '../files/atomic-dir.js';
import type { QuantOptions } from '../../kernels/quant/index.js';
import { buildServingGraph, type ServingLayout } from '../models/graph.js';
import { quantizedLinear } from '../models/linear.js';
import { contentKey, loadModelDir } from '../models/load.js';
import { f32ToF16Bits } from '../models/safetensors.js';
import type { ModelSpec } from '../models/spec.js';

/** Bump whenever the serving graph or a codec changes what it writes: old cache entries are then ignored. */
export const ENGINE_VERSION = 'loraplex-engine-6';

export interface CompileOptions {
  quant: QuantOptions;
  /** Where quantized graphs are cached (one folder per key). */
  cacheDir: string;
}

export interface CompiledModel {
  modelDir: string;
  modelPath: string;
  spec: ModelSpec;
  layout: ServingLayout;
  notes: string[];
  /** Cache key: model content + quantization settings + engine version. */
  key: string;
  /** True when the graph came from the cache (no quantization ran). */
  cached: boolean;
  seconds: number;
}

interface CacheMeta {
  engineVersion: string;
  spec: ModelSpec;
  layout: ServingLayout;
  notes: string[];
  quant: QuantOptions;
}

function toFp16(data: Float32Array): Uint16Array {
  const out = new Uint16Array(data.length);
  for (let i = 0; i < data.length; i++) out[i] = f32ToF16Bits(data[i]!);
  return out;
}

/** Canonical quant settings so equivalent option objects share one cache entry. */
function quantKeyPart(q: QuantOptions): string {
  return JSON.stringify({ kind: q.kind, blockSize: q.blockSize ?? null, symmetric: q.symmetric ?? true, accuracyLevel: q.accuracyLevel ?? 0 });
}

/**
 * Quantizes a Hugging Face model directory into the serving graph, or reuses the cached result.
 * The cache entry is written to a temporary folder and renamed into place, so a crash never leaves a torn entry.
 */
export function compileModel(modelDir: string, opts: CompileOptions): CompiledModel {
  const t0 = performance.now();
  const { spec, weights, notes } = loadModelDir(modelDir);
  const key = createHash('sha256').update(`${contentKey(modelDir)}\n${quantKeyPart(opts.quant)}\n${ENGINE_VERSION}`).digest('hex').slice(0, 32);
  const entry = join(opts.cacheDir, key);
  const metaPath = join(entry, 'meta.json');
  if (existsSync(metaPath)) {
    const meta = JSON.parse(readFileSync(metaPath, 'utf8')) as CacheMeta;
    // Entries written before LoRA modules recorded their base norms are recomputed, not used without them.
    if (meta.engineVersion === ENGINE_VERSION && meta.layout.loraModules.every((m) => typeof m.baseNorm === 'number')) {
      return { modelDir, modelPath: join(entry, 'model.onnx'), spec: meta.spec, layout: meta.layout, notes: meta.notes, key, cached: true, seconds: (performance.now() - t0) / 1000 };
    }
  }
  const { graph, layout } = buildServingGraph(spec, weights, {
    linear: quantizedLinear(opts.quant),
    embeddingFp16: opts.quant.kind !== 'none',
    toFp16,
  });
  try {
    // An entry of an older engine version is replaced.
    writeDirAtomic(
      entry,
      (tmp) => {
        writeOnnxModel(graph.toOnnx(), tmp, 'model');
        const meta: CacheMeta = { engineVersion: ENGINE_VERSION, spec, layout, notes, quant: opts.quant };
        writeFileSync(join(tmp, 'meta.json'), JSON.stringify(meta));
      },
      { replace: true },
    );
  } catch (e) {
    if (!existsSync(metaPath)) throw e;
    // Another process finished the same entry first; use theirs.
  }
  return { modelDir, modelPath: join(entry, 'model.onnx'), spec, layout, notes, key, cached: false, seconds: (performance.now() - t0) / 1000 };
}
