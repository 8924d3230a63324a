import { Graph, type Dim, type Value } from '../../kernels/ir.js';
import { add, dimOf, matmul, mul, range, reshape, transpose } from '../../kernels/ops/basic.js';
import { causalAttention, causalMask } from '../../kernels/ops/nn.js';
import { quantizeLinear, storedLinearRows, type QuantizedLinear, type StoredLinears } from '../../kernels/quant/index.js';
import { storedSlice, type OnnxDataType } from '../../kernels/onnx.js';
import { lmHeadQuantOptions, type ModelQuant } from './linear.js';
import { dequantizedOnTape, dequantizedWeight, gradients, quantizedLinearOp, stopGradient } from '../../kernels/autodiff.js';
import type { ModelSpec, WeightSource } from './spec.js';
import { f32ArrayToF16Bits } from './safetensors.js';
import type { LoraModuleShape } from './lora.js';
import { constantOf, familyOf, type LinearWeight } from './families/index.js';

/**
 * The training graph: the forward pass of the frozen 4-bit base (the same codec and bytes as serving, dequantized
 * layer by layer; dX through DequantizeLinear + MatMul), LoRA on the targeted modules as graph INPUTS in PEFT layout, cross-entropy over the
 * non-ignored labels, and the backward pass for the LoRA parameters only.
 *
 * Inputs:  input_ids [batch, seq] int64, labels [batch, seq] int64 (-100 = ignored),
 *          lora_a.M [r, in], lora_b.M [out, r] float32 for each trained module M.
 * Outputs: loss (scalar), grad_a.M / grad_b.M (same shapes as the inputs).
 */
export interface TrainGraphOptions {
  quant: ModelQuant;
  modules: LoraModuleShape[];
  r: number;
  /** lora_alpha / r (or / sqrt(r) with rsLoRA). */
  scaling: number;
  /** PEFT's lora_dropout on the LoRA branch's input; 0 = none. */
  dropout?: number;
  /** Seeds the dropout masks (one stream per module). */
  seed?: number;
  /**
   * Gradient checkpointing (default on): the backward pass recomputes each decoder layer from its saved input
   * instead of keeping the forward's activations (attention's [heads, seq, seq] included). The output head never
   * keeps its logits either way: it takes its gradient in the forward pass, chunk by chunk (headLoss).
   */
  checkpointing?: boolean;
  /**
   * The frozen linears' forward as DequantizeLinear + sgemm (default) rather than MatMulNBits: the session then
   * holds no prepacked copy of the 4-bit weights, only the mapped bytes dX reads anyway.
   */
  dequantizedForward?: boolean;
  /** The longest sequence the graph will see (default: the model's context); sizes the head's chunking. */
  maxSeqLength?: number;
}

/** Tokens per row in one chunk of the output head: [batch, 128, vocab] float32 logits at a time. */
const HEAD_CHUNK_TOKENS = 128;

/** Labels that are not counted (PEFT / Hugging Face's -100). */
const IGNORE_INDEX = -100;

interface Ctx {
  g: Graph;
  opts: TrainGraphOptions;
  trained: Map<string, LoraModuleShape>;
  params: { module: string; a: Value; b: Value }[];
  /** train_mode input (bool scalar): dropout is active only while training, not for eval. */
  trainMode: Value | null;
  stored: StoredLinears | null;
}

/** Where a linear's rows lie in the served graph: its own tensors, or a range of a packed group's (q/k/v, gate/up). */
interface ServedRows {
  prefix: string;
  rowStart: number;
  totalRows: number;
}

/** The frozen weight: the served graph's bytes where they can be referred to, else quantized here from the model. */
function frozenWeight(c: Ctx, l: LinearWeight, at: ServedRows): QuantizedLinear {
  const [N, K] = l.shape;
  const q = c.stored && storedLinearRows(c.stored, c.opts.quant, at.prefix, at.totalRows, K, at.rowStart, N, l.module);
  return q || quantizeLinear(l.weight().data, N, K, c.opts.quant, l.module);
}

