import { Graph, type Value } from '../../kernels/ir.js';
import { add, dimOf, gather, matmul, mul, range, reshape, transpose } from '../../kernels/ops/basic.js';
import { causalAttention, causalMask, embedding, gelu, layerNorm, rmsNorm, rotary, rotaryTables, swiglu } from '../../kernels/ops/nn.js';
import { quantizeLinear, type QuantOptions } from '../../kernels/quant/index.js';
import { gradients, quantizedLinearOp } from '../../kernels/autodiff.js';
import { crossEntropy } from '../../kernels/ops/loss.js';
import type { HostTensor, ModelSpec, WeightSource } from './spec.js';

/**
 * The training graph: the forward pass of the frozen 4-bit base (the same codec and bytes as serving; dX through
 * DequantizeLinear + MatMul), LoRA on the targeted modules as graph INPUTS in PEFT layout, cross-entropy over the
 * non-ignored labels, and the backward pass for the LoRA parameters only.
 *
 * Inputs:  input_ids [batch, seq] int64, labels [batch, seq] int64 (-100 = ignored),
 *          lora_a.M [r, in], lora_b.M [out, r] float32 for each trained module M.
 * Outputs: loss (scalar), grad_a.M / grad_b.M (same shapes as the inputs).
 */
export interface TrainModule {
  /** HF module path, e.g. 'model.layers.0.self_attn.q_proj'. */
  module: string;
  inFeatures: number;
  outFeatures: number;
}

export interface TrainGraphOptions {
  quant: QuantOptions;
  modules: TrainModule[];
  r: number;
  /** lora_alpha / r (or / sqrt(r) with rsLoRA). */
  scaling: number;
  /** PEFT's lora_dropout on the LoRA branch's input; 0 = none. */
  dropout?: number;
  /** Seeds the dropout masks (one stream per module). */
  seed?: number;
}

interface Ctx {
  g: Graph;
  spec: ModelSpec;
  w: WeightSource;
  opts: TrainGraphOptions;
  trained: Map<string, TrainModule>;
  params: { module: string; a: Value; b: Value }[];
  /** train_mode input (bool scalar): dropout is active only while training, not for eval. */
  trainMode: Value | null;
}

function constantOf(g: Graph, hint: string, t: HostTensor): Value {
  return g.constant(hint, 'float32', t.shape, t.data);
}

function transposed(t: HostTensor): HostTensor {
  const [rows, cols] = t.shape as [number, number];
  const data = new Float32Array(rows * cols);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) data[c * rows + r] = t.data[r * cols + c]!;
  return { shape: [cols, rows], data };
}

