import { Graph, type Value } from '../../kernels/ir.js';
import { add, dimOf, matmul, mul, range, reshape, transpose } from '../../kernels/ops/basic.js';
import { causalAttention, causalMask } from '../../kernels/ops/nn.js';
import { quantizeLinear, type QuantizedLinear } from '../../kernels/quant/index.js';
import { lmHeadQuantOptions, type ModelQuant } from './linear.js';
import { gradients, quantizedLinearOp, type CheckpointSegment } from '../../kernels/autodiff.js';
import { crossEntropyLoss } from '../../kernels/ops/loss.js';
import type { ModelSpec, WeightSource } from './spec.js';
import type { LoraModuleShape } from './lora.js';
import { constantOf, familyOf, type LinearWeight } from './families/index.js';

/**
 * The training graph: the forward pass of the frozen 4-bit base (the same codec and bytes as serving; dX through
 * DequantizeLinear + MatMul), LoRA on the targeted modules as graph INPUTS in PEFT layout, cross-entropy over the
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
   * instead of keeping the forward's activations (attention's [heads, seq, seq] included). The output head's
   * chunks are recomputed either way: their logits are the largest activations and the cheapest to recompute.
   */
  checkpointing?: boolean;
  /** The longest sequence the graph will see (default: the model's context); sizes the head's chunking. */
  maxSeqLength?: number;
}

/** Tokens per row in one chunk of the output head: [batch, 128, vocab] float32 logits at a time. */
const HEAD_CHUNK_TOKENS = 128;

interface Ctx {
  g: Graph;
  opts: TrainGraphOptions;
  trained: Map<string, LoraModuleShape>;
  params: { module: string; a: Value; b: Value }[];
  /** train_mode input (bool scalar): dropout is active only while training, not for eval. */
  trainMode: Value | null;
}

/** base(x) through the frozen quantized weight, plus scaling * (x A^T) B^T when the module is trained. */
function linear(c: Ctx, x: Value, { module, weight: w, bias }: LinearWeight): Value {
  const [N, K] = w.shape as [number, number];
  let y = quantizedLinearOp(c.g, x, quantizeLinear(w.data, N, K, c.opts.quant, module));
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
 * Mean cross-entropy through the output head, HEAD_CHUNK_TOKENS positions at a time: each chunk's logits
 * [batch, chunk, vocab] live only while its own loss (and, checkpointed, its own backward) runs. Chunks past the
 * end of a shorter sequence are empty. Returns the loss and each chunk as a checkpoint segment.
 */
function headChunks(g: Graph, hidden: Value, labels: Value, lmHead: QuantizedLinear, count: number): { loss: Value; segments: CheckpointSegment[] } {
  const sums: Value[] = [];
  const counts: Value[] = [];
  const segments: CheckpointSegment[] = [];
  for (let i = 0; i < count; i++) {
    g.scope = `lm_head.${i}.`;
    const bounds = [g.ints([i * HEAD_CHUNK_TOKENS]), g.ints([(i + 1) * HEAD_CHUNK_TOKENS]), g.ints([1])];
    const h = g.op1('Slice', [hidden, ...bounds], { dtype: 'float32', shape: ['batch', '?', hidden.shape[2]!] }, undefined, undefined, 'hidden');
    const y = g.op1('Slice', [labels, ...bounds], { dtype: 'int64', shape: ['batch', '?'] }, undefined, undefined, 'labels');
    const ce = crossEntropyLoss(g, quantizedLinearOp(g, h, lmHead, 'logits'), y, { reduction: 'sum' });
    sums.push(ce.loss);
    counts.push(ce.tokenCount);
    segments.push({ start: h, end: ce.loss });
  }
  g.scope = '';
  const sum = (xs: Value[], hint: string) => (xs.length === 1 ? xs[0]! : g.op1('Sum', xs, { dtype: 'float32', shape: [] }, undefined, undefined, hint));
  // max(count, 1): a batch with every label ignored gives loss 0, not NaN.
  const denom = g.op1('Max', [sum(counts, 'token_count'), g.scalar(1)], { dtype: 'float32', shape: [] }, undefined, undefined, 'token_count_1');
  return { loss: g.op1('Div', [sum(sums, 'loss_sum'), denom], { dtype: 'float32', shape: [] }, undefined, undefined, 'loss_mean'), segments };
}

export interface TrainGraph {
  graph: Graph;
  params: { module: string; a: string; b: string; gradA: string; gradB: string }[];
}

export function buildTrainingGraph(spec: ModelSpec, weights: WeightSource, opts: TrainGraphOptions): TrainGraph {
  const g = new Graph(`loraplex_${spec.modelType}_train`);
  const ids = g.input('input_ids', 'int64', ['batch', 'seq']);
  const labels = g.input('labels', 'int64', ['batch', 'seq']);
  const trainMode = (opts.dropout ?? 0) > 0 ? g.input('train_mode', 'bool', []) : null;
  const c: Ctx = { g, opts, trained: new Map(opts.modules.map((m) => [m.module, m])), params: [], trainMode };
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
      embeddingTable: (name) => constantOf(g, 'embed_table', weights.get(name)),
      linear: (x, l) => linear(c, x, l),
      // Training has no packed kernels: each part is its own quantized linear (the same rows, the same bytes).
      packedLinear: (x, _packedName, parts) => parts.map((l) => linear(c, x, l)),
      attention: (_layer, q, k, v, heads) => causalAttention(g, heads, q, k, v, causal),
      layerInput: (_layer, h) => void layerInputs.push(h),
    },
    ids,
  );
  const head = weights.get(family.lmHeadWeight(spec, weights));
  const [V, H] = head.shape as [number, number];
  const lmHead = quantizeLinear(head.data, V, H, lmHeadQuantOptions(opts.quant), 'lm_head');
  const chunks = headChunks(g, hidden, labels, lmHead, Math.ceil((opts.maxSeqLength ?? spec.maxPositions) / HEAD_CHUNK_TOKENS));
  const loss = chunks.loss;
  g.output(loss, 'loss', []);
  const layers = opts.checkpointing === false ? [] : layerInputs.map((start, l) => ({ start, end: layerInputs[l + 1] ?? hidden }));
  const checkpoints = [...layers, ...chunks.segments];
  const grads = gradients(g, loss, c.params.flatMap((p) => [p.a, p.b]), { checkpoints });
  const params = c.params.map((p, i) => {
    g.output(grads[2 * i]!, `grad_a.${p.module}`, p.a.shape as (number | string)[]);
    g.output(grads[2 * i + 1]!, `grad_b.${p.module}`, p.b.shape as (number | string)[]);
    return { module: p.module, a: p.a.name, b: p.b.name, gradA: `grad_a.${p.module}`, gradB: `grad_b.${p.module}` };
  });
  return { graph: g, params };
}
