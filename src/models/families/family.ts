import type { Graph, Value } from '../../../kernels/ir.js';
import type { HostTensor, ModelFamily, ModelSpec, WeightSource } from '../spec.js';
import type { LoraModuleShape } from '../lora.js';

/**
 * One model family in one place (vLLM's model_executor/models/llama.py): its weight names, its LoRA-able linears
 * with their PEFT paths and shapes, the linears serving packs into one matmul, and its body, written once and
 * built through a BodyContext that serving and training each supply.
 */
export interface FamilyDefinition {
  name: ModelFamily;
  /** One layer's LoRA-able linears in forward order, paths relative to the layer (`self_attn.q_proj`). */
  layerLinears: readonly LayerLinear[];
  /** `model.layers.3` / `h.3`: the path prefix of a layer. */
  layerPath(layer: number): string;
  /** Matches any tensor or module path inside a layer, capturing the layer number. */
  layerPattern: RegExp;
  /**
   * vLLM's packed_modules_mapping: serving runs each group as ONE quantized matmul over the stacked rows (rows
   * quantize independently, so this is exactly the separate layers), each part keeping its own LoRA path.
   */
  packedModules: Readonly<Record<string, readonly string[]>>;
  /** Prefix the checkpoint may put before every name (`transformer.` from GPT2LMHeadModel.save_pretrained). */
  checkpointPrefix: string | null;
  /** Every tensor the engine reads for this spec, with its Hugging Face name and shape. */
  expectedWeights(spec: ModelSpec): ExpectedWeight[];
  /** A tensor of the checkpoint that the config says should not be there (the engine would drop it silently). */
  isUnaccountedWeight(spec: ModelSpec, name: string): boolean;
  /** The name of the [vocab, hidden] output projection (tied to the embedding where the model has no lm_head). */
  lmHeadWeight(spec: ModelSpec, weights: WeightSource): string;
  /** token ids [batch, seq] -> final hidden states [batch, seq, hidden]. */
  body(c: BodyContext, ids: Value): Value;
}

/** A LoRA-able linear of every layer: its path in the layer and PEFT's in/out features. */
export interface LayerLinear {
  path: string;
  inFeatures(spec: ModelSpec): number;
  outFeatures(spec: ModelSpec): number;
}

/** A LoRA-able linear of the model: PEFT's shape, the name target_modules uses, and its layer. */
export interface LinearModule extends LoraModuleShape {
  /** The name target_modules uses: q_proj, c_attn, ... */
  peftName: string;
  layer: number;
}

export interface ExpectedWeight {
  name: string;
  shape: number[];
}

/** One linear layer's frozen weight: HF Linear layout [out, in] (gpt2's Conv1D weights arrive transposed). */
export interface LinearWeight {
  /** HF module path, e.g. 'model.layers.0.self_attn.q_proj'. */
  module: string;
  /** [out, in], known without reading the weight. */
  shape: [number, number];
  /** Reads the float weight [out, in]. A graph that refers to stored quantized bytes never calls it. */
  weight(): HostTensor;
  bias: HostTensor | null;
}

export interface AttentionHeads {
  numHeads: number;
  numKvHeads: number;
  headDim: number;
}

/** What a body is built through. Serving: cached attention and pooled LoRA per row; training: exact dX and dropout. */
export interface BodyContext {
  g: Graph;
  spec: ModelSpec;
  w: WeightSource;
  /** Absolute position of every new token, [batch, seq] (training: [1, seq], packed sequences start at 0). */
  positions: Value;
  /** The token embedding table as a constant (serving may store it in float16). */
  embeddingTable(name: string): Value;
  /** base(x) (+ bias), plus the module's LoRA path where it has one. */
  linear(x: Value, linear: LinearWeight): Value;
  /** Linears over the same input, named in packedModules (serving fuses them; training runs them one by one). */
  packedLinear(x: Value, packedName: string, parts: LinearWeight[]): Value[];
  /** Causal attention of one layer over this step's q/k/v [batch, seq, heads * headDim] (rotary already applied). */
  attention(layer: number, q: Value, k: Value, v: Value, heads: AttentionHeads): Value;
  /** Called with each layer's input before the layer is built (training checkpoints there). */
  layerInput?(layer: number, h: Value): void;
}

/** The LoRA-able linears of a model of this family, layer by layer, in forward order. */
export function linearModulesOf(family: FamilyDefinition, spec: ModelSpec): LinearModule[] {
  const out: LinearModule[] = [];
  for (let layer = 0; layer < spec.numLayers; layer++) {
    for (const l of family.layerLinears) {
      const peftName = l.path.slice(l.path.lastIndexOf('.') + 1);
      out.push({ module: `${family.layerPath(layer)}.${l.path}`, inFeatures: l.inFeatures(spec), outFeatures: l.outFeatures(spec), peftName, layer });
    }
  }
  return out;
}

/** PEFT's target_modules names of the family, in forward order, each once. */
export function peftNamesOf(family: FamilyDefinition): string[] {
  return [...new Set(family.layerLinears.map((l) => l.path.slice(l.path.lastIndexOf('.') + 1)))];
}

/** A module path of one of the family's LoRA-able linears, in any layer: its layer and in-layer index, or null. */
export function parseLinearModule(family: FamilyDefinition, module: string): { layer: number; index: number } | null {
  const m = family.layerPattern.exec(module);
  if (!m) return null;
  const inLayer = module.slice(m[0].length);
  const index = family.layerLinears.findIndex((l) => l.path === inLayer);
  return index < 0 ? null : { layer: Number(m[1]), index };
}

/** Conv1D weights (gpt2) are [in, out]; linears take [out, in]. */
export function transposed(t: HostTensor): HostTensor {
  const [rows, cols] = t.shape as [number, number];
  const data = new Float32Array(rows * cols);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) data[c * rows + r] = t.data[r * cols + c]!;
  return { shape: [cols, rows], data };
}

export function constantOf(g: Graph, hint: string, t: HostTensor): Value {
  return g.constant(hint, 'float32', t.shape, t.data);
}
