/** What the engine needs to know about a base model, independent of the on-disk layout. */
export type ModelFamily = 'llama' | 'gpt2';

export interface ModelSpec {
  family: ModelFamily;
  /** config.json's model_type: llama | mistral | qwen2 | gpt2. */
  modelType: string;
  hiddenSize: number;
  intermediateSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  vocabSize: number;
  /** Longest sequence the position encoding supports (max_position_embeddings / n_positions). */
  maxPositions: number;
  /** RMSNorm (llama) or LayerNorm (gpt2) epsilon. */
  normEps: number;
  /** Rotary base; unused for gpt2 (learned positions). */
  ropeTheta: number;
  /** q/k/v projections carry a bias (qwen2, gpt2). */
  attentionBias: boolean;
  /** o_proj carries a bias (gpt2's attn.c_proj). */
  outputBias: boolean;
  /** MLP projections carry a bias (gpt2, llama with mlp_bias). */
  mlpBias: boolean;
  /** 'silu' (gated, llama) or 'gelu_new' / 'gelu' (gpt2). */
  hiddenAct: 'silu' | 'gelu_new' | 'gelu';
  tieWordEmbeddings: boolean;
  bosTokenId: number | null;
  /** Every id that ends generation (generation_config.json's eos_token_id may be a list). */
  eosTokenIds: number[];
}

/** A float32 tensor in row-major order. */
export interface HostTensor {
  shape: number[];
  data: Float32Array;
}

/** Weights by their Hugging Face names (e.g. `model.layers.0.self_attn.q_proj.weight`). */
export interface WeightSource {
  names(): string[];
  has(name: string): boolean;
  /** Shape without reading the data. */
  shape(name: string): number[];
  /** Reads and converts the tensor to float32. */
  get(name: string): HostTensor;
}
