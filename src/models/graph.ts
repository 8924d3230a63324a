import { Graph, type Value } from '../../kernels/ir.js';
import { add, concat, dimOf, gather, reshape, sub } from '../../kernels/ops/basic.js';
import { ATTENTION_BLOCK, attentionContext, cachedAttention, loraDelta } from '../../kernels/ops/nn.js';
import { familyOf, type LinearWeight } from './families/index.js';
import type { HostTensor, ModelSpec, WeightSource } from './spec.js';
import type { LoraModuleShape } from './lora.js';

/**
 * The serving graph: ONE graph for chunked prefill (batch 1, seq > 1) and batched decode (batch n, seq 1),
 * so the prepacked 4-bit weights live in one session only.
 *
 * Inputs:
 *   input_ids [batch, seq] int64     new tokens of each row
 *   past_len  [batch] int64          tokens already cached for each row (= position of the first new token)
 *   kv_blocks [batch, nblocks] int64 each row's block table: the pool blocks holding its positions
 *                                    [64 i, 64 (i+1)) in order, padded with block 0 (all zeros) to nblocks
 *   slot      [batch] int64          adapter slot of each row (0 = base model)
 *   lora_scale [batch] float32       each row's delta scale: lora_alpha / r times the request's adapter_scale
 *   past_key.L / past_value.L [numBlocks, 64, kvDim] float32  the JS-owned block pools of layer L, fed whole
 *                                    (no copy); window = nblocks * 64 covers past_len + seq of every row
 *   lora_a.M [slots, rank, in], lora_b.M [slots, out, rank] float32 in PEFT layout for each LoRA module M
 * Outputs:
 *   logits [batch, vocab]            of each row's last new token
 *   new_kv [2*layers, batch, seq, kvDim]  the new keys (rotary applied) and values, layer by layer, for the caller to append
 */
export interface LinearEmitter {
  /** y = x W^T (+ bias) for W [out, in] in HF Linear layout; quantizes as configured. */
  (g: Graph, x: Value, name: string, w: HostTensor, bias: HostTensor | null): Value;
}

/** A LoRA-able module as served, with the scale adapters on it are bounded by. */
export interface LoraModuleInfo extends LoraModuleShape {
  /** ||W||_F of the module's base weight (before quantization). */
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
  /** The output head's linear (its own codec: lmHeadQuant); default `linear`. */
  lmHeadLinear?: LinearEmitter;
  /** Store the embedding table in float16 (halves its memory; exact enough for 4-bit serving). */
  embeddingFp16: boolean;
  /** Float16 conversion for the table, supplied by the caller (keeps this module free of codec details). */
  toFp16?: (data: Float32Array) => Uint16Array;
}

