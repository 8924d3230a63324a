import assert from 'node:assert/strict';
import { modelName } from '../../src/models/model-name.js';
import { test } from 'node:test';
import { existsSync, mkdirSync, readdirSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import {
  linearModules,
  makeRandomAdapter,
  PeftFormatError,
  readPeftAdapter,
  writePeftAdapter,
  type PeftAdapter,
} from '../../src/adapters/peft.js';
import { readModelSpec } from '../../src/models/config.js';
import { makeModel } from '../../src/models/make.js';
import { f16ToF32, f32ToF16Bits, SafetensorsSource, type TensorToWrite, writeSafetensors } from '../../src/models/safetensors.js';
import type { ModelSpec } from '../../src/models/spec.js';
import { STORIES260K, removeDir, tempDir, writeJson } from '../models/fixtures.js';

const llama: ModelSpec = readModelSpec(STORIES260K);

function gpt2Spec(): ModelSpec {
  const dir = tempDir('peft-gpt2');
  try {
    return makeModel({ arch: 'gpt2', size: 'tiny', outDir: dir, seed: 1 }).spec;
  } finally {
    removeDir(dir);
  }
}
const gpt2 = gpt2Spec();

/** A PEFT-like adapter_config.json as peft 0.13 writes it. */
function peftConfig(over: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    alpha_pattern: {},
    auto_mapping: null,
    base_model_name_or_path: 'stories260K',
    bias: 'none',
    fan_in_fan_out: false,
    inference_mode: true,
    init_lora_weights: true,
    layer_replication: null,
    layers_pattern: null,
    layers_to_transform: null,
    loftq_config: {},
    lora_alpha: 16,
    lora_dropout: 0.05,
    megatron_config: null,
    megatron_core: 'megatron.core',
    modules_to_save: null,
    peft_type: 'LORA',
    r: 4,
    rank_pattern: {},
    revision: null,
    target_modules: ['q_proj', 'v_proj'],
    task_type: 'CAUSAL_LM',
    use_dora: false,
    use_rslora: false,
    ...over,
  };
}

/** Writes an adapter dir by hand: config + the given tensors. */
function handWritten(config: Record<string, unknown>, tensors: TensorToWrite[], dtype: 'F32' | 'F16' | 'BF16' = 'F32'): string {
  const dir = tempDir('peft');
  writeJson(dir, 'adapter_config.json', config);
  writeSafetensors(join(dir, 'adapter_model.safetensors'), tensors, dtype);
  return dir;
}

function loraTensors(path: string, r: number, inF: number, outF: number, infix = ''): TensorToWrite[] {
  const a = Float32Array.from({ length: r * inF }, (_, i) => ((i % 7) - 3) / 8);
  const b = Float32Array.from({ length: outF * r }, (_, i) => ((i % 5) - 2) / 16);
  return [
    { name: `base_model.model.${path}.lora_A${infix}.weight`, shape: [r, inF], data: a },
    { name: `base_model.model.${path}.lora_B${infix}.weight`, shape: [outF, r], data: b },
  ];
}

function expectError(dir: string, re: RegExp, spec?: ModelSpec): void {
  try {
    assert.throws(
      () => readPeftAdapter(dir, spec),
      (err: Error) => {
        assert.ok(err instanceof PeftFormatError, `not a PeftFormatError: ${err}`);
        assert.match(err.message, re);
        assert.ok(err.message.includes(dir));
        return true;
      },
    );
  } finally {
    removeDir(dir);
  }
}

test('linearModules lists every LoRA-able linear with PEFT in/out features', () => {
  const l = linearModules(llama);
  assert.equal(l.length, 5 * 7);
  assert.deepEqual(l.slice(0, 7).map((m) => [m.module, m.peftName, m.inFeatures, m.outFeatures]), [
    ['model.layers.0.self_attn.q_proj', 'q_proj', 64, 64],
    ['model.layers.0.self_attn.k_proj', 'k_proj', 64, 32],
    ['model.layers.0.self_attn.v_proj', 'v_proj', 64, 32],
    ['model.layers.0.self_attn.o_proj', 'o_proj', 64, 64],
    ['model.layers.0.mlp.gate_proj', 'gate_proj', 64, 172],
    ['model.layers.0.mlp.up_proj', 'up_proj', 64, 172],
    ['model.layers.0.mlp.down_proj', 'down_proj', 172, 64],
  ]);
  const g = linearModules(gpt2);
  assert.deepEqual(g.slice(0, 4).map((m) => [m.module, m.peftName, m.inFeatures, m.outFeatures]), [
    ['h.0.attn.c_attn', 'c_attn', 64, 192],
    ['h.0.attn.c_proj', 'c_proj', 64, 64],
    ['h.0.mlp.c_fc', 'c_fc', 64, 256],
    ['h.0.mlp.c_proj', 'c_proj', 256, 64],
  ]);
});

