import { existsSync, mkdirSync, readdirSync, unlinkSync } from 'node:fs';
import { join } from 'node:path';
import { readModelSpec } from './config.js';
import { expectedWeights } from './load.js';
import { type SafetensorsDtype, type TensorToWrite, writeFileAtomic, writeSafetensors, writeShardedSafetensors } from './safetensors.js';
import type { ModelSpec } from './spec.js';
import { makeSyntheticTokenizer, writeSyntheticTokenizer } from './synthetic-tokenizer.js';

/**
 * Random-weight models in the Hugging Face layout, so that tests and benchmarks exercise exactly the
 * loading path a real checkpoint takes.
 */

export type MakeArch = 'llama' | 'gpt2';
export type MakeSize = 'tiny' | 'small' | '1b';

export interface MakeModelOptions {
  arch: MakeArch;
  size: MakeSize;
  outDir: string;
  /** Same seed, same bytes. Default 0. */
  seed?: number;
  /** Default F32, BF16 for '1b' (about 2.2 GB). */
  dtype?: SafetensorsDtype;
  /** llama arch only: write a mistral or qwen2 config (qwen2 adds q/k/v biases). Default 'llama'. */
  modelType?: 'llama' | 'mistral' | 'qwen2';
  /** Default false for llama-arch models, true for gpt2 (their transformers defaults). */
  tieWordEmbeddings?: boolean;
  /** Add SIMPLE_CHAT_TEMPLATE to tokenizer_config.json. Default: only for llama tiny. */
  chatTemplate?: boolean;
  /** Weights larger than this are sharded. Default 2e9 bytes. */
  maxShardBytes?: number;
}

export interface MadeModel {
  dir: string;
  spec: ModelSpec;
  /** Weight file names written. */
  weightFiles: string[];
  parameters: number;
  bytes: number;
  seconds: number;
}

interface LlamaShape {
  hidden: number;
  layers: number;
  heads: number;
  kvHeads: number;
  intermediate: number;
  vocab: number;
  maxPositions: number;
}

const LLAMA: Record<MakeSize, LlamaShape> = {
  // 172 is deliberately not a multiple of 32: 4-bit block quantization must handle a partial last block.
  tiny: { hidden: 64, layers: 2, heads: 4, kvHeads: 2, intermediate: 172, vocab: 512, maxPositions: 512 },
  small: { hidden: 256, layers: 4, heads: 8, kvHeads: 4, intermediate: 688, vocab: 2048, maxPositions: 2048 },
  // TinyLlama-1.1B's shape.
  '1b': { hidden: 2048, layers: 22, heads: 32, kvHeads: 4, intermediate: 5632, vocab: 32000, maxPositions: 2048 },
};

const GPT2: Partial<Record<MakeSize, { embd: number; layers: number; heads: number; vocab: number; positions: number }>> = {
  tiny: { embd: 64, layers: 2, heads: 4, vocab: 512, positions: 256 },
  small: { embd: 256, layers: 4, heads: 8, vocab: 2048, positions: 1024 },
};

const TORCH_DTYPE: Record<SafetensorsDtype, string> = { F32: 'float32', F16: 'float16', BF16: 'bfloat16' };
const TRANSFORMERS_VERSION = '4.44.0';

/** Keys sorted, as transformers' to_json_string writes them. */
function sortedJson(obj: Record<string, unknown>): string {
  return JSON.stringify(Object.fromEntries(Object.keys(obj).sort().map((k) => [k, obj[k]])), null, 2) + '\n';
}

function llamaConfig(s: LlamaShape, modelType: 'llama' | 'mistral' | 'qwen2', tie: boolean, dtype: SafetensorsDtype): Record<string, unknown> {
  const arch = { llama: 'LlamaForCausalLM', mistral: 'MistralForCausalLM', qwen2: 'Qwen2ForCausalLM' }[modelType];
  const cfg: Record<string, unknown> = {
    architectures: [arch],
    attention_dropout: 0.0,
    bos_token_id: 1,
    eos_token_id: 2,
    hidden_act: 'silu',
    hidden_size: s.hidden,
    initializer_range: 0.02,
    intermediate_size: s.intermediate,
    max_position_embeddings: s.maxPositions,
    model_type: modelType,
    num_attention_heads: s.heads,
    num_hidden_layers: s.layers,
    num_key_value_heads: s.kvHeads,
    rms_norm_eps: 1e-5,
    rope_theta: 10000.0,
    tie_word_embeddings: tie,
    torch_dtype: TORCH_DTYPE[dtype],
    transformers_version: TRANSFORMERS_VERSION,
    use_cache: true,
    vocab_size: s.vocab,
  };
  if (modelType === 'llama') {
    Object.assign(cfg, { attention_bias: false, head_dim: s.hidden / s.heads, mlp_bias: false, pretraining_tp: 1, rope_scaling: null });
  } else if (modelType === 'mistral') {
    Object.assign(cfg, { head_dim: s.hidden / s.heads, sliding_window: null });
  } else {
    Object.assign(cfg, { max_window_layers: s.layers, sliding_window: s.maxPositions, use_sliding_window: false, rope_scaling: null });
  }
  return cfg;
}

