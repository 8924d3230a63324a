import type { Value } from '../../../kernels/ir.js';
import { add, gather, reshape } from '../../../kernels/ops/basic.js';
import { embedding, rmsNorm, rotary, rotaryTables, swiglu } from '../../../kernels/ops/nn.js';
import type { ModelSpec, WeightSource } from '../spec.js';
import { constantOf, type BodyContext, type ExpectedWeight, type FamilyDefinition, type LinearWeight } from './family.js';

/** llama / mistral / qwen2: RMSNorm, rotary, grouped-query attention, SwiGLU; q/k/v bias with attention_bias. */

const qDim = (s: ModelSpec) => s.numHeads * s.headDim;
const kvDim = (s: ModelSpec) => s.numKvHeads * s.headDim;
const hidden = (s: ModelSpec) => s.hiddenSize;
const inter = (s: ModelSpec) => s.intermediateSize;

const ATTENTION = ['q_proj', 'k_proj', 'v_proj', 'o_proj'] as const;
const MLP = ['gate_proj', 'up_proj', 'down_proj'] as const;

/** Which ModelSpec flag gives a projection its bias. */
function hasBias(spec: ModelSpec, proj: string): boolean {
  if (proj === 'o_proj') return spec.outputBias;
  return (MLP as readonly string[]).includes(proj) ? spec.mlpBias : spec.attentionBias;
}

function expectedWeights(spec: ModelSpec): ExpectedWeight[] {
  const h = spec.hiddenSize;
  const out: ExpectedWeight[] = [];
  const add = (name: string, ...shape: number[]) => out.push({ name, shape });
  add('model.embed_tokens.weight', spec.vocabSize, h);
  for (let i = 0; i < spec.numLayers; i++) {
    const p = `model.layers.${i}`;
    add(`${p}.input_layernorm.weight`, h);
    for (const [m, o] of [['q_proj', qDim(spec)], ['k_proj', kvDim(spec)], ['v_proj', kvDim(spec)]] as const) {
      add(`${p}.self_attn.${m}.weight`, o, h);
      if (spec.attentionBias) add(`${p}.self_attn.${m}.bias`, o);
    }
    add(`${p}.self_attn.o_proj.weight`, h, qDim(spec));
    if (spec.outputBias) add(`${p}.self_attn.o_proj.bias`, h);
    add(`${p}.post_attention_layernorm.weight`, h);
    add(`${p}.mlp.gate_proj.weight`, inter(spec), h);
    add(`${p}.mlp.up_proj.weight`, inter(spec), h);
    add(`${p}.mlp.down_proj.weight`, h, inter(spec));
    if (spec.mlpBias) {
      add(`${p}.mlp.gate_proj.bias`, inter(spec));
      add(`${p}.mlp.up_proj.bias`, inter(spec));
      add(`${p}.mlp.down_proj.bias`, h);
    }
  }
  add('model.norm.weight', h);
  if (!spec.tieWordEmbeddings) add('lm_head.weight', spec.vocabSize, h);
  return out;
}

function body(c: BodyContext, ids: Value): Value {
  const { g, spec, w } = c;
  const { numHeads, numKvHeads, headDim } = spec;
  let h = embedding(g, c.embeddingTable('model.embed_tokens.weight'), ids); // [batch, seq, hidden]
  const tables = rotaryTables(spec.maxPositions, headDim, spec.ropeTheta);
  const cosTable = g.constant('rope_cos', 'float32', [spec.maxPositions, headDim / 2], tables.cos);
  const sinTable = g.constant('rope_sin', 'float32', [spec.maxPositions, headDim / 2], tables.sin);
  const cos = reshape(g, gather(g, cosTable, c.positions, 0, 'cos_rows'), [0, 0, 1, headDim / 2], 'cos'); // [batch, seq, 1, hd/2]
  const sin = reshape(g, gather(g, sinTable, c.positions, 0, 'sin_rows'), [0, 0, 1, headDim / 2], 'sin');
  for (let l = 0; l < spec.numLayers; l++) {
    const p = `model.layers.${l}`;
    c.layerInput?.(l, h);
    g.scope = `l${l}.`;
    const part = (block: string, proj: string): LinearWeight => {
      const module = `${p}.${block}.${proj}`;
      const [out, inF] = w.shape(`${module}.weight`) as [number, number];
      return { module, shape: [out, inF], weight: () => w.get(`${module}.weight`), bias: hasBias(spec, proj) && w.has(`${module}.bias`) ? w.get(`${module}.bias`) : null };
    };
    const x = rmsNorm(g, h, constantOf(g, 'input_norm', w.get(`${p}.input_layernorm.weight`)), spec.normEps);
    const [q, k, v] = c.packedLinear(x, `${p}.self_attn.qkv_proj`, [part('self_attn', 'q_proj'), part('self_attn', 'k_proj'), part('self_attn', 'v_proj')]) as [Value, Value, Value];
    const qr = reshape(g, rotary(g, reshape(g, q, [0, 0, numHeads, headDim], 'q4'), cos, sin, headDim), [0, 0, numHeads * headDim], 'q_rot');
    const kr = reshape(g, rotary(g, reshape(g, k, [0, 0, numKvHeads, headDim], 'k4'), cos, sin, headDim), [0, 0, numKvHeads * headDim], 'k_rot');
    const attn = c.attention(l, qr, kr, v, spec);
    h = add(g, h, c.linear(attn, part('self_attn', 'o_proj')), 'resid_attn');
    const x2 = rmsNorm(g, h, constantOf(g, 'post_norm', w.get(`${p}.post_attention_layernorm.weight`)), spec.normEps);
    const [gate, up] = c.packedLinear(x2, `${p}.mlp.gate_up_proj`, [part('mlp', 'gate_proj'), part('mlp', 'up_proj')]) as [Value, Value];
    h = add(g, h, c.linear(swiglu(g, gate, up), part('mlp', 'down_proj')), 'resid_mlp');
  }
  g.scope = '';
  return rmsNorm(g, h, constantOf(g, 'final_norm', w.get('model.norm.weight')), spec.normEps);
}

export const llama: FamilyDefinition = {
  name: 'llama',
  layerLinears: [
    { path: 'self_attn.q_proj', inFeatures: hidden, outFeatures: qDim },
    { path: 'self_attn.k_proj', inFeatures: hidden, outFeatures: kvDim },
    { path: 'self_attn.v_proj', inFeatures: hidden, outFeatures: kvDim },
    { path: 'self_attn.o_proj', inFeatures: qDim, outFeatures: hidden },
    { path: 'mlp.gate_proj', inFeatures: hidden, outFeatures: inter },
    { path: 'mlp.up_proj', inFeatures: hidden, outFeatures: inter },
    { path: 'mlp.down_proj', inFeatures: inter, outFeatures: hidden },
  ],
  layerPath: (layer) => `model.layers.${layer}`,
  layerPattern: /^model\.layers\.(\d+)\./,
  packedModules: { qkv_proj: ['q_proj', 'k_proj', 'v_proj'], gate_up_proj: ['gate_proj', 'up_proj'] },
  checkpointPrefix: null,
  expectedWeights,
  isUnaccountedWeight(spec, name) {
    const m = new RegExp(`\\.(${[...ATTENTION, ...MLP].join('|')})\\.bias$`).exec(name);
    return m !== null && !hasBias(spec, m[1]!);
  },
  lmHeadWeight: (spec: ModelSpec, weights: WeightSource) => (!spec.tieWordEmbeddings && weights.has('lm_head.weight') ? 'lm_head.weight' : 'model.embed_tokens.weight'),
  body,
};
