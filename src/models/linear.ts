import { emitLinear, quantizeLinear, resolvedQuantOptions, type QuantOptions } from '../../kernels/quant/index.js';
import { add } from '../../kernels/ops/basic.js';
import type { LinearEmitter } from './graph.js';

/** The serving graph's linear layers, quantized with one codec (int4 / nf4 / int8 / none). */
export function quantizedLinear(opts: QuantOptions): LinearEmitter {
  return (g, x, name, w, bias) => {
    const [N, K] = w.shape as [number, number];
    const q = quantizeLinear(w.data, N, K, opts, name);
    for (const t of q.tensors) g.addInitializer(t);
    const y = g.fresh(`${name}.y`);
    g.emit(emitLinear(q, x.name, y));
    const out = { name: y, dtype: 'float32' as const, shape: [...x.shape.slice(0, -1), N] };
    return bias ? add(g, out, g.constant(`${name}.bias`, 'float32', [N], bias.data), `${name}.biased`) : out;
  };
}

/** Codecs of the output head (lm_head): bitsandbytes QLoRA keeps it float, llama.cpp at 6 bits. */
export const LM_HEAD_QUANTS = ['none', 'int8', 'int4'] as const;
export type LmHeadQuant = (typeof LM_HEAD_QUANTS)[number];
export const DEFAULT_LM_HEAD_QUANT: LmHeadQuant = 'int8';

/** How a base model is quantized: the linear layers' codec, and the output head's. */
export interface ModelQuant extends QuantOptions {
  /** The head's codec [int8]; with kind none everything is float and this is not used. */
  lmHead?: LmHeadQuant;
}

/**
 * The codec of the output head. int8 and int4 are MatMulNBits with the body's block size, zero points and
 * accuracy level (int4 with an int4 body is the body's own codec); nf4 bodies have none of those: MatMulNBits'
 * defaults then (block 64, symmetric, float compute).
 */
export function lmHeadQuantOptions(q: ModelQuant): QuantOptions {
  const head = q.lmHead ?? DEFAULT_LM_HEAD_QUANT;
  if (q.kind === 'none' || head === 'none') return { kind: 'none' };
  const blockInt = q.kind === 'int4' || q.kind === 'int8';
  return {
    kind: head,
    ...(q.blockSize !== undefined ? { blockSize: q.blockSize } : {}),
    symmetric: blockInt ? (q.symmetric ?? true) : true,
    accuracyLevel: blockInt ? (q.accuracyLevel ?? 0) : 0,
  };
}

/**
 * Whether two quantizations store the same bytes (body and head): the accuracy level only changes how
 * MatMulNBits computes, so a training graph at level 0 can refer to a served graph's weights at level 4.
 */
export function sameStoredWeights(a: ModelQuant, b: ModelQuant): boolean {
  // The head's other settings follow the body's.
  const bytes = (q: ModelQuant) => {
    const { kind, blockSize, symmetric } = resolvedQuantOptions(q);
    return JSON.stringify({ kind, blockSize, symmetric, head: lmHeadQuantOptions(q).kind });
  };
  return bytes(a) === bytes(b);
}
