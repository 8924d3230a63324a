import { Graph, type Value } from '../../kernels/ir.js';
import { add, concat, dimOf, gather, reshape, sub } from '../../kernels/ops/basic.js';
import { attentionContext, cachedAttention, embedding, gelu, layerNorm, loraDelta, rmsNorm, rotary, rotaryTables, swiglu } from '../../kernels/ops/nn.js';
import type { HostTensor, ModelSpec, WeightSource } from './spec.js';

/**
 * The serving graph: ONE graph for chunked prefill (batch 1, seq > 1) and batched decode (batch n, seq 1),
 * so the prepacked 4-bit weights live in one session only.
 *
 * Inputs:
 *   input_ids [batch, seq] int64     new tokens of each row
 *   past_len  [batch] int64          tokens already cached for each row (= position of the first new token)
 *   kv_rows   [batch] int64          cache row of each batch row
 *   slot      [batch] int64          adapter slot of each row (0 = base model)
 *   lora_scale [batch] float32       each row's delta scale: lora_alpha / r times the request's adapter_scale
 *   past_key.L / past_value.L [window, rows, kvDim] float32   time-major cache views (window: a multiple of
 *                                    ATTENTION_BLOCK covering past_len + seq of every row), no copy
 *   lora_a.M [slots, rank, in], lora_b.M [slots, out, rank] float32 in PEFT layout for each LoRA module M
 * Outputs:
 *   logits [batch, vocab]            of each row's last new token
 *   new_kv [2*layers, batch, seq, kvDim]  the new keys (rotary applied) and values, layer by layer, for the caller to append
 */
export interface LinearEmitter {
  /** y = x W^T (+ bias) for W [out, in] in HF Linear layout; quantizes as configured. */
  (g: Graph, x: Value, name: string, w: HostTensor, bias: HostTensor | null): Value;
}

export interface LoraModuleInfo {
  /** HF module path, e.g. 'model.layers.0.self_attn.q_proj' or 'h.0.attn.c_attn'. */
  module: string;
  inFeatures: number;
  outFeatures: number;
  /** ||W||_F of the module's base weight (before quantization): the scale adapters are bounded by. */
  baseNorm?: number;
}

export interface ServingLayout {
  numLayers: number;
  kvDim: number;
  vocabSize: number;
  loraModules: LoraModuleInfo[];
}

export interface ServingGraphOptions {
  linear: LinearEmitter;
  /** Store the embedding table in float16 (halves its memory; exact enough for 4-bit serving). */
  embeddingFp16: boolean;
  /** Float16 conversion for the table, supplied by the caller (keeps this module free of codec details). */
  toFp16?: (data: Float32Array) => Uint16Array;
}

interface Ctx {
  g: Graph;
  spec: ModelSpec;
  w: WeightSource;
  opts: ServingGraphOptions;
  slot: Value;
  /** [batch, 1, 1] */
  rowScale: Value;
  loraModules: LoraModuleInfo[];
}

/** The LoRA path of one module: x A_slot B_slot, from the pooled adapter inputs. */
function loraPath(c: Ctx, x: Value, module: string, weight: HostTensor): Value {
  const [out, inF] = weight.shape as [number, number];
  const poolA = c.g.input(`lora_a.${module}`, 'float32', ['slots', 'rank', inF]);
  const poolB = c.g.input(`lora_b.${module}`, 'float32', ['slots', out, 'rank']);
  c.loraModules.push({ module, inFeatures: inF, outFeatures: out, baseNorm: frobeniusNorm(weight.data) });
  return loraDelta(c.g, x, poolA, poolB, c.slot, c.rowScale);
}

/** sqrt(sum of squares), accumulated in float64. */
export function frobeniusNorm(t: Float32Array): number {
  let s = 0;
  for (let i = 0; i < t.length; i++) s += t[i]! * t[i]!;
  return Math.sqrt(s);
}

/** A linear layer with its LoRA path: base(x) + x A_slot B_slot. */
function linearWithLora(c: Ctx, x: Value, module: string, weight: HostTensor, bias: HostTensor | null): Value {
  const y = c.opts.linear(c.g, x, module, weight, bias);
  return add(c.g, y, loraPath(c, x, module, weight), `${module}.out`);
}

