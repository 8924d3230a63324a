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

// Defined in kernels/ (which imports nothing from src/); re-exported for the model code.
export type { HostTensor, WeightSource } from '../../kernels/tensor.js';