/** base(x) through the frozen quantized weight, plus scaling * (x A^T) B^T when the module is trained. */
function linear(c: Ctx, x: Value, module: string, w: HostTensor, bias: HostTensor | null): Value {
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

/** Positions 0..seq-1 as [1, seq]: packed training sequences always start at position 0. */
function positionsRow(g: Graph, ids: Value): Value {
  return reshape(g, range(g, dimOf(g, ids, 1, 'seq_len'), 'positions'), [1, -1], 'positions_row');
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
  const c: Ctx = { g, spec, w: weights, opts, trained: new Map(opts.modules.map((m) => [m.module, m])), params: [], trainMode };
  const causal = causalMask(g, ids);
  const hidden = spec.family === 'gpt2' ? gpt2Body(c, ids, causal) : llamaBody(c, ids, causal);
  g.scope = 'lm_head.';
  const headName = spec.family === 'gpt2' ? 'wte.weight' : !spec.tieWordEmbeddings && weights.has('lm_head.weight') ? 'lm_head.weight' : 'model.embed_tokens.weight';
  const head = weights.get(headName);
  const [V, H] = head.shape as [number, number];
  const logits = quantizedLinearOp(g, hidden, quantizeLinear(head.data, V, H, opts.quant, 'lm_head'));
  g.scope = '';
  const loss = crossEntropy(g, logits, labels);
  g.output(loss, 'loss', []);
  const grads = gradients(g, loss, c.params.flatMap((p) => [p.a, p.b]));
  const params = c.params.map((p, i) => {
    g.output(grads[2 * i]!, `grad_a.${p.module}`, p.a.shape as (number | string)[]);
    g.output(grads[2 * i + 1]!, `grad_b.${p.module}`, p.b.shape as (number | string)[]);
    return { module: p.module, a: p.a.name, b: p.b.name, gradA: `grad_a.${p.module}`, gradB: `grad_b.${p.module}` };
  });
  return { graph: g, params };
}

function llamaBody(c: Ctx, ids: Value, causal: Value): Value {
  const { g, spec, w } = c;
  const { numHeads, numKvHeads, headDim } = spec;
  let h = embedding(g, constantOf(g, 'embed_table', w.get('model.embed_tokens.weight')), ids);
  const tables = rotaryTables(spec.maxPositions, headDim, spec.ropeTheta);
  const positions = positionsRow(g, ids);
  const cos = reshape(g, gather(g, g.constant('rope_cos', 'float32', [spec.maxPositions, headDim / 2], tables.cos), positions, 0, 'cos_rows'), [0, 0, 1, headDim / 2], 'cos');
  const sin = reshape(g, gather(g, g.constant('rope_sin', 'float32', [spec.maxPositions, headDim / 2], tables.sin), positions, 0, 'sin_rows'), [0, 0, 1, headDim / 2], 'sin');
  for (let l = 0; l < spec.numLayers; l++) {
    const p = `model.layers.${l}`;
    g.scope = `l${l}.`;
    const x = rmsNorm(g, h, constantOf(g, 'input_norm', w.get(`${p}.input_layernorm.weight`)), spec.normEps);
    const proj = (name: string) => linear(c, x, `${p}.self_attn.${name}`, w.get(`${p}.self_attn.${name}.weight`), spec.attentionBias && w.has(`${p}.self_attn.${name}.bias`) ? w.get(`${p}.self_attn.${name}.bias`) : null);
    const q = proj('q_proj');
    const k = proj('k_proj');
    const v = proj('v_proj');
    const qr = reshape(g, rotary(g, reshape(g, q, [0, 0, numHeads, headDim], 'q4'), cos, sin, headDim), [0, 0, numHeads * headDim], 'q_rot');
    const kr = reshape(g, rotary(g, reshape(g, k, [0, 0, numKvHeads, headDim], 'k4'), cos, sin, headDim), [0, 0, numKvHeads * headDim], 'k_rot');
    const attn = causalAttention(g, spec, qr, kr, v, causal);
    h = add(g, h, linear(c, attn, `${p}.self_attn.o_proj`, w.get(`${p}.self_attn.o_proj.weight`), spec.outputBias && w.has(`${p}.self_attn.o_proj.bias`) ? w.get(`${p}.self_attn.o_proj.bias`) : null), 'resid_attn');
    const x2 = rmsNorm(g, h, constantOf(g, 'post_norm', w.get(`${p}.post_attention_layernorm.weight`)), spec.normEps);
    const mlp = (name: string, input: Value) => linear(c, input, `${p}.mlp.${name}`, w.get(`${p}.mlp.${name}.weight`), spec.mlpBias && w.has(`${p}.mlp.${name}.bias`) ? w.get(`${p}.mlp.${name}.bias`) : null);
    h = add(g, h, mlp('down_proj', swiglu(g, mlp('gate_proj', x2), mlp('up_proj', x2))), 'resid_mlp');
  }
  g.scope = '';
  return rmsNorm(g, h, constantOf(g, 'final_norm', w.get('model.norm.weight')), spec.normEps);
}

function gpt2Body(c: Ctx, ids: Value, causal: Value): Value {
  const { g, spec, w } = c;
  const { numHeads, headDim, hiddenSize } = spec;
  const positions = positionsRow(g, ids);
  let h = add(g, embedding(g, constantOf(g, 'wte', w.get('wte.weight')), ids), gather(g, constantOf(g, 'wpe', w.get('wpe.weight')), positions, 0, 'pos_embed'), 'embed_sum');
  const ln = (name: string, x: Value) => layerNorm(g, x, constantOf(g, `${name}_w`, w.get(`${name}.weight`)), constantOf(g, `${name}_b`, w.get(`${name}.bias`)), spec.normEps);
  const conv = (module: string, x: Value) => linear(c, x, module, transposed(w.get(`${module}.weight`)), w.get(`${module}.bias`));
  for (let l = 0; l < spec.numLayers; l++) {
    const p = `h.${l}`;
    g.scope = `l${l}.`;
    const qkv = conv(`${p}.attn.c_attn`, ln(`${p}.ln_1`, h));
    const [q, k, v] = g.op('Split', [qkv, g.ints([hiddenSize, hiddenSize, hiddenSize])], { attrs: { axis: -1 }, outputs: [0, 1, 2].map(() => ({ dtype: 'float32' as const, shape: ['batch', 'seq', hiddenSize] })) }, 'qkv_split') as [Value, Value, Value];
    const attn = causalAttention(g, { numHeads, numKvHeads: numHeads, headDim }, q, k, v, causal);
    h = add(g, h, conv(`${p}.attn.c_proj`, attn), 'resid_attn');
    h = add(g, h, conv(`${p}.mlp.c_proj`, gelu(g, conv(`${p}.mlp.c_fc`, ln(`${p}.ln_2`, h)), spec.hiddenAct === 'gelu' ? 'none' : 'tanh')), 'resid_mlp');
  }
  g.scope = '';
  return ln('ln_f', h);
}