function assertSameAdapter(got: PeftAdapter, want: PeftAdapter, dtype: 'F32' | 'F16' = 'F32'): void {
  assert.equal(got.r, want.r);
  assert.equal(got.alpha, want.alpha);
  assert.equal(got.scaling, want.scaling);
  assert.deepEqual(got.config.targetModules, want.config.targetModules);
  assert.deepEqual(got.modules.map((m) => m.module), want.modules.map((m) => m.module));
  const round = (x: Float32Array) => {
    if (dtype === 'F32') return x;
    const out = new Float32Array(x.length);
    f16ToF32(Uint16Array.from(x, (v) => f32ToF16Bits(v)), out);
    return out;
  };
  got.modules.forEach((m, i) => {
    const w = want.modules[i]!;
    assert.deepEqual([m.r, m.inFeatures, m.outFeatures], [w.r, w.inFeatures, w.outFeatures]);
    assert.deepEqual(m.a, round(w.a));
    assert.deepEqual(m.b, round(w.b));
  });
}

test('makeRandomAdapter -> writePeftAdapter -> readPeftAdapter round-trips (llama, F32 and F16)', () => {
  const root = tempDir('peft');
  try {
    const adapter = makeRandomAdapter(llama, { r: 8, alpha: 16, targetModules: ['q_proj', 'v_proj', 'down_proj'], seed: 3, bStd: 0.05 });
    assert.equal(adapter.modules.length, 15);
    assert.equal(adapter.scaling, 2);
    assert.ok(adapter.modules.every((m) => m.b.some((v) => v !== 0)), 'B is non-zero');
    const dir = join(root, 'a');
    writePeftAdapter(dir, adapter);
    assert.deepEqual(readdirSync(root), ['a'], 'no temp dirs left');
    assert.deepEqual(readdirSync(dir).sort(), ['adapter_config.json', 'adapter_model.safetensors']);
    const names = new SafetensorsSource([join(dir, 'adapter_model.safetensors')]).names();
    assert.ok(names.includes('base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'));
    const cfg = JSON.parse(readFileSync(join(dir, 'adapter_config.json'), 'utf8'));
    assert.equal(cfg.peft_type, 'LORA');
    assert.equal(cfg.r, 8);
    assert.equal(cfg.fan_in_fan_out, false);
    assertSameAdapter(readPeftAdapter(dir, llama), adapter);
    assertSameAdapter(readPeftAdapter(dir), adapter);

    // Overwriting an existing adapter replaces it whole.
    const other = makeRandomAdapter(llama, { r: 2, alpha: 4, targetModules: ['o_proj'], seed: 4, useRslora: true });
    writePeftAdapter(dir, other, { dtype: 'F16' });
    assert.deepEqual(readdirSync(root), ['a']);
    const back = readPeftAdapter(dir, llama);
    assert.equal(back.scaling, 4 / Math.sqrt(2));
    assertSameAdapter(back, other, 'F16');

    // Deterministic.
    const again = makeRandomAdapter(llama, { r: 8, alpha: 16, targetModules: ['q_proj', 'v_proj', 'down_proj'], seed: 3, bStd: 0.05 });
    assertSameAdapter(again, adapter);
  } finally {
    removeDir(root);
  }
});