/**
 * Several linear layers over the same input (q/k/v, gate/up) as ONE quantized matmul over their stacked rows,
 * then split, each part plus its own LoRA path. Rows quantize independently, so this is exactly the separate
 * layers; one larger kernel keeps both threads busy where a small one (k_proj: 256 rows) would not.
 */
function fusedLinearsWithLora(c: Ctx, x: Value, fusedName: string, parts: { module: string; weight: HostTensor; bias: HostTensor | null }[]): Value[] {
  const inF = parts[0]!.weight.shape[1]!;
  const outs = parts.map((p) => p.weight.shape[0]!);
  const total = outs.reduce((a, b) => a + b, 0);
  const stacked = new Float32Array(total * inF);
  const withBias = parts.some((p) => p.bias);
  const bias = withBias ? new Float32Array(total) : null;
  let row = 0;
  for (const p of parts) {
    stacked.set(p.weight.data, row * inF);
    if (bias && p.bias) bias.set(p.bias.data, row);
    row += p.weight.shape[0]!;
  }
  const y = c.opts.linear(c.g, x, fusedName, { shape: [total, inF], data: stacked }, bias ? { shape: [total], data: bias } : null);
  const pieces = c.g.op('Split', [y, c.g.ints(outs)], { attrs: { axis: -1 }, outputs: outs.map((n) => ({ dtype: 'float32', shape: [...x.shape.slice(0, -1), n] })) }, `${fusedName}.split`);
  return parts.map((p, i) => add(c.g, pieces[i]!, loraPath(c, x, p.module, p.weight), `${p.module}.out`));
}

function maybe(w: WeightSource, name: string): HostTensor | null {
  return w.has(name) ? w.get(name) : null;
}

/** Conv1D weights (gpt2) are [in, out]; the linear emitter wants [out, in]. */
function transposed(t: HostTensor): HostTensor {
  const [rows, cols] = t.shape as [number, number];
  const data = new Float32Array(rows * cols);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) data[c * rows + r] = t.data[r * cols + c]!;
  return { shape: [cols, rows], data };
}

function constantOf(g: Graph, hint: string, t: HostTensor): Value {
  return g.constant(hint, 'float32', t.shape, t.data);
}

export function buildServingGraph(spec: ModelSpec, weights: WeightSource, opts: ServingGraphOptions): { graph: Graph; layout: ServingLayout } {
  const g = new Graph(`loraplex_${spec.modelType}_serving`);
  const ids = g.input('input_ids', 'int64', ['batch', 'seq']);
  const pastLen = g.input('past_len', 'int64', ['batch']);
  const kvRows = g.input('kv_rows', 'int64', ['batch']);
  const slot = g.input('slot', 'int64', ['batch']);
  const rowScale = reshape(g, g.input('lora_scale', 'float32', ['batch']), [-1, 1, 1], 'lora_row_scale');
  const c: Ctx = { g, spec, w: weights, opts, slot, rowScale, loraModules: [] };
  const kvDim = spec.numKvHeads * spec.headDim;
  const pastKeys: Value[] = [];
  const pastValues: Value[] = [];
  for (let l = 0; l < spec.numLayers; l++) {
    pastKeys.push(g.input(`past_key.${l}`, 'float32', ['past', 'rows', kvDim]));
    pastValues.push(g.input(`past_value.${l}`, 'float32', ['past', 'rows', kvDim]));
  }
  // Absolute position of every new token: past_len[b] + s.  [batch, seq]
  const seqLen = dimOf(g, ids, 1, 'seq_len');
  const seqRange = g.op1('Range', [g.constant('zero', 'int64', [], new BigInt64Array([0n])), reshape(g, seqLen, [], 'seq_scalar'), g.constant('one', 'int64', [], new BigInt64Array([1n]))], { dtype: 'int64', shape: ['seq'] }, undefined, undefined, 'seq_range');
  const positions = add(g, reshape(g, pastLen, [-1, 1], 'past_len_col2'), reshape(g, seqRange, [1, -1], 'seq_row'), 'positions');
  const masks = attentionContext(g, positions, pastKeys[0]!);

  const newKv: Value[] = [];
  const layerArgs = { masks, positions, kvRows, pastKeys, pastValues, newKv };
  const hidden = spec.family === 'gpt2' ? gpt2Body(c, ids, layerArgs) : llamaBody(c, ids, layerArgs);

  // Only the last new token of each row needs logits: gather it before the (large) lm_head.
  const lastIndex = sub(g, seqLen, g.ints([1]), 'last_index');
  const last = gather(g, hidden, lastIndex, 1, 'last_hidden'); // [batch, 1, hidden]
  let logits: Value;
  if (spec.family === 'gpt2') {
    logits = lmHead(c, last, 'wte.weight');
  } else {
    const head = !spec.tieWordEmbeddings && weights.has('lm_head.weight') ? 'lm_head.weight' : 'model.embed_tokens.weight';
    logits = lmHead(c, last, head);
  }
  g.output(reshape(g, logits, [0, -1], 'logits_2d'), 'logits', ['batch', spec.vocabSize]);
  const stacked = concat(g, newKv.map((v, i) => g.op1('Unsqueeze', [v, g.ints([0])], { dtype: 'float32', shape: [1, 'batch', 'seq', kvDim] }, undefined, undefined, `new_kv_${i}`)), 0, 'new_kv_all');
  g.output(stacked, 'new_kv', [2 * spec.numLayers, 'batch', 'seq', kvDim]);
  return { graph: g, layout: { numLayers: spec.numLayers, kvDim, vocabSize: spec.vocabSize, loraModules: c.loraModules } };
}

