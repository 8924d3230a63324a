import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { ModelSpec } from './spec.js';

/** model_type values loraplex runs; mistral and qwen2 share llama's graph. */
export const SUPPORTED_MODEL_TYPES = ['llama', 'mistral', 'qwen2', 'gpt2'] as const;

/**
 * Anything about a model directory loraplex cannot serve. The message always names the directory and,
 * where there is one, the file, so that one error says where to look and what to change.
 */
export class ModelFormatError extends Error {
  constructor(
    readonly dir: string,
    readonly file: string | null,
    readonly detail: string,
  ) {
    super(file ? `model directory ${dir}: ${file}: ${detail}` : `model directory ${dir}: ${detail}`);
    this.name = 'ModelFormatError';
  }
}

export interface ModelSpecWithNotes {
  spec: ModelSpec;
  /** Things loraplex changed or chose that an operator should know (e.g. a clamped context length). */
  notes: string[];
}

type Json = Record<string, unknown>;

/** Reads a JSON object file; `required` false returns null when the file is absent. */
export function readJsonFile(dir: string, file: string, required: boolean): Json | null {
  const path = join(dir, file);
  if (!existsSync(path)) {
    if (required) throw new ModelFormatError(dir, null, `${file} is missing`);
    return null;
  }
  let value: unknown;
  try {
    value = JSON.parse(readFileSync(path, 'utf8'));
  } catch (err) {
    throw new ModelFormatError(dir, file, `is not valid JSON (${(err as Error).message})`);
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw new ModelFormatError(dir, file, 'is not a JSON object');
  }
  return value as Json;
}

/** Field readers that turn a bad or missing value into one ModelFormatError naming the key. */
class Fields {
  constructor(
    private readonly dir: string,
    private readonly file: string,
    private readonly cfg: Json,
  ) {}

  /** A present, non-null value (null counts as absent, as transformers treats it). */
  has(key: string): boolean {
    return this.cfg[key] !== undefined && this.cfg[key] !== null;
  }

  raw(key: string): unknown {
    return this.cfg[key];
  }

  fail(detail: string): never {
    throw new ModelFormatError(this.dir, this.file, detail);
  }

  int(key: string, fallback?: number, min = 1): number {
    if (!this.has(key)) {
      if (fallback !== undefined) return fallback;
      this.fail(`${key} is missing`);
    }
    const v = this.cfg[key];
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min) {
      this.fail(`${key} must be an integer >= ${min}, got ${JSON.stringify(v)}`);
    }
    return v;
  }

  num(key: string, fallback?: number): number {
    if (!this.has(key)) {
      if (fallback !== undefined) return fallback;
      this.fail(`${key} is missing`);
    }
    const v = this.cfg[key];
    if (typeof v !== 'number' || !Number.isFinite(v) || v <= 0) this.fail(`${key} must be a positive number, got ${JSON.stringify(v)}`);
    return v;
  }

  bool(key: string, fallback: boolean): boolean {
    if (!this.has(key)) return fallback;
    const v = this.cfg[key];
    if (typeof v !== 'boolean') this.fail(`${key} must be true or false, got ${JSON.stringify(v)}`);
    return v;
  }

  str(key: string, fallback: string): string {
    if (!this.has(key)) return fallback;
    const v = this.cfg[key];
    if (typeof v !== 'string') this.fail(`${key} must be a string, got ${JSON.stringify(v)}`);
    return v;
  }

  /** A token id or list of ids (eos_token_id may be either); null/absent is the empty list. */
  ids(key: string): number[] {
    if (!this.has(key)) return [];
    const v = this.cfg[key];
    const list = Array.isArray(v) ? v : [v];
    for (const id of list) {
      if (typeof id !== 'number' || !Number.isSafeInteger(id) || id < 0) {
        this.fail(`${key} must be a token id or a list of token ids, got ${JSON.stringify(v)}`);
      }
    }
    return list as number[];
  }
}

/** Options that change the math in ways the engine does not implement: one error names the first found. */
function rejectCommon(f: Fields): void {
  if (f.has('quantization_config')) {
    const method = (f.raw('quantization_config') as Json | null)?.['quant_method'];
    f.fail(
      `quantization_config (${String(method ?? 'unknown method')}) is not supported: loraplex quantizes ` +
        'full-precision (F32/F16/BF16) weights itself; use the unquantized checkpoint',
    );
  }
}

