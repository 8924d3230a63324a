import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { QuantOptions } from '../../kernels/quant/index.js';
import { dequantizeLinear, quantizeLinear } from '../../kernels/quant/index.js';
import { compileModel, type CompiledModel } from '../../src/engine/compile.js';
import { Engine } from '../../src/engine/engine.js';
import { KvCache } from '../../src/engine/kv-cache.js';
import { f16ToF32, f32ToF16Bits } from '../../src/models/safetensors.js';
import { lmHeadQuantOptions, type ModelQuant } from '../../src/models/linear.js';
import type { HostTensor, ModelSpec, WeightSource } from '../../src/models/spec.js';

export const STORIES = new URL('../../../../shared/models/stories260K', import.meta.url).pathname;

export function tempDir(prefix: string): string {
  return mkdtempSync(join(tmpdir(), `loraplex-${prefix}-`));
}

export async function startTestEngine(modelDir: string, quant: ModelQuant, opts: { cacheDir?: string; maxNumSeqs?: number; maxLoras?: number; maxLoraRank?: number; maxModelLen?: number; kvBlocks?: number; exactBatches?: boolean } = {}): Promise<{ engine: Engine; compiled: CompiledModel }> {
  const compiled = compileModel(modelDir, { quant, cacheDir: opts.cacheDir ?? tempDir('cache') });
  const engine = await Engine.start({
    modelPath: compiled.modelPath,
    layout: compiled.layout,
    maxNumSeqs: opts.maxNumSeqs ?? 4,
    maxModelLen: opts.maxModelLen ?? Math.min(256, compiled.spec.maxPositions),
    slots: (opts.maxLoras ?? 2) + 1,
    maxLoraRank: opts.maxLoraRank ?? 8,
    intraOpThreads: 1,
    ...(opts.exactBatches !== undefined ? { exactBatches: opts.exactBatches } : {}),
    ...(opts.kvBlocks !== undefined ? { kvCacheBytes: opts.kvBlocks * KvCache.blockBytes(compiled.layout.numLayers, compiled.layout.kvDim) } : {}),
  });
  return { engine, compiled };
}

function isLinearWeight(spec: ModelSpec, name: string): boolean {
  if (spec.family === 'gpt2') return /\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$/.test(name);
  return /\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$/.test(name) || name === 'lm_head.weight';
}

export function fp16Round(t: HostTensor): HostTensor {
  const out = new Float32Array(t.data.length);
  f16ToF32(Uint16Array.from(t.data, (v) => f32ToF16Bits(v)), out);
  return { shape: t.shape, data: out };
}

function transpose2d(t: HostTensor): HostTensor {
  const [r, c] = t.shape as [number, number];
  const data = new Float32Array(r * c);
  for (let i = 0; i < r; i++) for (let j = 0; j < c; j++) data[j * r + i] = t.data[i * c + j]!;
  return { shape: [c, r], data };
}

/**
 * The weights the quantized serving graph really computes with: every linear weight quantized and dequantized
 * with the same codec, the embedding table rounded to float16 (as served), the lm_head untied so the reference
 * uses its copy dequantized with the head's codec (lmHeadQuant). The plain-TS reference forward over these is the ground truth for the 4-bit graph.
 */
export function servedWeights(spec: ModelSpec, source: WeightSource, quant: ModelQuant): { spec: ModelSpec; weights: Map<string, HostTensor> } {
  const map = new Map<string, HostTensor>();
  const dq = (w: HostTensor, q: QuantOptions = quant) => {
    const [N, K] = w.shape as [number, number];
    return q.kind === 'none' ? w : { shape: w.shape, data: dequantizeLinear(quantizeLinear(w.data, N, K, q, 'w')) };
  };
  for (const name of source.names()) {
    const t = source.get(name);
    if (quant.kind === 'none') map.set(name, t);
    else if (isLinearWeight(spec, name)) map.set(name, spec.family === 'gpt2' ? transpose2d(dq(transpose2d(t))) : dq(t));
    else if (name === 'model.embed_tokens.weight' || name === 'wte.weight') map.set(name, fp16Round(t));
    else map.set(name, t);
  }
  if (quant.kind === 'none') return { spec, weights: map };
  const headSource = spec.family === 'gpt2' ? 'wte.weight' : !spec.tieWordEmbeddings && source.has('lm_head.weight') ? 'lm_head.weight' : 'model.embed_tokens.weight';
  map.set('lm_head.weight', dq(source.get(headSource), lmHeadQuantOptions(quant)));
  return { spec: { ...spec, tieWordEmbeddings: false }, weights: map };
}
