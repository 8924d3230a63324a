/** Host-side tensors and weight access: the lowest layer, so that kernels/ and src/ can both name them. */

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
