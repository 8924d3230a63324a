import type { Graph, Value } from '../ir.js';
import { add, additiveMask, compare, concat, gather, matmul, mul, range, reshape, slice, softmax, sub, transpose, unary, dimOf } from './basic.js';

/**
 * Transformer building blocks. Each has a plain-TS reference in kernels/reference/transformer.ts and a test
 * (test/kernels/ops.test.ts) that runs the ONNX emission on onnxruntime and compares.
 */

/** Token embedding: table [vocab, hidden] (float32 or float16) gathered by ids [batch, seq]. */
export function embedding(g: Graph, table: Value, ids: Value): Value {
  const rows = gather(g, table, ids, 0, 'embed'); // [batch, seq, hidden]
  if (table.dtype === 'float32') return rows;
  return g.op1('Cast', [rows], { dtype: 'float32', shape: rows.shape }, { to: 1 }, undefined, 'embed_f32');
}

/** RMSNorm over the last axis: x / sqrt(mean(x^2) + eps) * w (ORT's fused SimplifiedLayerNormalization). */
export function rmsNorm(g: Graph, x: Value, weight: Value, eps: number): Value {
  return g.op1('SimplifiedLayerNormalization', [x, weight], { dtype: 'float32', shape: x.shape }, { axis: -1, epsilon: { float: eps } }, undefined, 'rmsnorm');
}

/** LayerNorm over the last axis with weight and bias (opset 17 LayerNormalization). */
export function layerNorm(g: Graph, x: Value, weight: Value, bias: Value, eps: number): Value {
  return g.op1('LayerNormalization', [x, weight, bias], { dtype: 'float32', shape: x.shape }, { axis: -1, epsilon: { float: eps } }, undefined, 'layernorm');
}

/**
 * Rotary position embedding, Hugging Face rotate-half layout.
 * x [batch, seq, heads, headDim]; cos/sin [batch, seq, 1, headDim/2] (already gathered at the positions).
 */
export function rotary(g: Graph, x: Value, cos: Value, sin: Value, headDim: number): Value {
  const half = headDim / 2;
  const x1 = slice(g, x, -1, 0, half, 'rope_x1');
  const x2 = slice(g, x, -1, half, headDim, 'rope_x2');
  const lo = sub(g, mul(g, x1, cos), mul(g, x2, sin), 'rope_lo');
  const hi = add(g, mul(g, x2, cos), mul(g, x1, sin), 'rope_hi');
  return concat(g, [lo, hi], -1, 'rope');
}

/** cos/sin tables [maxPositions, headDim/2] for rotary, computed in float64 then rounded (as HF does in float32). */
export function rotaryTables(maxPositions: number, headDim: number, theta: number): { cos: Float32Array; sin: Float32Array } {
  const half = headDim / 2;
  const cos = new Float32Array(maxPositions * half);
  const sin = new Float32Array(maxPositions * half);
  for (let i = 0; i < half; i++) {
    const invFreq = Math.fround(1 / Math.pow(theta, (2 * i) / headDim));
    for (let p = 0; p < maxPositions; p++) {
      const angle = Math.fround(p * invFreq);
      cos[p * half + i] = Math.cos(angle);
      sin[p * half + i] = Math.sin(angle);
    }
  }
  return { cos, sin };
}

/**
 * Masks shared by every layer of one step.
 * pastKeep [batch, 1, 1, 1, past]: row b may attend cached position t < pastLen[b];
 * newMask [seq, seq]: causal within the new tokens.
 */
export interface AttentionMasks {
  past: Value;
  causal: Value;
}

export function attentionMasks(g: Graph, pastLen: Value /* [batch] int64 */, pastKey: Value /* [past, rows, kvDim] */, ids: Value /* [batch, seq] */): AttentionMasks {
  const pastPositions = reshape(g, range(g, dimOf(g, pastKey, 0, 'past_len_max'), 'past_positions'), [1, -1]); // [1, past]
  const keepPast = compare(g, 'Less', pastPositions, reshape(g, pastLen, [-1, 1], 'past_len_col'), 'past_keep'); // [batch, past]
  const past = reshape(g, additiveMask(g, keepPast, 'past_mask2d'), [0, 1, 1, 1, -1], 'past_mask'); // [batch,1,1,1,past]
  const seqPositions = range(g, dimOf(g, ids, 1, 'seq_len'), 'seq_positions'); // [seq]
  const keepCausal = compare(g, 'LessOrEqual', reshape(g, seqPositions, [1, -1], 'key_pos'), reshape(g, seqPositions, [-1, 1], 'query_pos'), 'causal_keep');
  const causal = additiveMask(g, keepCausal, 'causal_mask'); // [seq, seq]
  return { past, causal };
}

export interface AttentionDims {
  numHeads: number;
  numKvHeads: number;
  headDim: number;
}

/**
 * Attention of new tokens over a time-major KV cache plus themselves, without copying the cache out.
 * q [batch, seq, heads*headDim], k/v [batch, seq, kvHeads*headDim] (rotary already applied);
 * pastK/pastV [past, rows, kvHeads*headDim] are views of the caller's cache; kvRows [batch] picks each
 * batch row's cache row. Grouped-query: head h reads kv head floor(h / (heads/kvHeads)).
 * Returns [batch, seq, heads*headDim].
 */