interface Ctx {
  g: Graph;
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
function linearWithLora(c: Ctx, x: Value, l: LinearWeight): Value {
  const { module, bias } = l;
  const weight = l.weight();
  const y = c.opts.linear(c.g, x, module, weight, bias);
  return add(c.g, y, loraPath(c, x, module, weight), `${module}.out`);
}

/**
 * A packed group (q/k/v, gate/up) as ONE quantized matmul over the stacked rows, then split, each part plus its
 * own LoRA path. Rows quantize independently, so this is exactly the separate layers; one larger kernel keeps
 * both threads busy where a small one (k_proj: 256 rows) would not.
 */
function packedLinearWithLora(c: Ctx, x: Value, packedName: string, parts: LinearWeight[]): Value[] {
  const inF = parts[0]!.shape[1];
  const outs = parts.map((p) => p.shape[0]);
  const weights = parts.map((p) => p.weight());
  const total = outs.reduce((a, b) => a + b, 0);
  const stacked = new Float32Array(total * inF);
  const withBias = parts.some((p) => p.bias);
  const bias = withBias ? new Float32Array(total) : null;
  let row = 0;
  parts.forEach((p, i) => {
    stacked.set(weights[i]!.data, row * inF);
    if (bias && p.bias) bias.set(p.bias.data, row);
    row += p.shape[0];
  });
  const y = c.opts.linear(c.g, x, packedName, { shape: [total, inF], data: stacked }, bias ? { shape: [total], data: bias } : null);
  const pieces = c.g.op('Split', [y, c.g.ints(outs)], { attrs: { axis: -1 }, outputs: outs.map((n) => ({ dtype: 'float32', shape: [...x.shape.slice(0, -1), n] })) }, `${packedName}.split`);
  return parts.map((p, i) => add(c.g, pieces[i]!, loraPath(c, x, p.module, weights[i]!), `${p.module}.out`));
}

export function buildServingGraph(spec: ModelSpec, weights: WeightSource, opts: ServingGraphOptions): { graph: Graph; layout: ServingLayout } {
  const g = new Graph(`loraplex_${spec.modelType}_serving`);
  const ids = g.input('input_ids', 'int64', ['batch', 'seq']);
  const pastLen = g.input('past_len', 'int64', ['batch']);
  const kvBlocks = g.input('kv_blocks', 'int64', ['batch', 'nblocks']);
  const slot = g.input('slot', 'int64', ['batch']);
  const rowScale = reshape(g, g.input('lora_scale', 'float32', ['batch']), [-1, 1, 1], 'lora_row_scale');
  const c: Ctx = { g, opts, slot, rowScale, loraModules: [] };
  const kvDim = spec.numKvHeads * spec.headDim;
  const pastKeys: Value[] = [];
  const pastValues: Value[] = [];
  for (let l = 0; l < spec.numLayers; l++) {
    pastKeys.push(g.input(`past_key.${l}`, 'float32', ['blocks', ATTENTION_BLOCK, kvDim]));
    pastValues.push(g.input(`past_value.${l}`, 'float32', ['blocks', ATTENTION_BLOCK, kvDim]));
  }
  // Absolute position of every new token: past_len[b] + s.  [batch, seq]
  const seqLen = dimOf(g, ids, 1, 'seq_len');
  const seqRange = g.op1('Range', [g.constant('zero', 'int64', [], new BigInt64Array([0n])), reshape(g, seqLen, [], 'seq_scalar'), g.constant('one', 'int64', [], new BigInt64Array([1n]))], { dtype: 'int64', shape: ['seq'] }, undefined, undefined, 'seq_range');
  const positions = add(g, reshape(g, pastLen, [-1, 1], 'past_len_col2'), reshape(g, seqRange, [1, -1], 'seq_row'), 'positions');
  const masks = attentionContext(g, positions, kvBlocks, pastKeys[0]!);

  const newKv: Value[] = [];
  const family = familyOf(spec);
  const hidden = family.body(
    {
      g,
      spec,
      w: weights,
      positions,
      embeddingTable: (name) => embeddingTable(g, weights.get(name), opts),
      linear: (x, linear) => linearWithLora(c, x, linear),
      packedLinear: (x, packedName, parts) => packedLinearWithLora(c, x, packedName, parts),
      attention: (layer, q, k, v, heads) => {
        newKv.push(k, v);
        return cachedAttention(g, heads, q, k, v, pastKeys[layer]!, pastValues[layer]!, kvBlocks, masks);
      },
    },
    ids,
  );

  // Only the last new token of each row needs logits: gather it before the (large) lm_head.
  const lastIndex = sub(g, seqLen, g.ints([1]), 'last_index');
  const last = gather(g, hidden, lastIndex, 1, 'last_hidden'); // [batch, 1, hidden]
  g.scope = 'lm_head.';
  const logits = (opts.lmHeadLinear ?? opts.linear)(g, last, 'lm_head', weights.get(family.lmHeadWeight(spec, weights)), null);
  g.scope = '';
  g.output(reshape(g, logits, [0, -1], 'logits_2d'), 'logits', ['batch', spec.vocabSize]);
  const stacked = concat(g, newKv.map((v, i) => g.op1('Unsqueeze', [v, g.ints([0])], { dtype: 'float32', shape: [1, 'batch', 'seq', kvDim] }, undefined, undefined, `new_kv_${i}`)), 0, 'new_kv_all');
  g.output(stacked, 'new_kv', [2 * spec.numLayers, 'batch', 'seq', kvDim]);
  return { graph: g, layout: { numLayers: spec.numLayers, kvDim, vocabSize: spec.vocabSize, loraModules: c.loraModules } };
}

function embeddingTable(g: Graph, t: HostTensor, opts: ServingGraphOptions): Value {
  if (opts.embeddingFp16 && opts.toFp16) return g.constant('embed_table', 'float16', t.shape, opts.toFp16(t.data));
  return g.constant('embed_table', 'float32', t.shape, t.data);
}
