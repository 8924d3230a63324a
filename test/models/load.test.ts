import assert from 'node:assert/strict';
import { test } from 'node:test';
import { copyFileSync, readdirSync, renameSync, unlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ModelFormatError } from '../../src/models/config.js';
import { contentKey, contentKeyAsync, expectedWeights, loadModelDir } from '../../src/models/load.js';
import { makeModel } from '../../src/models/make.js';
import { SafetensorsSource, type TensorToWrite, writeSafetensors } from '../../src/models/safetensors.js';
import { STORIES260K, removeDir, tempDir, writeJson } from './fixtures.js';

/** Rewrites dir/model.safetensors through `edit` (rename, drop, add or reshape tensors). */
function rewriteWeights(dir: string, edit: (tensors: TensorToWrite[]) => TensorToWrite[]): void {
  const src = new SafetensorsSource([join(dir, 'model.safetensors')]);
  const tensors = src.names().map((name) => ({ name, ...src.get(name) }));
  writeSafetensors(join(dir, 'model.safetensors'), edit(tensors), 'F32');
}

function expectLoadError(dir: string, re: RegExp): void {
  assert.throws(
    () => loadModelDir(dir),
    (err: Error) => err instanceof ModelFormatError && re.test(err.message) && err.message.includes(dir),
  );
}

test('stories260K loads: spec, every expected weight, tied lm_head tolerated', () => {
  const m = loadModelDir(STORIES260K);
  assert.equal(m.spec.numLayers, 5);
  assert.deepEqual(m.notes, []);
  assert.equal(m.weightFiles.length, 1);
  assert.equal(m.tokenizerFile, join(STORIES260K, 'tokenizer.json'));
  const expected = expectedWeights(m.spec);
  assert.equal(expected.length, 1 + 5 * 9 + 1, 'tied: no lm_head expected');
  for (const { name, shape } of expected) assert.deepEqual(m.weights.shape(name), shape, name);
  assert.deepEqual(m.weights.get('model.norm.weight').shape, [64]);
});

test('missing tensors, wrong shapes and unexpected tensors are named', () => {
  const dir = tempDir('load');
  try {
    makeModel({ arch: 'llama', size: 'tiny', outDir: dir, seed: 1 });
    loadModelDir(dir);
    rewriteWeights(dir, (ts) => ts.filter((t) => t.name !== 'lm_head.weight' && t.name !== 'model.layers.1.mlp.up_proj.weight'));
    expectLoadError(dir, /missing 2 tensor\(s\): model\.layers\.1\.mlp\.up_proj\.weight; lm_head\.weight/);

    makeModel({ arch: 'llama', size: 'tiny', outDir: dir, seed: 1 });
    rewriteWeights(dir, (ts) => ts.map((t) => (t.name === 'model.layers.0.self_attn.k_proj.weight' ? { ...t, shape: [64, 32] } : t)));
    expectLoadError(dir, /wrong shapes: model\.layers\.0\.self_attn\.k_proj\.weight is \[64,32\], expected \[32,64\]/);

    makeModel({ arch: 'llama', size: 'tiny', outDir: dir, seed: 1 });
    rewriteWeights(dir, (ts) => [...ts, { name: 'model.layers.0.self_attn.q_proj.bias', shape: [64], data: new Float32Array(64) }]);
    expectLoadError(dir, /does not account for .*model\.layers\.0\.self_attn\.q_proj\.bias/);

    makeModel({ arch: 'llama', size: 'tiny', outDir: dir, seed: 1 });
    rewriteWeights(dir, (ts) => [...ts, { name: 'model.layers.2.input_layernorm.weight', shape: [64], data: new Float32Array(64) }]);
    expectLoadError(dir, /num_hidden_layers 2.*model\.layers\.2\.input_layernorm\.weight/);
  } finally {
    removeDir(dir);
  }
});

test('qwen2-style model: q/k/v biases are required and loaded', () => {
  const dir = tempDir('load');
  try {
    makeModel({ arch: 'llama', size: 'tiny', modelType: 'qwen2', outDir: dir, seed: 2 });
    const m = loadModelDir(dir);
    assert.equal(m.spec.attentionBias, true);
    assert.deepEqual(m.weights.shape('model.layers.0.self_attn.k_proj.bias'), [32]);
    assert.ok(!m.weights.has('model.layers.0.self_attn.o_proj.bias'));
    rewriteWeights(dir, (ts) => ts.filter((t) => t.name !== 'model.layers.1.self_attn.v_proj.bias'));
    expectLoadError(dir, /missing 1 tensor\(s\): model\.layers\.1\.self_attn\.v_proj\.bias/);
  } finally {
    removeDir(dir);
  }
});