function gpt2Config(g: NonNullable<(typeof GPT2)['tiny']>, tie: boolean, dtype: SafetensorsDtype): Record<string, unknown> {
  return {
    activation_function: 'gelu_new',
    architectures: ['GPT2LMHeadModel'],
    attn_pdrop: 0.1,
    bos_token_id: g.vocab - 1,
    embd_pdrop: 0.1,
    eos_token_id: g.vocab - 1,
    initializer_range: 0.02,
    layer_norm_epsilon: 1e-5,
    model_type: 'gpt2',
    n_embd: g.embd,
    n_head: g.heads,
    n_inner: null,
    n_layer: g.layers,
    n_positions: g.positions,
    reorder_and_upcast_attn: false,
    resid_pdrop: 0.1,
    scale_attn_by_inverse_layer_idx: false,
    scale_attn_weights: true,
    summary_activation: null,
    summary_first_dropout: 0.1,
    summary_proj_to_labels: true,
    summary_type: 'cls_index',
    summary_use_proj: true,
    tie_word_embeddings: tie,
    torch_dtype: TORCH_DTYPE[dtype],
    transformers_version: TRANSFORMERS_VERSION,
    use_cache: true,
    vocab_size: g.vocab,
  };
}

// ---- deterministic normal samples -------------------------------------------------------------------

/** Acklam's inverse normal CDF (relative error < 1.2e-9). */
function normalQuantile(p: number): number {
  const a = [-3.969683028665376e1, 2.209460984245205e2, -2.759285104469687e2, 1.38357751867269e2, -3.066479806614716e1, 2.506628277459239];
  const b = [-5.447609879822406e1, 1.615858368580409e2, -1.556989798598866e2, 6.680131188771972e1, -1.328068155288572e1];
  const c = [-7.784894002430293e-3, -3.223964580411365e-1, -2.400758277161838, -2.549732539343734, 4.374664141464968, 2.938163982698783];
  const d = [7.784695709041462e-3, 3.224671290700398e-1, 2.445134137142996, 3.754408661907416];
  const lo = 0.02425;
  if (p < lo) {
    const q = Math.sqrt(-2 * Math.log(p));
    return (((((c[0]! * q + c[1]!) * q + c[2]!) * q + c[3]!) * q + c[4]!) * q + c[5]!) / ((((d[0]! * q + d[1]!) * q + d[2]!) * q + d[3]!) * q + 1);
  }
  if (p > 1 - lo) return -normalQuantile(1 - p);
  const q = p - 0.5;
  const r = q * q;
  return ((((((a[0]! * r + a[1]!) * r + a[2]!) * r + a[3]!) * r + a[4]!) * r + a[5]!) * q) / (((((b[0]! * r + b[1]!) * r + b[2]!) * r + b[3]!) * r + b[4]!) * r + 1);
}

/**
 * 65536 equiprobable normal quantiles: one 32-bit random number gives two samples by table lookup, which
 * is what makes 1.1e9 parameters take seconds instead of minutes. The tails stop at about ±4.3 sigma,
 * which is irrelevant for random test weights.
 */
const NORMAL_TABLE = (() => {
  const t = new Float32Array(65536);
  for (let i = 0; i < 65536; i++) t[i] = normalQuantile((i + 0.5) / 65536);
  return t;
})();

/** FNV-1a over the string, for per-tensor seeds independent of write order. */
function hashString(s: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < s.length; i++) {
    h ^= s.charCodeAt(i);
    h = Math.imul(h, 0x01000193);
  }
  return h >>> 0;
}

function splitmix32(x: number): () => number {
  let s = x >>> 0;
  return () => {
    s = (s + 0x9e3779b9) | 0;
    let z = s;
    z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
    z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
    return (z ^ (z >>> 16)) >>> 0;
  };
}

/**
 * Fills `out` with mean + std * N(0, 1) from an sfc32 stream seeded by (seed, key). Deterministic: the
 * same seed and key always give the same values.
 */