test('gpt2 adapters: transformer.-prefixed keys, Conv1D features, all-linear', () => {
  const root = tempDir('peft');
  try {
    const adapter = makeRandomAdapter(gpt2, { r: 4, alpha: 8, targetModules: ['all-linear'], seed: 1 });
    assert.equal(adapter.modules.length, 2 * 4);
    writePeftAdapter(join(root, 'g'), adapter);
    const names = new SafetensorsSource([join(root, 'g', 'adapter_model.safetensors')]).names();
    assert.ok(names.includes('base_model.model.transformer.h.1.mlp.c_proj.lora_B.weight'));
    assert.equal(JSON.parse(readFileSync(join(root, 'g', 'adapter_config.json'), 'utf8')).fan_in_fan_out, true);
    const back = readPeftAdapter(join(root, 'g'), gpt2);
    assertSameAdapter(back, adapter);
    assert.deepEqual(back.modules.map((m) => m.module).slice(0, 4), ['h.0.attn.c_attn', 'h.0.attn.c_proj', 'h.0.mlp.c_fc', 'h.0.mlp.c_proj']);
    // The same adapter against a llama base is rejected.
    assert.throws(() => readPeftAdapter(join(root, 'g'), llama), /target_modules entry 'c_attn' is not supported/);
  } finally {
    removeDir(root);
  }
  // Unprefixed gpt2 keys (h.0...) are accepted too, with fan_in_fan_out either way (PEFT fixes it per layer).
  const dir = handWritten(peftConfig({ target_modules: ['c_attn'], fan_in_fan_out: false }), loraTensors('h.0.attn.c_attn', 4, 64, 192));
  try {
    const a = readPeftAdapter(dir, gpt2);
    assert.deepEqual(a.modules.map((m) => m.module), ['h.0.attn.c_attn']);
  } finally {
    removeDir(dir);
  }
});

test('PEFT key variants: .default adapter name, BF16 tensors, target_modules as a regex string', () => {
  const dir = handWritten(
    peftConfig({ target_modules: '.*\\.(q_proj|v_proj)', use_rslora: true, lora_alpha: 8 }),
    [...loraTensors('model.layers.3.self_attn.q_proj', 4, 64, 64, '.default'), ...loraTensors('model.layers.1.self_attn.v_proj', 4, 64, 32, '.default')],
    'BF16',
  );
  try {
    const a = readPeftAdapter(dir, llama);
    assert.equal(a.scaling, 8 / 2);
    assert.equal(a.config.targetModules, '.*\\.(q_proj|v_proj)');
    assert.equal(a.config.baseModelNameOrPath, 'stories260K');
    assert.deepEqual(a.modules.map((m) => m.module), ['model.layers.1.self_attn.v_proj', 'model.layers.3.self_attn.q_proj'], 'layer order');
    const m = a.modules[1]!;
    assert.deepEqual([m.r, m.inFeatures, m.outFeatures, m.a.length, m.b.length], [4, 64, 64, 256, 256]);
    assert.equal(m.a[1], -2 / 8, 'exact in bf16');
  } finally {
    removeDir(dir);
  }
});

test('unsupported adapter_config options are named', () => {
  const q = () => loraTensors('model.layers.0.self_attn.q_proj', 4, 64, 64);
  expectError(handWritten(peftConfig({ use_dora: true }), q()), /adapter_config\.json: use_dora true \(DoRA\) is not supported/);
  expectError(handWritten(peftConfig({ modules_to_save: ['lm_head'] }), q()), /modules_to_save \["lm_head"\] is not supported/);
  expectError(handWritten(peftConfig({ rank_pattern: { q_proj: 8 } }), q()), /rank_pattern .* is not supported/);
  expectError(handWritten(peftConfig({ alpha_pattern: { q_proj: 8 } }), q()), /alpha_pattern .* is not supported/);
  expectError(handWritten(peftConfig({ layers_to_transform: [0] }), q()), /layers_to_transform \[0\] is not supported/);
  expectError(handWritten(peftConfig({ bias: 'lora_only' }), q()), /bias 'lora_only' is not supported/);
  expectError(handWritten(peftConfig({ peft_type: 'IA3' }), q()), /peft_type 'IA3' is not supported/);
  expectError(handWritten(peftConfig({ task_type: 'SEQ_CLS' }), q()), /task_type 'SEQ_CLS' is not supported/);
  expectError(handWritten(peftConfig({ init_lora_weights: 'loftq' }), q()), /loftq/);
  expectError(handWritten(peftConfig({ target_modules: ['q_proj', 'lm_head'] }), q()), /target_modules entry 'lm_head' is not supported/);
  expectError(handWritten(peftConfig({ r: 0 }), q()), /r must be a positive integer/);
  expectError(handWritten(peftConfig({ target_modules: [] }), q()), /target_modules must be/);
});