interface LayerArgs {
  masks: ReturnType<typeof attentionContext>;
  positions: Value;
  kvRows: Value;
  pastKeys: Value[];
  pastValues: Value[];
  newKv: Value[];
}

function lmHead(c: Ctx, last: Value, name: string): Value {
  c.g.scope = 'lm_head.';
  const y = c.opts.linear(c.g, last, 'lm_head', c.w.get(name), null);
  c.g.scope = '';
  return y;
}

function embeddingTable(c: Ctx, name: string): Value {
  const t = c.w.get(name);
  if (c.opts.embeddingFp16 && c.opts.toFp16) return c.g.constant('embed_table', 'float16', t.shape, c.opts.toFp16(t.data));
  return constantOf(c.g, 'embed_table', t);
}

function llamaBody(c: Ctx, ids: Value, a: LayerArgs): Value {
  const { g, spec, w } = c;
  const { numHeads, numKvHeads, headDim } = spec;
  let h = embedding(g, embeddingTable(c, 'model.embed_tokens.weight'), ids); // [batch, seq, hidden]
  const tables = rotaryTables(spec.maxPositions, headDim, spec.ropeTheta);
  const cosTable = g.constant('rope_cos', 'float32', [spec.maxPositions, headDim / 2], tables.cos);
  const sinTable = g.constant('rope_sin', 'float32', [spec.maxPositions, headDim / 2], tables.sin);
  const cos = reshape(g, gather(g, cosTable, a.positions, 0, 'cos_rows'), [0, 0, 1, headDim / 2], 'cos'); // [batch, seq, 1, hd/2]
  const sin = reshape(g, gather(g, sinTable, a.positions, 0, 'sin_rows'), [0, 0, 1, headDim / 2], 'sin');
  for (let l = 0; l < spec.numLayers; l++) {
    const p = `model.layers.${l}`;
    g.scope = `l${l}.`;
    const x = rmsNorm(g, h, constantOf(g, 'input_norm', w.get(`${p}.input_layernorm.weight`)), spec.normEps);
    const attnPart = (name: string) => ({
      module: `${p}.self_attn.${name}`,
      weight: w.get(`${p}.self_attn.${name}.weight`),
      bias: spec.attentionBias ? maybe(w, `${p}.self_attn.${name}.bias`) : null,
    });
    const [q, k, v] = fusedLinearsWithLora(c, x, `${p}.self_attn.qkv_proj`, [attnPart('q_proj'), attnPart('k_proj'), attnPart('v_proj')]) as [Value, Value, Value];
    const qr = reshape(g, rotary(g, reshape(g, q, [0, 0, numHeads, headDim], 'q4'), cos, sin, headDim), [0, 0, numHeads * headDim], 'q_rot');
    const kr = reshape(g, rotary(g, reshape(g, k, [0, 0, numKvHeads, headDim], 'k4'), cos, sin, headDim), [0, 0, numKvHeads * headDim], 'k_rot');
    a.newKv.push(kr, v);
    const attn = cachedAttention(g, spec, qr, kr, v, a.pastKeys[l]!, a.pastValues[l]!, a.kvRows, a.masks);
    const o = linearWithLora(c, attn, `${p}.self_attn.o_proj`, w.get(`${p}.self_attn.o_proj.weight`), spec.outputBias ? maybe(w, `${p}.self_attn.o_proj.bias`) : null);
    h = add(g, h, o, 'resid_attn');
    const x2 = rmsNorm(g, h, constantOf(g, 'post_norm', w.get(`${p}.post_attention_layernorm.weight`)), spec.normEps);
    const mlpPart = (name: string) => ({
      module: `${p}.mlp.${name}`,
      weight: w.get(`${p}.mlp.${name}.weight`),
      bias: spec.mlpBias ? maybe(w, `${p}.mlp.${name}.bias`) : null,
    });
    const [gate, up] = fusedLinearsWithLora(c, x2, `${p}.mlp.gate_up_proj`, [mlpPart('gate_proj'), mlpPart('up_proj')]) as [Value, Value];
    const down = mlpPart('down_proj');
    h = add(g, h, linearWithLora(c, swiglu(g, gate, up), down.module, down.weight, down.bias), 'resid_mlp');
  }
  g.scope = '';
  return rmsNorm(g, h, constantOf(g, 'final_norm', w.get('model.norm.weight')), spec.normEps);
}