/** base(x) through the frozen quantized weight, plus scaling * (x A^T) B^T when the module is trained. */
function linear(c: Ctx, x: Value, l: LinearWeight, at: ServedRows = { prefix: l.module, rowStart: 0, totalRows: l.shape[0] }): Value {
  const { module, bias } = l;
  const [N, K] = l.shape;
  let y = quantizedLinearOp(c.g, x, frozenWeight(c, l, at), undefined, { dequantized: c.opts.dequantizedForward !== false });
  if (bias) y = add(c.g, y, c.g.constant(`${module}.bias`, 'float32', [N], bias.data), `${module}.biased`);
  const m = c.trained.get(module);
  if (!m) return y;
  const a = c.g.input(`lora_a.${module}`, 'float32', [c.opts.r, K]);
  const b = c.g.input(`lora_b.${module}`, 'float32', [N, c.opts.r]);
  c.params.push({ module, a, b });
  let xin = x;
  const p = c.opts.dropout ?? 0;
  if (p > 0 && c.trainMode) {
    // PEFT applies dropout to the LoRA branch's input only. Masks come from onnxruntime's generator, seeded per
    // module: a run is repeatable in one session (a resumed run draws new masks from its checkpoint on).
    const seed = ((c.opts.seed ?? 0) * 1000003 + c.params.length * 7919) % 2147483647;
    xin = c.g.op('Dropout', [x, c.g.scalar(p), c.trainMode], { attrs: { seed }, outputs: [{ dtype: 'float32', shape: x.shape }, { dtype: 'bool', shape: x.shape }] }, 'lora_dropout')[0]!;
  }
  const xa = matmul(c.g, xin, transpose(c.g, a, [1, 0], 'lora_a_t'), 'lora_xa'); // [batch, seq, r]
  const delta = matmul(c.g, mul(c.g, xa, c.g.scalar(c.opts.scaling), 'lora_xa_scaled'), transpose(c.g, b, [1, 0], 'lora_b_t'), 'lora_delta');
  return add(c.g, y, delta, `${module}.out`);
}

/**
 * Mean cross-entropy through the output head, with its gradient w.r.t. the final hidden states computed in the same
 * pass (the loss is the graph's end, so d loss / d logits is known as soon as the logits are): per chunk of
 * HEAD_CHUNK_TOKENS positions, logits = h W^T, loss, dlogits = (softmax - onehot(label)) / tokens, dh = dlogits W.
 * The head thus runs two matmuls per chunk, not three (forward, recompute, dX), each chunk's [batch, chunk, vocab]
 * lives only inside it, and the float head is dequantized once, after the body. Chunks past the end of a shorter
 * sequence are empty.
 */
