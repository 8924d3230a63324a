import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { FAMILIES, familyOf, familyOfModule, linearModules, loraModuleNames, moduleOrder } from '../../src/models/families/index.js';
import { buildServingGraph } from '../../src/models/graph.js';
import { buildTrainingGraph } from '../../src/models/train-graph.js';
import { quantizedLinear } from '../../src/models/linear.js';
import { loadModelDir } from '../../src/models/load.js';
import { makeModel } from '../../src/models/make.js';
import type { ModelSpec, WeightSource } from '../../src/models/spec.js';
import { STORIES260K, removeDir, tempDir } from './fixtures.js';

/** The family's declared LoRA-able linears against the checkpoint's real weights: every one exists, with its shape. */
function checkDeclaredModules(spec: ModelSpec, weights: WeightSource, conv1d: boolean): void {
  const family = familyOf(spec);
  const modules = linearModules(spec);
  assert.equal(modules.length, spec.numLayers * family.layerLinears.length);
  for (const m of modules) {
    // nn.Linear stores [out, in]; gpt2's Conv1D [in, out].
    const want = conv1d ? [m.inFeatures, m.outFeatures] : [m.outFeatures, m.inFeatures];
    assert.deepEqual(weights.shape(`${m.module}.weight`), want, m.module);
    assert.equal(familyOfModule(m.module), spec.family);
  }
  // Every tensor the family reads is there; the checkpoint holds nothing else (an lm_head the config ties away aside).
  const expected = new Set(family.expectedWeights(spec).map((e) => e.name));
  const extra = weights.names().filter((n) => !expected.has(n));
  assert.deepEqual(extra, spec.tieWordEmbeddings && weights.has('lm_head.weight') ? ['lm_head.weight'] : []);
  for (const e of family.expectedWeights(spec)) assert.deepEqual(weights.shape(e.name), e.shape, e.name);
  // Packed groups name linears of the same block that read the same input.
  for (const [packed, parts] of Object.entries(family.packedModules)) {
    const inLayer = family.layerLinears.filter((l) => parts.includes(l.path.slice(l.path.lastIndexOf('.') + 1)));
    assert.equal(inLayer.length, parts.length, packed);
    assert.equal(new Set(inLayer.map((l) => l.inFeatures(spec))).size, 1, `${packed}: one input`);
  }
  // moduleOrder sorts any order back into linearModules' order.
  const shuffled = [...modules].reverse().map((m) => m.module);
  assert.deepEqual(shuffled.sort((a, b) => moduleOrder(a) - moduleOrder(b)), modules.map((m) => m.module));
}

/** Both graphs take their LoRA inputs from the family's module list, in its order and shapes. */
function checkGraphsUseTheFamily(spec: ModelSpec, weights: WeightSource): void {
  const modules = linearModules(spec).map(({ module, inFeatures, outFeatures }) => ({ module, inFeatures, outFeatures }));
  const { layout } = buildServingGraph(spec, weights, { linear: quantizedLinear({ kind: 'none' }), embeddingFp16: false });
  assert.deepEqual(layout.loraModules.map(({ module, inFeatures, outFeatures }) => ({ module, inFeatures, outFeatures })), modules);
  const train = buildTrainingGraph(spec, weights, { quant: { kind: 'none' }, modules, r: 2, scaling: 1 });
  assert.deepEqual(train.params.map((p) => p.module), modules.map((m) => m.module));
}

test('the llama family declares stories260K: modules, shapes, weights, packed groups', () => {
  const { spec, weights } = loadModelDir(STORIES260K);
  assert.equal(spec.family, 'llama');
  assert.deepEqual(loraModuleNames('llama'), ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']);
  assert.deepEqual(FAMILIES.llama.packedModules, { qkv_proj: ['q_proj', 'k_proj', 'v_proj'], gate_up_proj: ['gate_proj', 'up_proj'] });
  checkDeclaredModules(spec, weights, false);
  checkGraphsUseTheFamily(spec, weights);
});

test('the gpt2 family declares a random gpt2 (Conv1D [in, out], transformer. prefix stripped)', () => {
  const dir = tempDir('families-gpt2');
  try {
    makeModel({ arch: 'gpt2', size: 'tiny', outDir: join(dir, 'g'), seed: 3 });
    const { spec, weights } = loadModelDir(join(dir, 'g'));
    assert.equal(spec.family, 'gpt2');
    assert.deepEqual(loraModuleNames('gpt2'), ['c_attn', 'c_proj', 'c_fc']);
    checkDeclaredModules(spec, weights, true);
    checkGraphsUseTheFamily(spec, weights);
  } finally {
    removeDir(dir);
  }
});

test('qwen2 (q/k/v bias) is the llama family with attentionBias: its biases are expected, others are not', () => {
  const dir = tempDir('families-qwen2');
  try {
    makeModel({ arch: 'llama', size: 'tiny', modelType: 'qwen2', outDir: join(dir, 'q'), seed: 4 });
    const { spec, weights } = loadModelDir(join(dir, 'q'));
    assert.equal(spec.family, 'llama');
    assert.equal(spec.attentionBias, true);
    checkDeclaredModules(spec, weights, false);
    assert.equal(FAMILIES.llama.isUnaccountedWeight(spec, 'model.layers.0.self_attn.q_proj.bias'), false);
    assert.equal(FAMILIES.llama.isUnaccountedWeight(spec, 'model.layers.0.mlp.up_proj.bias'), !spec.mlpBias);
  } finally {
    removeDir(dir);
  }
});

test('module paths: each family recognizes only its own linears', () => {
  assert.equal(familyOfModule('model.layers.12.mlp.gate_proj'), 'llama');
  assert.equal(familyOfModule('h.3.mlp.c_proj'), 'gpt2');
  assert.equal(familyOfModule('model.layers.0.mlp.c_fc'), null);
  assert.equal(familyOfModule('h.0.self_attn.q_proj'), null);
  assert.equal(familyOfModule('model.layers.0.self_attn.q_proj.weight'), null);
  assert.equal(familyOfModule('lm_head'), null);
});
