/** Helpers shared by the model tests (not a test file itself). */
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/** The real stories260K checkpoint, read in place (never copied). */
export const STORIES260K = [
  process.env['LORAPLEX_STORIES260K'],
  '/work/shared/models/stories260K',
  new URL('../../../shared/models/stories260K', import.meta.url).pathname,
  new URL('../../../../shared/models/stories260K', import.meta.url).pathname,
].find((p): p is string => !!p && existsSync(join(p, 'config.json'))) ?? '/work/shared/models/stories260K';

export function tempDir(prefix: string): string {
  return mkdtempSync(join(tmpdir(), `loraplex-${prefix}-`));
}

export function removeDir(dir: string): void {
  rmSync(dir, { recursive: true, force: true });
}

export function writeJson(dir: string, file: string, value: unknown): void {
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, file), JSON.stringify(value, null, 2));
}

/** A deterministic pseudo-random float32 array in [-scale, scale). */
export function randomArray(n: number, seed: number, scale = 1): Float32Array {
  const out = new Float32Array(n);
  let s = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    out[i] = ((s >>> 0) / 2 ** 32 - 0.5) * 2 * scale;
  }
  return out;
}

export const LLAMA_CONFIG = {
  architectures: ['LlamaForCausalLM'],
  model_type: 'llama',
  hidden_size: 64,
  intermediate_size: 172,
  num_hidden_layers: 2,
  num_attention_heads: 4,
  num_key_value_heads: 2,
  vocab_size: 300,
  max_position_embeddings: 512,
  rms_norm_eps: 1e-5,
  rope_theta: 10000.0,
  rope_scaling: null,
  hidden_act: 'silu',
  tie_word_embeddings: false,
  bos_token_id: 1,
  eos_token_id: 2,
};

export const GPT2_CONFIG = {
  architectures: ['GPT2LMHeadModel'],
  model_type: 'gpt2',
  activation_function: 'gelu_new',
  n_embd: 32,
  n_layer: 2,
  n_head: 4,
  n_inner: null,
  n_positions: 64,
  layer_norm_epsilon: 1e-5,
  vocab_size: 300,
  bos_token_id: 299,
  eos_token_id: 299,
};