function gpt2Body(c: Ctx, ids: Value, a: LayerArgs): Value {
  const { g, spec, w } = c;
  const { numHeads, headDim } = spec;
  const hiddenSize = spec.hiddenSize;
  const tok = embedding(g, embeddingTable(c, 'wte.weight'), ids);
  const pos = gather(g, constantOf(g, 'wpe', w.get('wpe.weight')), a.positions, 0, 'pos_embed');
  let h = add(g, tok, pos, 'embed_sum');
  const ln = (name: string, x: Value) => layerNorm(g, x, constantOf(g, `${name}_w`, w.get(`${name}.weight`)), constantOf(g, `${name}_b`, w.get(`${name}.bias`)), spec.normEps);
  const conv = (module: string, x: Value) => linearWithLora(c, x, module, transposed(w.get(`${module}.weight`)), w.get(`${module}.bias`));
  for (let l = 0; l < spec.numLayers; l++) {
    const p = `h.${l}`;
    g.scope = `l${l}.`;
    const qkv = conv(`${p}.attn.c_attn`, ln(`${p}.ln_1`, h)); // [batch, seq, 3*hidden]
    const q = g.op1('Slice', [qkv, g.ints([0]), g.ints([hiddenSize]), g.ints([-1])], { dtype: 'float32', shape: ['batch', 'seq', hiddenSize] }, undefined, undefined, 'q');
    const k = g.op1('Slice', [qkv, g.ints([hiddenSize]), g.ints([2 * hiddenSize]), g.ints([-1])], { dtype: 'float32', shape: ['batch', 'seq', hiddenSize] }, undefined, undefined, 'k');
    const v = g.op1('Slice', [qkv, g.ints([2 * hiddenSize]), g.ints([3 * hiddenSize]), g.ints([-1])], { dtype: 'float32', shape: ['batch', 'seq', hiddenSize] }, undefined, undefined, 'v');
    a.newKv.push(k, v);
    const attn = cachedAttention(g, { numHeads, numKvHeads: numHeads, headDim }, q, k, v, a.pastKeys[l]!, a.pastValues[l]!, a.kvRows, a.masks);
    h = add(g, h, conv(`${p}.attn.c_proj`, attn), 'resid_attn');
    const act = gelu(g, conv(`${p}.mlp.c_fc`, ln(`${p}.ln_2`, h)), spec.hiddenAct === 'gelu' ? 'none' : 'tanh');
    h = add(g, h, conv(`${p}.mlp.c_proj`, act), 'resid_mlp');
  }
  g.scope = '';
  return ln('ln_f', h);
}
