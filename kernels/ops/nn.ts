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
 * Per-step attention context shared by every layer. The window of a batch row is its cache blocks laid end to
 * end: kvBlocks [batch, nblocks] names blocks of a pool [numBlocks, blockLen, kvDim] (the caller pads short rows
 * with an all-zero block), so window = nblocks * blockLen covers every row's past + new tokens.
 * mask [batch, 1, 1, seq, window]: new token s of row b sees positions t <= positions[b, s] (causal, its own
 * past and earlier new tokens); everything after, padding and stale data included, is -inf.
 * scatterIndices [batch, seq, 2]: (b, positions[b, s]) where the new keys/values go in the window.
 */
export interface AttentionContext {
  mask: Value;
  scatterIndices: Value;
}

/**
 * Cache blocks hold this many positions, and windows are whole blocks. Every row's real keys form a prefix of
 * the window and the rest is masked to exact zeros, so with whole blocks the float reductions over the window
 * (softmax sums, probs @ V) see the same values in the same SIMD lanes whatever the batch's longest row is:
 * a request computes the same logits alone and in a mixed batch.
 */
export const ATTENTION_BLOCK = 64;

export function attentionContext(g: Graph, positions: Value /* [batch, seq] int64 */, kvBlocks: Value /* [batch, nblocks] int64 */, pool: Value /* [numBlocks, blockLen, kvDim] */): AttentionContext {
  const windowLen = mul(g, dimOf(g, kvBlocks, 1, 'block_count'), dimOf(g, pool, 1, 'block_len'), 'window_len');
  const window = range(g, windowLen, 'window_positions'); // [window]
  const keep = compare(g, 'LessOrEqual', reshape(g, window, [1, 1, -1], 'window_row'), g.op1('Unsqueeze', [positions, g.ints([2])], { dtype: 'int64', shape: ['batch', 'seq', 1] }, undefined, undefined, 'positions_col'), 'attn_keep'); // [batch, seq, window]
  const mask = g.op1('Unsqueeze', [additiveMask(g, keep, 'attn_mask3d'), g.ints([1, 2])], { dtype: 'float32', shape: ['batch', 1, 1, 'seq', 'window'] }, undefined, undefined, 'attn_mask');
  // Row index of every new token, [batch, seq]: 0..batch-1 broadcast over seq.
  const zeroPositions = mul(g, positions, g.constant('zero_i64_scalar', 'int64', [], new BigInt64Array([0n])), 'zero_positions');
  const rowIds = add(g, zeroPositions, reshape(g, range(g, dimOf(g, positions, 0, 'batch_len'), 'batch_range'), [-1, 1], 'row_col'), 'row_ids');
  const scatterIndices = concat(g, [g.op1('Unsqueeze', [rowIds, g.ints([2])], { dtype: 'int64', shape: ['batch', 'seq', 1] }, undefined, undefined, 'row_idx'), g.op1('Unsqueeze', [positions, g.ints([2])], { dtype: 'int64', shape: ['batch', 'seq', 1] }, undefined, undefined, 'pos_idx')], -1, 'scatter_indices');
  return { mask, scatterIndices };
}

export interface AttentionDims {
  numHeads: number;
  numKvHeads: number;
  headDim: number;
}

/**
 * Attention of new tokens over a block-paged KV cache, without copying the cache in or out through the binding.
 * q [batch, seq, heads*headDim], k/v [batch, seq, kvHeads*headDim] (rotary applied); poolK/poolV
 * [numBlocks, blockLen, kvDim] are the caller's block pools as they are; kvBlocks [batch, nblocks] is each
 * row's block table. Each row's blocks are gathered into its window and the new keys/values scattered in at
 * their positions, so real keys always form a prefix (see ATTENTION_BLOCK). Grouped-query: head h reads kv
 * head floor(h / (heads/kvHeads)). Returns [batch, seq, heads*headDim].
 */