export function fillNormal(out: Float32Array, seed: number, key: string, std: number, mean = 0): Float32Array {
  const init = splitmix32(hashString(`${seed}:${key}`) ^ Math.imul(seed | 0, 0x27d4eb2d));
  let a = init() | 0;
  let b = init() | 0;
  let c = init() | 0;
  let d = init() | 0;
  const table = NORMAL_TABLE;
  const n = out.length;
  for (let i = 0; i < n; i += 2) {
    const t = (((a + b) | 0) + d) | 0;
    d = (d + 1) | 0;
    a = b ^ (b >>> 9);
    b = (c + (c << 3)) | 0;
    c = ((c << 21) | (c >>> 11)) + t;
    c |= 0;
    out[i] = mean + std * table[t & 0xffff]!;
    if (i + 1 < n) out[i + 1] = mean + std * table[t >>> 16]!;
  }
  return out;
}

/** How a tensor of this name is initialized: norms near 1 (noisy so a missing scale shows), the rest N(0, 0.02). */
function initTensor(name: string, shape: number[], seed: number): Float32Array {
  const out = new Float32Array(shape.reduce((x, y) => x * y, 1));
  const isNorm = /(norm|ln_\d|ln_f)\.weight$/.test(name);
  return fillNormal(out, seed, name, 0.02, isNorm ? 1 : 0);
}

/** Removes weight files of a previous model in outDir, which would otherwise shadow or mix with the new one. */
function removeOldWeights(dir: string): void {
  if (!existsSync(dir)) return;
  for (const f of readdirSync(dir)) {
    if (/^model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$/.test(f)) unlinkSync(join(dir, f));
  }
}

/**
 * Writes a complete random-weight model directory (config.json, generation_config.json, weights,
 * tokenizer.json, tokenizer_config.json), one tensor at a time so that the 1b shape needs no more memory
 * than its largest tensor.
 */
export function makeModel(opts: MakeModelOptions): MadeModel {
  const start = performance.now();
  const seed = opts.seed ?? 0;
  const dtype = opts.dtype ?? (opts.size === '1b' ? 'BF16' : 'F32');
  const dir = opts.outDir;
  let config: Record<string, unknown>;
  let vocab: number;
  let maxPositions: number;
  if (opts.arch === 'llama') {
    const s = LLAMA[opts.size];
    config = llamaConfig(s, opts.modelType ?? 'llama', opts.tieWordEmbeddings ?? false, dtype);
    vocab = s.vocab;
    maxPositions = s.maxPositions;
  } else {
    const g = GPT2[opts.size];
    if (!g) throw new Error(`gpt2 has no '${opts.size}' size; available: ${Object.keys(GPT2).join(', ')}`);
    if (opts.modelType && opts.modelType !== 'llama') throw new Error('modelType applies to the llama arch only');
    config = gpt2Config(g, opts.tieWordEmbeddings ?? true, dtype);
    vocab = g.vocab;
    maxPositions = g.positions;
  }
  const tok = makeSyntheticTokenizer({
    kind: opts.arch,
    vocabSize: vocab,
    chatTemplate: opts.chatTemplate ?? (opts.arch === 'llama' && opts.size === 'tiny'),
    modelMaxLength: maxPositions,
  });
  const genConfig = {
    _from_model_config: true,
    bos_token_id: tok.bosTokenId,
    eos_token_id: tok.eosTokenId,
    transformers_version: TRANSFORMERS_VERSION,
  };

  mkdirSync(dir, { recursive: true });
  removeOldWeights(dir);
  writeFileAtomic(join(dir, 'config.json'), sortedJson(config));
  writeFileAtomic(join(dir, 'generation_config.json'), sortedJson(genConfig));
  writeSyntheticTokenizer(dir, tok);
  const spec = readModelSpec(dir);

  // The loader's own list of expected tensors: what we write is exactly what loadModelDir checks.
  const tensors: TensorToWrite[] = expectedWeights(spec).map(({ name, shape }) => {
    // GPT2LMHeadModel.save_pretrained prefixes the body with `transformer.`.
    const fileName = spec.family === 'gpt2' && name !== 'lm_head.weight' ? `transformer.${name}` : name;
    return { name: fileName, shape, data: () => initTensor(fileName, shape, seed) };
  });
  const parameters = tensors.reduce((n, t) => n + t.shape.reduce((x, y) => x * y, 1), 0);
  const bytes = parameters * (dtype === 'F32' ? 4 : 2);
  const maxShard = opts.maxShardBytes ?? 2e9;
  let weightFiles: string[];
  if (bytes > maxShard) {
    weightFiles = writeShardedSafetensors(dir, tensors, dtype, maxShard);
  } else {
    writeSafetensors(join(dir, 'model.safetensors'), tensors, dtype);
    weightFiles = ['model.safetensors'];
  }
  return { dir, spec, weightFiles, parameters, bytes, seconds: (performance.now() - start) / 1000 };
}