function headLoss(g: Graph, hidden: Value, labels: Value, lmHead: QuantizedLinear, count: number): { loss: Value; dHidden: Value } {
  g.scope = 'lm_head.';
  const H = hidden.shape[2]!;
  const ignored = (y: Value, shape: Dim[]) => g.op1('Equal', [y, g.ints([IGNORE_INDEX])], { dtype: 'bool', shape }, undefined, undefined, 'ignored');
  const all = ignored(labels, labels.shape as Dim[]);
  const counted = g.op1('Cast', [g.op1('Not', [all], { dtype: 'bool', shape: labels.shape }, undefined, undefined, 'counted')], { dtype: 'float32', shape: labels.shape }, { to: 1 }, undefined, 'counted_f');
  // max(count, 1): a batch with every label ignored gives loss 0, not NaN.
  const denom = g.op1('Max', [g.op1('ReduceSum', [counted], { dtype: 'float32', shape: [] }, { keepdims: 0 }, undefined, 'token_count'), g.scalar(1)], { dtype: 'float32', shape: [] }, undefined, undefined, 'token_count_1');
  // [V, H] float, dequantized once the body is done (a float32 head is used in place: [H, V] weightT).
  const w = lmHead.kind === 'none' ? null : lmHead.kind === 'nf4' ? dequantizedWeight(g, lmHead, hidden) : dequantizedOnTape(g, hidden, lmHead);
  const weightT = lmHead.kind === 'none' ? g.addInitializer(lmHead.weightT) : null;
  const V = lmHead.N;
  const sums: Value[] = [];
  const dChunks: Value[] = [];
  for (let i = 0; i < count; i++) {
    g.scope = `lm_head.${i}.`;
    const bounds = [g.ints([i * HEAD_CHUNK_TOKENS]), g.ints([(i + 1) * HEAD_CHUNK_TOKENS]), g.ints([1])];
    const h = g.op1('Slice', [hidden, ...bounds], { dtype: 'float32', shape: ['batch', '?', H] }, undefined, undefined, 'hidden');
    const y = g.op1('Slice', [labels, ...bounds], { dtype: 'int64', shape: ['batch', '?'] }, undefined, undefined, 'labels');
    const h2 = reshape(g, h, [-1, H as number], 'rows');
    const y2 = reshape(g, y, [-1, 1], 'label_rows');
    const logits = w
      ? g.op1('Gemm', [h2, w], { dtype: 'float32', shape: ['?', V] }, { transB: 1 }, undefined, 'logits')
      : g.op1('MatMul', [h2, weightT!], { dtype: 'float32', shape: ['?', V] }, undefined, undefined, 'logits');
    const logp = g.op1('LogSoftmax', [logits], { dtype: 'float32', shape: ['?', V] }, { axis: -1 }, undefined, 'logp');
    const skip = ignored(y2, ['?', 1]);
    const safe = g.op1('Where', [skip, g.ints([0]), y2], { dtype: 'int64', shape: ['?', 1] }, undefined, undefined, 'label_safe');
    const weight = g.op1('Where', [skip, g.scalar(0), g.scalar(1)], { dtype: 'float32', shape: ['?', 1] }, undefined, undefined, 'label_weight');
    const picked = g.op1('GatherElements', [logp, safe], { dtype: 'float32', shape: ['?', 1] }, { axis: 1 }, undefined, 'label_logp');
    sums.push(g.op1('ReduceSum', [g.op1('Mul', [picked, weight], { dtype: 'float32', shape: ['?', 1] }, undefined, undefined, 'label_logp_w')], { dtype: 'float32', shape: [] }, { keepdims: 0 }, undefined, 'logp_sum'));
    // d(loss)/d(logits) = (softmax - onehot(label)) * weight / tokens: the label's column gets -weight added in
    // place (-1, or 0 on an ignored row, which the weight zeroes anyway).
    const p = g.op1('Exp', [logp], { dtype: 'float32', shape: ['?', V] }, undefined, undefined, 'p');
    const minusWeight = g.op1('Neg', [weight], { dtype: 'float32', shape: ['?', 1] }, undefined, undefined, 'minus_weight');
    const pMinusOnehot = g.op1('ScatterElements', [p, safe, minusWeight], { dtype: 'float32', shape: ['?', V] }, { axis: 1, reduction: 'add' }, undefined, 'p_minus_onehot');
    const dLogits = g.op1('Mul', [pMinusOnehot, g.op1('Div', [weight, denom], { dtype: 'float32', shape: ['?', 1] }, undefined, undefined, 'row_scale')], { dtype: 'float32', shape: ['?', V] }, undefined, undefined, 'dlogits');
    const dRows = w
      ? g.op1('MatMul', [dLogits, w], { dtype: 'float32', shape: ['?', H] }, undefined, undefined, 'd_rows')
      : g.op1('Gemm', [dLogits, weightT!], { dtype: 'float32', shape: ['?', H] }, { transB: 1 }, undefined, 'd_rows');
    // allowzero: an empty chunk's shape has a 0 that means 0, not "copy that dim".
    dChunks.push(g.op1('Reshape', [dRows, g.op1('Shape', [h], { dtype: 'int64', shape: [3] }, undefined, undefined, 'chunk_shape')], { dtype: 'float32', shape: h.shape }, { allowzero: 1 }, undefined, 'd_hidden'));
  }
  g.scope = 'lm_head.';
  const sum = (xs: Value[], hint: string) => (xs.length === 1 ? xs[0]! : g.op1('Sum', xs, { dtype: 'float32', shape: [] }, undefined, undefined, hint));
  const loss = g.op1('Neg', [g.op1('Div', [sum(sums, 'logp_total'), denom], { dtype: 'float32', shape: [] }, undefined, undefined, 'logp_mean')], { dtype: 'float32', shape: [] }, undefined, undefined, 'loss');
  const dHidden = dChunks.length === 1 ? dChunks[0]! : g.op1('Concat', dChunks, { dtype: 'float32', shape: hidden.shape }, { axis: 1 }, undefined, 'd_hidden');
  g.scope = '';
  return { loss, dHidden };
}

/**
 * The embedding table as served: float16 for a quantized base (half the memory; the same numbers), the served
 * graph's own tensor when there is one of that type and shape.
 */