/** rope_scaling null/absent or of type 'default' is plain RoPE; everything else would be silently wrong. */
function checkRope(f: Fields): number {
  // transformers >= 5 moves theta and scaling into rope_parameters.
  const params = f.raw('rope_parameters') as Json | null | undefined;
  for (const [key, value] of [
    ['rope_scaling', f.raw('rope_scaling')],
    ['rope_parameters', params],
  ] as const) {
    if (value === undefined || value === null) continue;
    if (typeof value !== 'object') f.fail(`${key} must be an object or null, got ${JSON.stringify(value)}`);
    const v = value as Json;
    const type = v['rope_type'] ?? v['type'] ?? 'default';
    if (type !== 'default') {
      f.fail(`rope_scaling type ${JSON.stringify(type)} is not supported (only plain RoPE, rope_scaling null)`);
    }
  }
  if (params && typeof params['rope_theta'] === 'number' && !f.has('rope_theta')) {
    const theta = params['rope_theta'];
    if (!(theta > 0)) f.fail(`rope_parameters.rope_theta must be positive, got ${theta}`);
    return theta;
  }
  return f.num('rope_theta', 10000);
}

function llamaSpec(f: Fields, modelType: string, notes: string[]): ModelSpec {
  const hidden = f.int('hidden_size');
  const heads = f.int('num_attention_heads');
  const kvHeads = f.int('num_key_value_heads', heads);
  if (heads % kvHeads !== 0) f.fail(`num_attention_heads (${heads}) is not a multiple of num_key_value_heads (${kvHeads})`);
  let headDim: number;
  if (f.has('head_dim')) headDim = f.int('head_dim');
  else {
    if (hidden % heads !== 0) f.fail(`hidden_size (${hidden}) is not a multiple of num_attention_heads (${heads}) and head_dim is not given`);
    headDim = hidden / heads;
  }
  if (headDim % 2 !== 0) f.fail(`head_dim ${headDim} is odd; rotary embeddings need an even head_dim`);
  const act = f.str('hidden_act', 'silu');
  // transformers' ACT2FN maps "swish" to the same SiLU.
  if (act !== 'silu' && act !== 'swish') f.fail(`hidden_act '${act}' is not supported; supported: silu`);

  let maxPositions = f.int('max_position_embeddings', modelType === 'llama' ? 2048 : 32768);
  // Mistral always slides; qwen2 only when use_sliding_window. Within the window sliding attention equals
  // full attention, so clamping the context to the window keeps the math exact.
  const sliding = modelType === 'mistral' || (modelType === 'qwen2' && f.bool('use_sliding_window', false));
  if (sliding && f.has('sliding_window')) {
    const window = f.int('sliding_window');
    if (window < maxPositions) {
      notes.push(
        `config.json: sliding_window ${window} < max_position_embeddings ${maxPositions}; ` +
          `loraplex has no sliding-window attention, so the context is limited to ${window} tokens`,
      );
      maxPositions = window;
    }
  }

  // Llama's attention_bias covers q, k, v and o; mistral has no biases; qwen2 biases q/k/v only.
  let attentionBias = false;
  let outputBias = false;
  if (modelType === 'llama') {
    attentionBias = outputBias = f.bool('attention_bias', false);
  } else if (modelType === 'qwen2') {
    attentionBias = true;
  }
  const mlpBias = modelType === 'llama' ? f.bool('mlp_bias', false) : false;

  return {
    family: 'llama',
    modelType,
    hiddenSize: hidden,
    intermediateSize: f.int('intermediate_size'),
    numLayers: f.int('num_hidden_layers'),
    numHeads: heads,
    numKvHeads: kvHeads,
    headDim,
    vocabSize: f.int('vocab_size'),
    maxPositions,
    normEps: f.num('rms_norm_eps', 1e-6),
    ropeTheta: checkRope(f),
    attentionBias,
    outputBias,
    mlpBias,
    hiddenAct: 'silu',
    tieWordEmbeddings: f.bool('tie_word_embeddings', false),
    bosTokenId: null,
    eosTokenIds: [],
  };
}

