/**
 * The one description of a LoRA on one module (vLLM's LoRALayerWeights), used from the PEFT reader through the
 * slot pool to the trainer. The adapter's scale (lora_alpha / r) is not in it: it belongs to the adapter and
 * travels once beside its modules.
 */

/** A LoRA-able linear: HF module path and PEFT's in/out features. */
export interface LoraModuleShape {
  /** HF module path, e.g. 'model.layers.0.self_attn.q_proj' or 'h.0.attn.c_attn'. */
  module: string;
  inFeatures: number;
  outFeatures: number;
}

/** One adapter's weights on one module, in PEFT layout: delta(x) = scale * (x A^T) B^T. */
export interface LoraLayerWeights extends LoraModuleShape {
  /** lora_A, row-major [r, inFeatures]. */
  a: Float32Array;
  /** lora_B, row-major [outFeatures, r]. */
  b: Float32Array;
  r: number;
}