function embeddingTable(g: Graph, weights: WeightSource, name: string, opts: TrainGraphOptions, stored: StoredLinears | null): Value {
  const dataType: OnnxDataType = opts.quant.kind === 'none' ? 'float32' : 'float16';
  const dims = weights.shape(name);
  const served = stored?.tensor('embed_table');
  if (served && served.dataType === dataType && served.dims.join(',') === dims.join(',')) {
    return g.addInitializer(storedSlice(served, 0, { name: 'embed_table', dataType, dims }, stored!.location));
  }
  const t = weights.get(name);
  return dataType === 'float32' ? constantOf(g, 'embed_table', t) : g.constant('embed_table', 'float16', dims, f32ArrayToF16Bits(t.data));
}

export interface TrainGraph {
  graph: Graph;
  params: { module: string; a: string; b: string; gradA: string; gradB: string }[];
}

/**
 * `stored`: the served graph's tensors (compile.ts's cache entry). The frozen linears, the embedding and the head
 * then refer to the served bytes instead of quantizing the model again; the model's files give only the small
 * tensors (norms, biases). The quantization must be the one the served graph was made with.
 */
export function buildTrainingGraph(spec: ModelSpec, weights: WeightSource, opts: TrainGraphOptions, stored: StoredLinears | null = null): TrainGraph {
  const g = new Graph(`loraplex_${spec.modelType}_train`);
  const ids = g.input('input_ids', 'int64', ['batch', 'seq']);
  const labels = g.input('labels', 'int64', ['batch', 'seq']);
  const trainMode = (opts.dropout ?? 0) > 0 ? g.input('train_mode', 'bool', []) : null;
  const c: Ctx = { g, opts, trained: new Map(opts.modules.map((m) => [m.module, m])), params: [], trainMode, stored };
  const layerInputs: Value[] = [];
  const causal = causalMask(g, ids);
  const family = familyOf(spec);
  const hidden = family.body(
    {
      g,
      spec,
      w: weights,
      // Packed training sequences always start at position 0.  [1, seq]
      positions: reshape(g, range(g, dimOf(g, ids, 1, 'seq_len'), 'positions'), [1, -1], 'positions_row'),
      // As served: a quantized base keeps its embedding in float16 (half the memory; the same numbers).
      embeddingTable: (name) => embeddingTable(g, weights, name, opts, stored),
      linear: (x, l) => linear(c, x, l),
      // Training has no packed kernels: each part is its own quantized linear (the same rows, the same bytes).
      packedLinear: (x, packedName, parts) => {
        const totalRows = parts.reduce((n, l) => n + l.shape[0], 0);
        let rowStart = 0;
        return parts.map((l) => {
          const y = linear(c, x, l, { prefix: packedName, rowStart, totalRows });
          rowStart += l.shape[0];
          return y;
        });
      },
      attention: (_layer, q, k, v, heads) => causalAttention(g, heads, q, k, v, causal),
      layerInput: (_layer, h) => void layerInputs.push(h),
    },
    ids,
  );
  const headName = family.lmHeadWeight(spec, weights);
  const [V, H] = weights.shape(headName) as [number, number];
  const headQuant = lmHeadQuantOptions(opts.quant);
  const lmHead = (stored && storedLinearRows(stored, headQuant, 'lm_head', V, H, 0, V, 'lm_head')) || quantizeLinear(weights.get(headName).data, V, H, headQuant, 'lm_head');
  const head = headLoss(g, hidden, labels, lmHead, Math.ceil((opts.maxSeqLength ?? spec.maxPositions) / HEAD_CHUNK_TOKENS));
  g.output(head.loss, 'loss', []);
  // The backward starts from the head's gradient: sum(hidden * dHidden) has d/d hidden = dHidden.
  const surrogate = g.op1('ReduceSum', [mul(g, hidden, stopGradient(g, head.dHidden), 'head_surrogate_terms')], { dtype: 'float32', shape: [] }, { keepdims: 0 }, undefined, 'head_surrogate');
  const checkpoints = opts.checkpointing === false ? [] : layerInputs.map((start, l) => ({ start, end: layerInputs[l + 1] ?? hidden }));
  const grads = gradients(g, surrogate, c.params.flatMap((p) => [p.a, p.b]), { checkpoints });
  const params = c.params.map((p, i) => {
    g.output(grads[2 * i]!, `grad_a.${p.module}`, p.a.shape as (number | string)[]);
    g.output(grads[2 * i + 1]!, `grad_b.${p.module}`, p.b.shape as (number | string)[]);
    return { module: p.module, a: p.a.name, b: p.b.name, gradA: `grad_a.${p.module}`, gradB: `grad_b.${p.module}` };
  });
  return { graph: g, params };
}
