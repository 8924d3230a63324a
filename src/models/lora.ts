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

/**
 * A whole adapter as the slot pool takes it: its modules, and its scale once (lora_alpha / r, or / sqrt(r) with
 * rsLoRA). A PeftAdapter is one.
 */
export interface LoraAdapterWeights {
  scaling: number;
  modules: readonly Pick<LoraLayerWeights, 'module' | 'a' | 'b' | 'r'>[];
}
