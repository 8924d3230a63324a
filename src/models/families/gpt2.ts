import type { Value } from '../../../kernels/ir.js';
import { add, gather } from '../../../kernels/ops/basic.js';
import { embedding, gelu, layerNorm } from '../../../kernels/ops/nn.js';
import type { ModelSpec } from '../spec.js';
import { constantOf, transposed, type BodyContext, type ExpectedWeight, type FamilyDefinition } from './family.js';

/** gpt2: learned positions, pre-LayerNorm with bias, Conv1D weights stored [in, out], gelu MLP, lm_head tied to wte. */

const hidden = (s: ModelSpec) => s.hiddenSize;

function expectedWeights(spec: ModelSpec): ExpectedWeight[] {
  const h = spec.hiddenSize;
  const inter = spec.intermediateSize;
  const out: ExpectedWeight[] = [];
  const add = (name: string, ...shape: number[]) => out.push({ name, shape });
  add('wte.weight', spec.vocabSize, h);
  add('wpe.weight', spec.maxPositions, h);
  for (let i = 0; i < spec.numLayers; i++) {
    const p = `h.${i}`;
    add(`${p}.ln_1.weight`, h);
    add(`${p}.ln_1.bias`, h);
    add(`${p}.attn.c_attn.weight`, h, 3 * h);
    add(`${p}.attn.c_attn.bias`, 3 * h);
    add(`${p}.attn.c_proj.weight`, h, h);
    add(`${p}.attn.c_proj.bias`, h);
    add(`${p}.ln_2.weight`, h);
    add(`${p}.ln_2.bias`, h);
    add(`${p}.mlp.c_fc.weight`, h, inter);
    add(`${p}.mlp.c_fc.bias`, inter);
    add(`${p}.mlp.c_proj.weight`, inter, h);
    add(`${p}.mlp.c_proj.bias`, h);
  }
  add('ln_f.weight', h);
  add('ln_f.bias', h);
  if (!spec.tieWordEmbeddings) add('lm_head.weight', spec.vocabSize, h);
  return out;
}

function body(c: BodyContext, ids: Value): Value {
  const { g, spec, w } = c;
  const { numHeads, headDim, hiddenSize } = spec;
  const tok = embedding(g, c.embeddingTable('wte.weight'), ids); // [batch, seq, hidden]
  const pos = gather(g, constantOf(g, 'wpe', w.get('wpe.weight')), c.positions, 0, 'pos_embed');
  let h = add(g, tok, pos, 'embed_sum');
  const ln = (name: string, x: Value) => layerNorm(g, x, constantOf(g, `${name}_w`, w.get(`${name}.weight`)), constantOf(g, `${name}_b`, w.get(`${name}.bias`)), spec.normEps);
  const conv = (module: string, x: Value) => {
    const [inF, out] = w.shape(`${module}.weight`) as [number, number];
    return c.linear(x, { module, shape: [out, inF], weight: () => transposed(w.get(`${module}.weight`)), bias: w.get(`${module}.bias`) });
  };
  for (let l = 0; l < spec.numLayers; l++) {
    const p = `h.${l}`;
    c.layerInput?.(l, h);
    g.scope = `l${l}.`;
    const qkv = conv(`${p}.attn.c_attn`, ln(`${p}.ln_1`, h)); // [batch, seq, 3*hidden]
    const [q, k, v] = g.op('Split', [qkv, g.ints([hiddenSize, hiddenSize, hiddenSize])], { attrs: { axis: -1 }, outputs: [0, 1, 2].map(() => ({ dtype: 'float32' as const, shape: ['batch', 'seq', hiddenSize] })) }, 'qkv_split') as [Value, Value, Value];
    const attn = c.attention(l, q, k, v, { numHeads, numKvHeads: numHeads, headDim });
    h = add(g, h, conv(`${p}.attn.c_proj`, attn), 'resid_attn');
    const act = gelu(g, conv(`${p}.mlp.c_fc`, ln(`${p}.ln_2`, h)), spec.hiddenAct === 'gelu' ? 'none' : 'tanh');
    h = add(g, h, conv(`${p}.mlp.c_proj`, act), 'resid_mlp');
  }
  g.scope = '';
  return ln('ln_f', h);
}

export const gpt2: FamilyDefinition = {
  name: 'gpt2',
  layerLinears: [
    { path: 'attn.c_attn', inFeatures: hidden, outFeatures: (s) => 3 * s.hiddenSize },
    { path: 'attn.c_proj', inFeatures: hidden, outFeatures: hidden },
    { path: 'mlp.c_fc', inFeatures: hidden, outFeatures: (s) => s.intermediateSize },
    { path: 'mlp.c_proj', inFeatures: (s) => s.intermediateSize, outFeatures: hidden },
  ],
  layerPath: (layer) => `h.${layer}`,
  layerPattern: /^h\.(\d+)\./,
  // c_attn already is one Conv1D over q|k|v.
  packedModules: {},
  checkpointPrefix: 'transformer.',
  expectedWeights,
  isUnaccountedWeight: () => false,
  // GPT2LMHeadModel ties lm_head to wte unless the config says otherwise (as an export of a quantized base does).
  lmHeadWeight: (spec, weights) => (!spec.tieWordEmbeddings && weights.has('lm_head.weight') ? 'lm_head.weight' : 'wte.weight'),
  body,
};