function gpt2Spec(f: Fields): ModelSpec {
  const hidden = f.int('n_embd');
  const heads = f.int('n_head');
  if (hidden % heads !== 0) f.fail(`n_embd (${hidden}) is not a multiple of n_head (${heads})`);
  const act = f.str('activation_function', 'gelu_new');
  let hiddenAct: ModelSpec['hiddenAct'];
  // gelu_pytorch_tanh is the same tanh approximation as gelu_new.
  if (act === 'gelu_new' || act === 'gelu_pytorch_tanh') hiddenAct = 'gelu_new';
  else if (act === 'gelu') hiddenAct = 'gelu';
  else f.fail(`activation_function '${act}' is not supported; supported: gelu_new, gelu, gelu_pytorch_tanh`);
  if (!f.bool('scale_attn_weights', true)) f.fail('scale_attn_weights false is not supported');
  if (f.bool('scale_attn_by_inverse_layer_idx', false)) f.fail('scale_attn_by_inverse_layer_idx true is not supported');
  if (f.bool('add_cross_attention', false)) f.fail('add_cross_attention true is not supported');
  const maxPositions = f.has('n_positions') ? f.int('n_positions') : f.int('n_ctx');
  return {
    family: 'gpt2',
    modelType: 'gpt2',
    hiddenSize: hidden,
    intermediateSize: f.int('n_inner', 4 * hidden),
    numLayers: f.int('n_layer'),
    numHeads: heads,
    numKvHeads: heads,
    headDim: hidden / heads,
    vocabSize: f.int('vocab_size'),
    maxPositions,
    normEps: f.num('layer_norm_epsilon', 1e-5),
    ropeTheta: 0,
    attentionBias: true,
    outputBias: true,
    mlpBias: true,
    hiddenAct,
    tieWordEmbeddings: f.bool('tie_word_embeddings', true),
    bosTokenId: null,
    eosTokenIds: [],
  };
}

/**
 * Reads config.json (+ generation_config.json when present) into a ModelSpec. Every unsupported option
 * throws one ModelFormatError; adaptations loraplex makes are returned as notes.
 */
export function readModelSpecWithNotes(dir: string): ModelSpecWithNotes {
  const cfg = readJsonFile(dir, 'config.json', true)!;
  const f: Fields = new Fields(dir, 'config.json', cfg);
  const notes: string[] = [];
  if (!f.has('model_type')) f.fail(`model_type is missing; supported: ${SUPPORTED_MODEL_TYPES.join(', ')}`);
  const modelType = f.raw('model_type');
  if (typeof modelType !== 'string' || !(SUPPORTED_MODEL_TYPES as readonly string[]).includes(modelType)) {
    f.fail(`model_type '${String(modelType)}' is not supported; supported: ${SUPPORTED_MODEL_TYPES.join(', ')}`);
  }
  rejectCommon(f);
  const spec = modelType === 'gpt2' ? gpt2Spec(f) : llamaSpec(f, modelType, notes);

  // generation_config.json is what transformers' generate() uses; config.json's ids are the fallback.
  const gen = readJsonFile(dir, 'generation_config.json', false);
  const g = gen ? new Fields(dir, 'generation_config.json', gen) : null;
  const eos = [...new Set([...(g?.ids('eos_token_id') ?? []), ...f.ids('eos_token_id')])];
  const bosList = g?.has('bos_token_id') ? g.ids('bos_token_id') : f.ids('bos_token_id');
  if (bosList.length > 1) {
    (g?.has('bos_token_id') ? g : f).fail(`bos_token_id must be a single id, got ${JSON.stringify(bosList)}`);
  }
  spec.bosTokenId = bosList[0] ?? null;
  if (spec.bosTokenId !== null && spec.bosTokenId >= spec.vocabSize) {
    notes.push(`bos_token_id ${spec.bosTokenId} is outside the vocabulary (${spec.vocabSize}); ignored`);
    spec.bosTokenId = null;
  }
  for (const id of eos) {
    if (id < spec.vocabSize) spec.eosTokenIds.push(id);
    else notes.push(`eos_token_id ${id} is outside the vocabulary (${spec.vocabSize}); ignored`);
  }
  if (spec.eosTokenIds.length === 0) notes.push('no eos_token_id: generation stops only at max_tokens or a stop string');
  return { spec, notes };
}

/** config.json (+ generation_config.json) -> ModelSpec. See readModelSpecWithNotes for the notes. */
export function readModelSpec(dir: string): ModelSpec {
  return readModelSpecWithNotes(dir).spec;
}