export function cachedAttention(g: Graph, dims: AttentionDims, q: Value, k: Value, v: Value, pastK: Value, pastV: Value, kvRows: Value, masks: AttentionMasks): Value {
  const { numHeads, numKvHeads, headDim } = dims;
  const group = numHeads / numKvHeads;
  const scaledQ = mul(g, q, g.scalar(1 / Math.sqrt(headDim)), 'q_scaled');
  // [batch, seq, kvHeads, group, headDim] -> [batch, kvHeads, group, seq, headDim]
  const q5 = transpose(g, reshape(g, scaledQ, [0, 0, numKvHeads, group, headDim], 'q5'), [0, 2, 3, 1, 4], 'q_t');
  // Past keys [past, batch, kvHeads, headDim] -> [batch, kvHeads, 1, headDim, past]
  const pk = reshape(g, gather(g, pastK, kvRows, 1, 'past_k_rows'), [0, 0, numKvHeads, 1, headDim], 'past_k5');
  const pkT = transpose(g, pk, [1, 2, 3, 4, 0], 'past_k_t');
  const pv = reshape(g, gather(g, pastV, kvRows, 1, 'past_v_rows'), [0, 0, numKvHeads, 1, headDim], 'past_v5');
  const pvT = transpose(g, pv, [1, 2, 3, 0, 4], 'past_v_t'); // [batch, kvHeads, 1, past, headDim]
  const k5 = reshape(g, k, [0, 0, numKvHeads, 1, headDim], 'k5');
  const kT = transpose(g, k5, [0, 2, 3, 4, 1], 'k_t'); // [batch, kvHeads, 1, headDim, seq]
  const vT = transpose(g, reshape(g, v, [0, 0, numKvHeads, 1, headDim], 'v5'), [0, 2, 3, 1, 4], 'v_t'); // [batch, kvHeads, 1, seq, headDim]

  const scoresPast = add(g, matmul(g, q5, pkT, 'scores_past'), masks.past, 'scores_past_masked'); // [b, kvh, grp, seq, past]
  const scoresNew = add(g, matmul(g, q5, kT, 'scores_new'), masks.causal, 'scores_new_masked'); // [b, kvh, grp, seq, seq]
  const probs = softmax(g, concat(g, [scoresPast, scoresNew], -1, 'scores'), -1, 'probs');
  const pastCount = dimOf(g, pastK, 0, 'past_count');
  // Split the probabilities back at `past` (a runtime size) with Slice on the last axis.
  const big = g.ints([Number.MAX_SAFE_INTEGER]);
  const zero = g.ints([0]);
  const lastAxis = g.ints([-1]);
  const probsPast = g.op1('Slice', [probs, zero, pastCount, lastAxis], { dtype: 'float32', shape: ['?'] }, undefined, undefined, 'probs_past');
  const probsNew = g.op1('Slice', [probs, pastCount, big, lastAxis], { dtype: 'float32', shape: ['?'] }, undefined, undefined, 'probs_new');
  const out = add(g, matmul(g, probsPast, pvT, 'ctx_past'), matmul(g, probsNew, vT, 'ctx_new'), 'ctx'); // [b, kvh, grp, seq, hd]
  return reshape(g, transpose(g, out, [0, 3, 1, 2, 4], 'ctx_t'), [0, 0, numHeads * headDim], 'attn_out');
}

/** SwiGLU: silu(gate) * up. */
export function swiglu(g: Graph, gate: Value, up: Value): Value {
  return mul(g, mul(g, gate, unary(g, 'Sigmoid', gate, 'gate_sigmoid'), 'silu'), up, 'swiglu');
}

/** GELU, tanh approximation ('gelu_new') or exact erf form ('gelu'), opset-20 Gelu. */
export function gelu(g: Graph, x: Value, approximate: 'tanh' | 'none'): Value {
  return g.op1('Gelu', [x], { dtype: 'float32', shape: x.shape }, { approximate }, undefined, 'gelu');
}

/**
 * Per-row LoRA delta from pooled adapter tensors: rows pick their adapter by slot (slot 0 is all zeros).
 * The pools are rank-major, poolA [rank, slots, in] and poolB [rank, slots, out] (scale folded into B), so the
 * caller can feed only the first `rank` planes, the largest rank in the step, as one contiguous view.
 * x [batch, seq, in]; slot [batch]; rowScale [batch, 1, 1] multiplies each row's delta (a request's
 * adapter_scale) and is applied to the small [batch, seq, rank] intermediate.
 */
export function loraDelta(g: Graph, x: Value, poolA: Value, poolB: Value, slot: Value, rowScale: Value): Value {
  const a = transpose(g, gather(g, poolA, slot, 1, 'lora_a_rows'), [1, 2, 0], 'lora_a_sel'); // [batch, in, rank]
  const b = transpose(g, gather(g, poolB, slot, 1, 'lora_b_rows'), [1, 0, 2], 'lora_b_sel'); // [batch, rank, out]
  const xa = mul(g, matmul(g, x, a, 'lora_xa'), rowScale, 'lora_xa_scaled'); // [batch, seq, rank]
  return matmul(g, xa, b, 'lora_delta');
}
