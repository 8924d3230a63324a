import assert from 'node:assert/strict';
import { test } from 'node:test';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ModelFormatError, readModelSpec, readModelSpecWithNotes } from '../../src/models/config.js';
import { GPT2_CONFIG, LLAMA_CONFIG, STORIES260K, removeDir, tempDir, writeJson } from './fixtures.js';

/** A directory holding config.json (+ generation_config.json) only. */
function withConfig(config: unknown, gen?: unknown): string {
  const dir = tempDir('cfg');
  writeJson(dir, 'config.json', config);
  if (gen !== undefined) writeJson(dir, 'generation_config.json', gen);
  return dir;
}

function expectError(config: unknown, re: RegExp, gen?: unknown): void {
  const dir = withConfig(config, gen);
  try {
    assert.throws(
      () => readModelSpec(dir),
      (err: Error) => {
        assert.ok(err instanceof ModelFormatError, `not a ModelFormatError: ${err}`);
        assert.match(err.message, re);
        assert.ok(err.message.includes(dir), `message does not name the directory: ${err.message}`);
        return true;
      },
    );
  } finally {
    removeDir(dir);
  }
}

test('stories260K: llama spec, tied embeddings, eos union from generation_config', () => {
  const { spec, notes } = readModelSpecWithNotes(STORIES260K);
  assert.deepEqual(spec, {
    family: 'llama',
    modelType: 'llama',
    hiddenSize: 64,
    intermediateSize: 172,
    numLayers: 5,
    numHeads: 8,
    numKvHeads: 4,
    headDim: 8,
    vocabSize: 512,
    maxPositions: 512,
    normEps: 1e-5,
    ropeTheta: 10000,
    attentionBias: false,
    outputBias: false,
    mlpBias: false,
    hiddenAct: 'silu',
    tieWordEmbeddings: true,
    bosTokenId: 1,
    eosTokenIds: [2, 1],
  });
  assert.deepEqual(notes, []);
});

test('llama defaults: kv heads = heads, head_dim = hidden / heads, untied, no biases', () => {
  const { num_key_value_heads: _kv, rope_scaling: _rs, ...cfg } = LLAMA_CONFIG;
  const dir = withConfig({ ...cfg, tie_word_embeddings: undefined, eos_token_id: [2, 3] }, { eos_token_id: 2 });
  try {
    const spec = readModelSpec(dir);
    assert.equal(spec.numKvHeads, 4);
    assert.equal(spec.headDim, 16);
    assert.equal(spec.tieWordEmbeddings, false);
    assert.equal(spec.attentionBias, false);
    assert.deepEqual(spec.eosTokenIds, [2, 3]);
    assert.equal(spec.bosTokenId, 1);
  } finally {
    removeDir(dir);
  }
});

test('llama attention_bias covers q/k/v and o; mlp_bias the MLP', () => {
  const dir = withConfig({ ...LLAMA_CONFIG, attention_bias: true, mlp_bias: true, head_dim: 32 });
  try {
    const spec = readModelSpec(dir);
    assert.equal(spec.attentionBias, true);
    assert.equal(spec.outputBias, true);
    assert.equal(spec.mlpBias, true);
    assert.equal(spec.headDim, 32);
  } finally {
    removeDir(dir);
  }
});

test('qwen2: q/k/v bias, o_proj without; rope_theta read', () => {
  const dir = withConfig({ ...LLAMA_CONFIG, model_type: 'qwen2', rope_theta: 1000000.0, use_sliding_window: false, sliding_window: 64 });
  try {
    const { spec, notes } = readModelSpecWithNotes(dir);
    assert.equal(spec.family, 'llama');
    assert.equal(spec.modelType, 'qwen2');
    assert.equal(spec.attentionBias, true);
    assert.equal(spec.outputBias, false);
    assert.equal(spec.mlpBias, false);
    assert.equal(spec.ropeTheta, 1e6);
    assert.equal(spec.maxPositions, 512, 'use_sliding_window false: no clamp');
    assert.deepEqual(notes, []);
  } finally {
    removeDir(dir);
  }
});

test('mistral sliding_window smaller than max positions clamps the context and says so', () => {
  const dir = withConfig({ ...LLAMA_CONFIG, model_type: 'mistral', sliding_window: 128 });
  try {
    const { spec, notes } = readModelSpecWithNotes(dir);
    assert.equal(spec.maxPositions, 128);
    assert.equal(notes.length, 1);
    assert.match(notes[0]!, /sliding_window 128 < max_position_embeddings 512/);
  } finally {
    removeDir(dir);
  }
  const none = withConfig({ ...LLAMA_CONFIG, model_type: 'mistral', sliding_window: null });
  try {
    assert.equal(readModelSpec(none).maxPositions, 512);
  } finally {
    removeDir(none);
  }
});