test('gpt2 weights load with or without the transformer. prefix, under the stripped names', () => {
  const dir = tempDir('load');
  try {
    makeModel({ arch: 'gpt2', size: 'tiny', outDir: dir, seed: 4 });
    const prefixed = loadModelDir(dir);
    assert.ok(new SafetensorsSource([join(dir, 'model.safetensors')]).has('transformer.h.0.attn.c_attn.weight'));
    assert.ok(prefixed.weights.has('h.0.attn.c_attn.weight'));
    assert.ok(!prefixed.weights.has('transformer.h.0.attn.c_attn.weight'));
    assert.deepEqual(prefixed.weights.shape('h.1.attn.c_attn.weight'), [64, 192], 'Conv1D [in, out]');
    assert.deepEqual(prefixed.weights.shape('h.0.mlp.c_fc.weight'), [64, 256]);
    const wte = prefixed.weights.get('wte.weight');

    rewriteWeights(dir, (ts) => ts.map((t) => ({ ...t, name: t.name.replace(/^transformer\./, '') })));
    const plain = loadModelDir(dir);
    assert.deepEqual(plain.weights.names().sort(), prefixed.weights.names().sort());
    assert.deepEqual(plain.weights.get('wte.weight').data, wte.data);

    rewriteWeights(dir, (ts) => [...ts, { name: 'transformer.wte.weight', shape: [512, 64], data: wte.data }]);
    expectLoadError(dir, /both wte\.weight and transformer\.wte\.weight/);
  } finally {
    removeDir(dir);
  }
});

test('missing tokenizer.json, non-safetensors weights and missing weights are clear errors', () => {
  const dir = tempDir('load');
  try {
    makeModel({ arch: 'llama', size: 'tiny', outDir: dir, seed: 1 });
    renameSync(join(dir, 'tokenizer.json'), join(dir, 'tok.json'));
    expectLoadError(dir, /tokenizer\.json is missing/);
    renameSync(join(dir, 'tok.json'), join(dir, 'tokenizer.json'));
    renameSync(join(dir, 'model.safetensors'), join(dir, 'pytorch_model.bin'));
    expectLoadError(dir, /model\.safetensors \(or model\.safetensors\.index\.json\) is missing; found pytorch_model\.bin, but only safetensors weights are supported/);
    unlinkSync(join(dir, 'pytorch_model.bin'));
    writeFileSync(join(dir, 'model.safetensors'), Buffer.alloc(4));
    expectLoadError(dir, /too short for a safetensors header/);
    expectLoadError(join(dir, 'nope'), /is not a directory/);
  } finally {
    removeDir(dir);
  }
});

test('sharded checkpoints load; contentKey covers configs and every shard', async () => {
  const dir = tempDir('load');
  try {
    const made = makeModel({ arch: 'llama', size: 'tiny', outDir: dir, seed: 5, maxShardBytes: 200_000 });
    assert.ok(made.weightFiles.length >= 3, `${made.weightFiles.length} shards`);
    assert.ok(!readdirSync(dir).includes('model.safetensors'));
    const m = loadModelDir(dir);
    assert.equal(m.weightFiles.length, made.weightFiles.length);

    const key = contentKey(dir);
    assert.match(key, /^[0-9a-f]{64}$/);
    assert.equal(contentKey(dir), key, 'stable');
    assert.equal(await contentKeyAsync(dir), key, 'async agrees');

    // Same seed elsewhere: same bytes, same key. Different seed: different key.
    const twin = join(dir, 'twin');
    makeModel({ arch: 'llama', size: 'tiny', outDir: twin, seed: 5, maxShardBytes: 200_000 });
    assert.equal(contentKey(twin), key);
    makeModel({ arch: 'llama', size: 'tiny', outDir: twin, seed: 6, maxShardBytes: 200_000 });
    assert.notEqual(contentKey(twin), key);

    // One flipped byte in the last shard changes the key; so does generation_config.json.
    makeModel({ arch: 'llama', size: 'tiny', outDir: twin, seed: 5, maxShardBytes: 200_000 });
    const last = join(twin, made.weightFiles.at(-1)!);
    copyFileSync(last, `${last}.bak`);
    const { openSync, writeSync, closeSync, statSync } = await import('node:fs');
    const fd = openSync(last, 'r+');
    writeSync(fd, Buffer.from([0x42]), 0, 1, statSync(last).size - 1);
    closeSync(fd);
    assert.notEqual(contentKey(twin), key);
    renameSync(`${last}.bak`, last);
    assert.equal(contentKey(twin), key);
    writeJson(twin, 'generation_config.json', { bos_token_id: 1, eos_token_id: [2] });
    assert.notEqual(contentKey(twin), key);
  } finally {
    removeDir(dir);
  }
});

test('contentKey of stories260K', () => {
  const key = contentKey(STORIES260K);
  assert.match(key, /^[0-9a-f]{64}$/);
  assert.equal(contentKey(STORIES260K), key);
});

test('contentKey speed on 64 MB (set LORAPLEX_CONTENTKEY_MB for more)', (t) => {
  const mb = Number(process.env['LORAPLEX_CONTENTKEY_MB'] ?? 64);
  const dir = tempDir('load');
  try {
    makeModel({ arch: 'llama', size: 'tiny', outDir: dir, seed: 1 });
    const n = (mb * 1024 * 1024) / 4;
    writeSafetensors(join(dir, 'model.safetensors'), [{ name: 'x', shape: [n], data: () => new Float32Array(n) }], 'F32');
    const start = performance.now();
    contentKey(dir);
    const s = (performance.now() - start) / 1000;
    t.diagnostic(`contentKey: ${mb} MB in ${s.toFixed(3)} s = ${(mb / 1024 / s).toFixed(2)} GB/s`);
  } finally {
    removeDir(dir);
  }
});