export function cachedAttention(g: Graph, dims: AttentionDims, q: Value, k: Value, v: Value, poolK: Value, poolV: Value, kvBlocks: Value, ctx: AttentionContext): Value {
  const { numHeads, numKvHeads, headDim } = dims;
  const group = numHeads / numKvHeads;
  const scaledQ = mul(g, q, g.scalar(1 / Math.sqrt(headDim)), 'q_scaled');
  // [batch, seq, kvHeads, group, headDim] -> [batch, kvHeads, group, seq, headDim]
  const q5 = transpose(g, reshape(g, scaledQ, [0, 0, numKvHeads, group, headDim], 'q5'), [0, 2, 3, 1, 4], 'q_t');
  const windowOf = (pool: Value, fresh: Value, name: string) => {
    const blocks = gather(g, pool, kvBlocks, 0, `${name}_blocks`); // [batch, nblocks, blockLen, kvDim]
    const rows = reshape(g, blocks, [0, -1, numKvHeads * headDim], `${name}_by_row`); // [batch, window, kvDim]
    const full = g.op1('ScatterND', [rows, ctx.scatterIndices, fresh], { dtype: 'float32', shape: ['batch', 'window', numKvHeads * headDim] }, undefined, undefined, `${name}_window`);
    return reshape(g, full, [0, 0, numKvHeads, 1, headDim], `${name}5`); // [batch, window, kvHeads, 1, headDim]
  };
  const kT = transpose(g, windowOf(poolK, k, 'k'), [0, 2, 3, 4, 1], 'k_t'); // [batch, kvHeads, 1, headDim, window]
  const vT = transpose(g, windowOf(poolV, v, 'v'), [0, 2, 3, 1, 4], 'v_t'); // [batch, kvHeads, 1, window, headDim]
  const scores = add(g, matmul(g, q5, kT, 'scores'), ctx.mask, 'scores_masked'); // [batch, kvHeads, group, seq, window]
  const out = matmul(g, softmax(g, scores, -1, 'probs'), vT, 'ctx'); // [batch, kvHeads, group, seq, headDim]
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
 * Pools are slot-major in PEFT's layout, poolA [slots, rank, in] and poolB [slots, out, rank], so loading an
 * adapter is a plain copy; the transposes below fold into onnxruntime's FusedMatMul (no copy).
 * x [batch, seq, in]; slot [batch]; rowScale [batch, 1, 1] (the adapter's lora_alpha / r times the request's
 * adapter_scale) is applied to the small [batch, seq, rank] intermediate.
 */
export function loraDelta(g: Graph, x: Value, poolA: Value, poolB: Value, slot: Value, rowScale: Value): Value {
  const a = transpose(g, gather(g, poolA, slot, 0, 'lora_a_rows'), [0, 2, 1], 'lora_a_t'); // [batch, in, rank]
  const b = transpose(g, gather(g, poolB, slot, 0, 'lora_b_rows'), [0, 2, 1], 'lora_b_t'); // [batch, rank, out]
  const xa = mul(g, matmul(g, x, a, 'lora_xa'), rowScale, 'lora_xa_scaled'); // [batch, seq, rank]
  return matmul(g, xa, b, 'lora_delta');
}

/**
 * Plain causal self-attention over one sequence batch (training: no cache). q [batch, seq, heads*headDim],
 * k/v [batch, seq, kvHeads*headDim] (rotary applied); causal [seq, seq] additive mask. Grouped-query heads
 * broadcast in the matmuls, so their gradients sum back over the group.
 */
export function causalAttention(g: Graph, dims: AttentionDims, q: Value, k: Value, v: Value, causal: Value): Value {
  const { numHeads, numKvHeads, headDim } = dims;
  const group = numHeads / numKvHeads;
  const scaledQ = mul(g, q, g.scalar(1 / Math.sqrt(headDim)), 'q_scaled');
  const q5 = transpose(g, reshape(g, scaledQ, [0, 0, numKvHeads, group, headDim], 'q5'), [0, 2, 3, 1, 4], 'q_t'); // [b, kvh, grp, s, hd]
  const kT = transpose(g, reshape(g, k, [0, 0, numKvHeads, 1, headDim], 'k5'), [0, 2, 3, 4, 1], 'k_t'); // [b, kvh, 1, hd, s]
  const vT = transpose(g, reshape(g, v, [0, 0, numKvHeads, 1, headDim], 'v5'), [0, 2, 3, 1, 4], 'v_t'); // [b, kvh, 1, s, hd]
  const probs = softmax(g, add(g, matmul(g, q5, kT, 'scores'), causal, 'scores_masked'), -1, 'probs');
  const out = matmul(g, probs, vT, 'ctx'); // [b, kvh, grp, s, hd]
  return reshape(g, transpose(g, out, [0, 3, 1, 2, 4], 'ctx_t'), [0, 0, numHeads * headDim], 'attn_out');
}

/** Additive causal mask [seq, seq] for a batch of ids [batch, seq]. */
export function causalMask(g: Graph, ids: Value): Value {
  const positions = range(g, dimOf(g, ids, 1, 'seq_len'), 'seq_positions');
  const keep = compare(g, 'LessOrEqual', reshape(g, positions, [1, -1], 'key_pos'), reshape(g, positions, [-1, 1], 'query_pos'), 'causal_keep');
  return additiveMask(g, keep, 'causal_mask');
}