test('gpt2: n_inner null = 4 * n_embd, tied by default, gelu_new, all biases', () => {
  const dir = withConfig(GPT2_CONFIG, { bos_token_id: 299, eos_token_id: 299 });
  try {
    const spec = readModelSpec(dir);
    assert.deepEqual(spec, {
      family: 'gpt2',
      modelType: 'gpt2',
      hiddenSize: 32,
      intermediateSize: 128,
      numLayers: 2,
      numHeads: 4,
      numKvHeads: 4,
      headDim: 8,
      vocabSize: 300,
      maxPositions: 64,
      normEps: 1e-5,
      ropeTheta: 0,
      attentionBias: true,
      outputBias: true,
      mlpBias: true,
      hiddenAct: 'gelu_new',
      tieWordEmbeddings: true,
      bosTokenId: 299,
      eosTokenIds: [299],
    });
  } finally {
    removeDir(dir);
  }
  const inner = withConfig({ ...GPT2_CONFIG, n_inner: 100, activation_function: 'gelu', tie_word_embeddings: false });
  try {
    const spec = readModelSpec(inner);
    assert.equal(spec.intermediateSize, 100);
    assert.equal(spec.hiddenAct, 'gelu');
    assert.equal(spec.tieWordEmbeddings, false);
  } finally {
    removeDir(inner);
  }
});

test('unsupported configurations give one clear ModelFormatError each', () => {
  expectError({ ...LLAMA_CONFIG, model_type: 'bert' }, /config\.json: model_type 'bert' is not supported; supported: llama, mistral, qwen2, gpt2/);
  expectError({ ...LLAMA_CONFIG, model_type: undefined }, /model_type is missing/);
  for (const type of ['linear', 'dynamic', 'llama3', 'yarn']) {
    expectError({ ...LLAMA_CONFIG, rope_scaling: { type, factor: 2 } }, new RegExp(`rope_scaling type "${type}" is not supported`));
    expectError({ ...LLAMA_CONFIG, rope_scaling: { rope_type: type, factor: 2 } }, new RegExp(`rope_scaling type "${type}" is not supported`));
  }
  expectError({ ...LLAMA_CONFIG, hidden_act: 'gelu' }, /hidden_act 'gelu' is not supported/);
  expectError({ ...LLAMA_CONFIG, hidden_size: undefined }, /config\.json: hidden_size is missing/);
  expectError({ ...LLAMA_CONFIG, num_key_value_heads: 3 }, /not a multiple of num_key_value_heads/);
  expectError({ ...LLAMA_CONFIG, vocab_size: 12.5 }, /vocab_size must be an integer/);
  expectError({ ...LLAMA_CONFIG, quantization_config: { quant_method: 'gptq' } }, /quantization_config \(gptq\) is not supported/);
  expectError({ ...GPT2_CONFIG, activation_function: 'relu' }, /activation_function 'relu' is not supported/);
  expectError({ ...GPT2_CONFIG, scale_attn_by_inverse_layer_idx: true }, /scale_attn_by_inverse_layer_idx/);
  expectError({ ...GPT2_CONFIG, n_embd: 30 }, /n_embd \(30\) is not a multiple of n_head \(4\)/);
  expectError(LLAMA_CONFIG, /generation_config\.json: eos_token_id must be a token id/, { eos_token_id: 'x' });
  expectError(LLAMA_CONFIG, /generation_config\.json: bos_token_id must be a single id/, { bos_token_id: [1, 2] });
});

test('missing or broken config.json', () => {
  const dir = tempDir('cfg');
  try {
    assert.throws(() => readModelSpec(dir), (err: Error) => err instanceof ModelFormatError && err.message === `model directory ${dir}: config.json is missing`);
    writeFileSync(join(dir, 'config.json'), '{"model_type": ');
    assert.throws(() => readModelSpec(dir), /config\.json: is not valid JSON/);
    writeJson(dir, 'config.json', LLAMA_CONFIG);
    writeFileSync(join(dir, 'generation_config.json'), 'nope');
    assert.throws(() => readModelSpec(dir), /generation_config\.json: is not valid JSON/);
  } finally {
    removeDir(dir);
  }
});

test('generation_config ids: list or number, union with config.json, out-of-vocab ids noted and dropped', () => {
  const dir = withConfig({ ...LLAMA_CONFIG, eos_token_id: 2, bos_token_id: 1 }, { bos_token_id: 5, eos_token_id: [7, 2, 9999] });
  try {
    const { spec, notes } = readModelSpecWithNotes(dir);
    assert.equal(spec.bosTokenId, 5);
    assert.deepEqual(spec.eosTokenIds, [7, 2]);
    assert.equal(notes.length, 1);
    assert.match(notes[0]!, /eos_token_id 9999 is outside the vocabulary/);
  } finally {
    removeDir(dir);
  }
  const none = withConfig({ ...LLAMA_CONFIG, eos_token_id: null, bos_token_id: null });
  try {
    const { spec, notes } = readModelSpecWithNotes(none);
    assert.equal(spec.bosTokenId, null);
    assert.deepEqual(spec.eosTokenIds, []);
    assert.match(notes.join('\n'), /no eos_token_id/);
  } finally {
    removeDir(none);
  }
});

test('transformers 5 rope_parameters', () => {
  const { rope_theta: _t, rope_scaling: _s, ...cfg } = LLAMA_CONFIG;
  const dir = withConfig({ ...cfg, rope_parameters: { rope_type: 'default', rope_theta: 500000 } });
  try {
    assert.equal(readModelSpec(dir).ropeTheta, 500000);
  } finally {
    removeDir(dir);
  }
  expectError({ ...cfg, rope_parameters: { rope_type: 'llama3', rope_theta: 500000, factor: 8 } }, /rope_scaling type "llama3" is not supported/);
});
