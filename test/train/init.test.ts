import assert from 'node:assert/strict';
import { test } from 'node:test';
import { linearModules } from '../../src/adapters/peft.js';
import { validateTrainConfig } from '../../src/train/config.js';
import { initLora, loraParams } from '../../src/train/init.js';
import { gpt2Spec, llamaSpec } from './train-fixtures.js';

test('initLora: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform a=sqrt(5)), B = 0, the targeted modules only', () => {
  const cfg = validateTrainConfig({ r: 4, loraAlpha: 16, targetModules: ['q_proj', 'down_proj'] }, { spec: llamaSpec, maxLoraRank: 16 });
  const ad = initLora(llamaSpec, cfg.lora, 123);
  assert.equal(ad.modules.length, 2 * llamaSpec.numLayers);
  assert.deepEqual(ad.modules.slice(0, 2).map((m) => m.module), ['model.layers.0.self_attn.q_proj', 'model.layers.0.mlp.down_proj']);
  assert.equal(ad.scaling, 4);
  assert.deepEqual(ad.config.targetModules, ['q_proj', 'down_proj']);
  for (const m of ad.modules) {
    assert.equal(m.a.length, 4 * m.inFeatures);
    assert.equal(m.b.length, m.outFeatures * 4);
    assert.ok(m.b.every((x) => x === 0));
    const bound = 1 / Math.sqrt(m.inFeatures);
    assert.ok(m.a.every((x) => Math.abs(x) <= bound));
    // Uniform on [-bound, bound]: mean 0, variance bound^2 / 3 (loose: a few hundred samples).
    const mean = m.a.reduce((s, x) => s + x, 0) / m.a.length;
    const variance = m.a.reduce((s, x) => s + (x - mean) ** 2, 0) / m.a.length;
    assert.ok(Math.abs(mean) < 0.2 * bound, `mean ${mean}`);
    assert.ok(Math.abs(variance / (bound * bound / 3) - 1) < 0.25, `variance ratio ${variance / (bound * bound / 3)}`);
  }
  assert.equal(initLora(llamaSpec, { ...cfg.lora, useRslora: true }, 1).scaling, 8); // 16 / sqrt(4)
});

test('initLora is deterministic for a seed; another seed differs', () => {
  const lora = { r: 2, loraAlpha: 4, targetModules: ['c_attn', 'c_proj'], useRslora: false };
  const a = initLora(gpt2Spec, lora, 7);
  const b = initLora(gpt2Spec, lora, 7);
  const c = initLora(gpt2Spec, lora, 8);
  assert.deepEqual(a.modules, b.modules);
  assert.notDeepEqual(a.modules[0]!.a, c.modules[0]!.a);
  // gpt2's c_proj is both the attention output and the MLP output.
  const cProj = linearModules(gpt2Spec).filter((l) => l.peftName === 'c_proj').map((l) => l.module);
  assert.deepEqual(a.modules.filter((m) => m.module.endsWith('c_proj')).map((m) => m.module), cProj);
  const params = loraParams(a);
  assert.equal(params.length, 2 * a.modules.length);
  assert.equal(params[0]!.name, 'h.0.attn.c_attn.lora_A');
  assert.equal(params[0]!.value, a.modules[0]!.a); // a view: the optimizer updates the adapter in place
});