test('malformed adapter tensors are named', () => {
  const q = (r = 4, inF = 64, outF = 64, path = 'model.layers.0.self_attn.q_proj') => loraTensors(path, r, inF, outF);
  // Shapes from another model.
  expectError(handWritten(peftConfig(), q(4, 128, 128)), /imply 128 -> 128 features, but the base model's model\.layers\.0\.self_attn\.q_proj is 64 -> 64/, llama);
  // Transposed B.
  const t = q();
  t[1] = { ...t[1]!, shape: [4, 64] };
  expectError(handWritten(peftConfig(), t), /disagree on the rank|rank/);
  // Rank different from r.
  expectError(handWritten(peftConfig({ r: 8 }), q()), /has rank 4, but adapter_config\.json says r = 8/);
  // Layer beyond the model.
  expectError(handWritten(peftConfig(), q(4, 64, 64, 'model.layers.9.self_attn.q_proj')), /does not exist in the base model \(5 layers\)/, llama);
  // Missing half.
  expectError(handWritten(peftConfig(), [q()[0]!]), /has lora_A but no lora_B/);
  // Not in target_modules.
  expectError(handWritten(peftConfig({ target_modules: ['v_proj'] }), q()), /not in target_modules/);
  // Unsupported module kinds and stray tensors.
  expectError(handWritten(peftConfig(), [{ name: 'base_model.model.model.embed_tokens.lora_embedding_A', shape: [4, 512], data: new Float32Array(2048) }]), /LoRA on embeddings is not supported/);
  expectError(handWritten(peftConfig(), [...q(), { name: 'base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector', shape: [64], data: new Float32Array(64) }]), /DoRA/);
  expectError(handWritten(peftConfig(), loraTensors('model.layers.0.self_attn.qkv_proj', 4, 64, 64)), /not a supported LoRA target/);
  expectError(handWritten(peftConfig(), [...q(), ...loraTensors('model.layers.0.self_attn.v_proj', 4, 64, 32, '.other')]), /more than one adapter name/);
  // NaN / Inf.
  const nan = q();
  (nan[1]!.data as Float32Array)[5] = NaN;
  expectError(handWritten(peftConfig(), nan), /lora_B holds a non-finite value \(NaN\) at index 5/);
  const inf = q();
  (inf[0]!.data as Float32Array)[0] = Infinity;
  expectError(handWritten(peftConfig(), inf, 'F16'), /lora_A holds a non-finite value \(Infinity\)/);
});

test('missing files are clear errors', () => {
  const dir = tempDir('peft');
  expectError(dir, /adapter_config\.json is missing/);
  const d2 = tempDir('peft');
  writeJson(d2, 'adapter_config.json', peftConfig());
  writeFileSync(join(d2, 'adapter_model.bin'), 'x');
  expectError(d2, /adapter_model\.safetensors is missing \(adapter_model\.bin found; only safetensors is supported\)/);
  const d3 = tempDir('peft');
  writeFileSync(join(d3, 'adapter_config.json'), '{');
  expectError(d3, /adapter_config\.json: is not valid JSON/);
  assert.ok(!existsSync(dir));
});

test('makeRandomAdapter rejects modules the family does not have', () => {
  assert.throws(() => makeRandomAdapter(llama, { r: 4, alpha: 8, targetModules: ['c_attn'], seed: 1 }), /not a llama linear/);
  assert.throws(() => makeRandomAdapter(gpt2, { r: 0, alpha: 8, targetModules: ['c_attn'], seed: 1 }), /positive integer/);
});

test('base_model_name_or_path is the model\'s name, as PEFT writes it, never the path given', () => {
  // No _name_or_path (llama2.c's export): the directory's name, through ., .. and symlinks.
  assert.equal(modelName(STORIES260K), 'stories260K');
  assert.equal(modelName(`${STORIES260K}/./`), 'stories260K');
  const root = tempDir('peft-name');
  const link = join(root, 'current');
  symlinkSync(STORIES260K, link);
  assert.equal(modelName(link), 'stories260K');
  // transformers' save_pretrained writes the hub id it was loaded from.
  const saved = join(root, 'my-finetune');
  mkdirSync(saved);
  writeJson(saved, 'config.json', { model_type: 'llama', _name_or_path: 'TinyLlama/TinyLlama-1.1B-Chat-v1.0' });
  assert.equal(modelName(saved), 'TinyLlama/TinyLlama-1.1B-Chat-v1.0');
  // A local path in _name_or_path names nothing another machine can load: the directory's name instead.
  writeJson(saved, 'config.json', { model_type: 'llama', _name_or_path: '/home/me/models/base' });
  assert.equal(modelName(saved), 'my-finetune');
  // A snapshot in the hub cache: the repo id its path spells.
  const snapshot = join(root, 'hub', 'models--Qwen--Qwen2.5-0.5B', 'snapshots', '0123abcd');
  mkdirSync(snapshot, { recursive: true });
  writeJson(snapshot, 'config.json', { model_type: 'qwen2' });
  assert.equal(modelName(snapshot), 'Qwen/Qwen2.5-0.5B');
});
