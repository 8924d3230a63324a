/**
 * A slow, obvious reference forward pass (llama2.c run.c style) used by tests as the ground truth for the
 * ONNX graphs. Read it top to bottom: every buffer carries its shape, activations are stored as float32
 * (like the float32 model) while every sum (dot products, norms, softmax) accumulates in float64, so the
 * reference is at least as accurate as anything it checks.
 *
 * Families:
 * - llama (llama / mistral / qwen2): RMSNorm, rotate-half rotary, grouped-query attention, SwiGLU MLP.
 * - gpt2: learned positions, pre-LayerNorm with bias, Conv1D weights stored [in, out], gelu MLP.
 *
 * Not modelled (none of the ReferenceSpec fields describe them): rope scaling, sliding-window attention.
 */
import type { HostTensor, WeightSource } from '../tensor.js';

/**
 * The model description the reference reads: written out here (not imported from src/) so that the independent
 * check stays independent; the engine's ModelSpec has these fields and more.
 */
export interface ReferenceSpec {
  family: 'llama' | 'gpt2';
  modelType: string;
  hiddenSize: number;
  intermediateSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  vocabSize: number;
  maxPositions: number;
  normEps: number;
  ropeTheta: number;
  attentionBias: boolean;
  outputBias: boolean;
  mlpBias: boolean;
  hiddenAct: 'silu' | 'gelu_new' | 'gelu';
  tieWordEmbeddings: boolean;
}

// ---------------------------------------------------------------------------------------------------------
// Weights

/** Float32 tensors by Hugging Face name. A WeightSource satisfies it. */
export interface ReferenceWeights {
  get(name: string): HostTensor;
  has(name: string): boolean;
}

/** Anything referenceForward accepts as weights; a function returns undefined for an absent tensor. */
export type ReferenceWeightsInput =
  | ReferenceWeights
  | Map<string, HostTensor>
  | ((name: string) => HostTensor | undefined);

export type TensorOverrides = Map<string, HostTensor> | Record<string, HostTensor> | ((name: string) => HostTensor | undefined);

/**
 * Weights read from `source` (each tensor once, then cached), with `overrides` taking precedence, e.g. the
 * dequantized 4-bit weights in place of the originals. An override must keep the original's shape.
 */
export function referenceWeights(source: ReferenceWeightsInput, overrides?: TensorOverrides): ReferenceWeights {
  const base = toReferenceWeights(source);
  const override: (name: string) => HostTensor | undefined =
    overrides === undefined
      ? () => undefined
      : typeof overrides === 'function'
        ? overrides
        : overrides instanceof Map
          ? (n) => overrides.get(n)
          : (n) => (Object.prototype.hasOwnProperty.call(overrides, n) ? overrides[n] : undefined);
  const cache = new Map<string, HostTensor>();
  return {
    has: (name) => cache.has(name) || override(name) !== undefined || base.has(name),
    get: (name) => {
      let t = cache.get(name);
      if (t) return t;
      const o = override(name);
      if (o !== undefined) {
        if (base.has(name)) {
          // A WeightSource knows a shape without reading the data.
          const src = base as Partial<WeightSource>;
          const want = typeof src.shape === 'function' ? src.shape(name) : base.get(name).shape;
          if (!sameShape(want, o.shape)) {
            throw new Error(`override ${name} has shape ${JSON.stringify(o.shape)}, the original ${JSON.stringify(want)}`);
          }
        }
        t = o;
      } else {
        t = base.get(name);
      }
      checkSize(name, t);
      cache.set(name, t);
      return t;
    },
  };
}

function toReferenceWeights(w: ReferenceWeightsInput): ReferenceWeights {
  if (typeof w === 'function') {
    return {
      has: (n) => w(n) !== undefined,
      get: (n) => {
        const t = w(n);
        if (t === undefined) throw new Error(`missing tensor ${n}`);
        return t;
      },
    };
  }
  if (w instanceof Map) {
    return {
      has: (n) => w.has(n),
      get: (n) => {
        const t = w.get(n);
        if (t === undefined) throw new Error(`missing tensor ${n}`);
        return t;
      },
    };
  }
  return w;
}

function sameShape(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((d, i) => d === b[i]);
}

function checkSize(name: string, t: HostTensor): void {
  const n = t.shape.reduce((a, b) => a * b, 1);
  if (n !== t.data.length) throw new Error(`tensor ${name}: shape ${JSON.stringify(t.shape)} but ${t.data.length} elements`);
}

/** Reads a tensor and checks its shape: a wrong layout (e.g. [in, out] vs [out, in]) fails here, loudly. */
function tensor(w: ReferenceWeights, name: string, shape: number[]): Float32Array {
  const t = w.get(name);
  if (!sameShape(t.shape, shape)) {
    throw new Error(`tensor ${name} has shape ${JSON.stringify(t.shape)}, expected ${JSON.stringify(shape)}`);
  }
  checkSize(name, t);
  return t.data;
}

// ---------------------------------------------------------------------------------------------------------
// LoRA

/**
 * One LoRA adapter on one module: the module's output gets + scale * (x A^T) B^T.
 * Several entries for the same module add up (a weighted mix of adapters).
 */
export interface ReferenceLora {
  /** The module's weight name without `.weight`, e.g. 'model.layers.0.self_attn.q_proj' or 'h.0.attn.c_attn'. */
  module: string;
  /** [r, in] */
  a: Float32Array;
  /** [out, r] */
  b: Float32Array;
  r: number;
  scale: number;
}

function checkLoras(loras: readonly ReferenceLora[], inDim: number, outDim: number): void {
  for (const l of loras) {
    if (l.a.length !== l.r * inDim) throw new Error(`LoRA ${l.module}: A has ${l.a.length} elements, expected [r=${l.r}, in=${inDim}]`);
    if (l.b.length !== outDim * l.r) throw new Error(`LoRA ${l.module}: B has ${l.b.length} elements, expected [out=${outDim}, r=${l.r}]`);
  }
}

/** out[r] = sum_i x[i] A[r, i], one row of x A^T. */
function loraDown(l: ReferenceLora, x: Float32Array, xOff: number, inDim: number, out: Float64Array): void {
  for (let k = 0; k < l.r; k++) {
    let s = 0;
    const aOff = k * inDim;
    for (let i = 0; i < inDim; i++) s += x[xOff + i]! * l.a[aOff + i]!;
    out[k] = s;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Per-op helpers (exported for reuse). Shapes are row-major; `rows` is the number of tokens.

/**
 * nn.Linear: y[rows, outDim] = x[rows, inDim] W^T + b, with W stored [outDim, inDim] (Hugging Face layout),
 * plus any LoRA deltas scale * (x A^T) B^T, all accumulated in float64 and rounded once.
 */
export function linear(
  x: Float32Array,
  w: Float32Array,
  bias: Float32Array | null,
  rows: number,
  inDim: number,
  outDim: number,
  loras: readonly ReferenceLora[] = [],
): Float32Array {
  checkLoras(loras, inDim, outDim);
  const y = new Float32Array(rows * outDim); // [rows, outDim]
  const down = loras.map((l) => new Float64Array(l.r)); // per LoRA: [r], x A^T for the current row
  for (let t = 0; t < rows; t++) {
    const xOff = t * inDim;
    loras.forEach((l, j) => loraDown(l, x, xOff, inDim, down[j]!));
    for (let o = 0; o < outDim; o++) {
      let s = bias ? bias[o]! : 0;
      const wOff = o * inDim;
      for (let i = 0; i < inDim; i++) s += x[xOff + i]! * w[wOff + i]!;
      for (let j = 0; j < loras.length; j++) {
        const l = loras[j]!;
        const u = down[j]!;
        let d = 0;
        for (let k = 0; k < l.r; k++) d += u[k]! * l.b[o * l.r + k]!;
        s += l.scale * d;
      }
      y[t * outDim + o] = s;
    }
  }
  return y;
}

/**
 * GPT-2's Conv1D: y[rows, outDim] = x[rows, inDim] W + b, with W stored [inDim, outDim], plus LoRA deltas
 * (A is still [r, in] and B [out, r]: LoRA sees the module, not the storage layout).
 */
export function conv1d(
  x: Float32Array,
  w: Float32Array,
  bias: Float32Array | null,
  rows: number,
  inDim: number,
  outDim: number,
  loras: readonly ReferenceLora[] = [],
): Float32Array {
  checkLoras(loras, inDim, outDim);
  const y = new Float32Array(rows * outDim); // [rows, outDim]
  const acc = new Float64Array(outDim); // [outDim], one output row in float64
  const down = loras.map((l) => new Float64Array(l.r));
  for (let t = 0; t < rows; t++) {
    const xOff = t * inDim;
    if (bias) for (let o = 0; o < outDim; o++) acc[o] = bias[o]!;
    else acc.fill(0);
    // Walk W row by row (contiguous): acc += x[t, i] * W[i, :].
    for (let i = 0; i < inDim; i++) {
      const xi = x[xOff + i]!;
      const wOff = i * outDim;
      for (let o = 0; o < outDim; o++) acc[o] += xi * w[wOff + o]!;
    }
    loras.forEach((l, j) => {
      const u = down[j]!;
      loraDown(l, x, xOff, inDim, u);
      for (let o = 0; o < outDim; o++) {
        let d = 0;
        for (let k = 0; k < l.r; k++) d += u[k]! * l.b[o * l.r + k]!;
        acc[o] += l.scale * d;
      }
    });
    for (let o = 0; o < outDim; o++) y[t * outDim + o] = acc[o]!;
  }
  return y;
}

/** Plain C[m, n] = A[m, k] B[k, n]. */
export function matmul(a: Float32Array, b: Float32Array, m: number, k: number, n: number): Float32Array {
  return conv1d(a, b, null, m, k, n);
}

/** out[rows, dim] = table[ids[t], :], with a range check (an id past the table is a bug, not a NaN). */
export function embed(table: Float32Array, ids: readonly number[], vocab: number, dim: number): Float32Array {
  const out = new Float32Array(ids.length * dim);
  ids.forEach((id, t) => {
    if (!Number.isInteger(id) || id < 0 || id >= vocab) throw new Error(`token id ${id} at index ${t} is outside [0, ${vocab})`);
    out.set(table.subarray(id * dim, (id + 1) * dim), t * dim);
  });
  return out;
}

/** RMSNorm: y = x / sqrt(mean(x^2) + eps) * w, per row of x[rows, dim]. */
export function rmsNorm(x: Float32Array, w: Float32Array, rows: number, dim: number, eps: number): Float32Array {
  const y = new Float32Array(rows * dim);
  for (let t = 0; t < rows; t++) {
    const off = t * dim;
    let ss = 0;
    for (let i = 0; i < dim; i++) ss += x[off + i]! * x[off + i]!;
    const inv = 1 / Math.sqrt(ss / dim + eps);
    for (let i = 0; i < dim; i++) y[off + i] = x[off + i]! * inv * w[i]!;
  }
  return y;
}

/** LayerNorm: y = (x - mean) / sqrt(var + eps) * w + b, per row of x[rows, dim] (biased variance, two passes). */
export function layerNorm(x: Float32Array, w: Float32Array, b: Float32Array, rows: number, dim: number, eps: number): Float32Array {
  const y = new Float32Array(rows * dim);
  for (let t = 0; t < rows; t++) {
    const off = t * dim;
    let mean = 0;
    for (let i = 0; i < dim; i++) mean += x[off + i]!;
    mean /= dim;
    let v = 0;
    for (let i = 0; i < dim; i++) v += (x[off + i]! - mean) ** 2;
    const inv = 1 / Math.sqrt(v / dim + eps);
    for (let i = 0; i < dim; i++) y[off + i] = (x[off + i]! - mean) * inv * w[i]! + b[i]!;
  }
  return y;
}

/** inv_freq[i] = theta^(-2i / headDim), i in [0, headDim/2). */
export function rotaryInvFreq(headDim: number, theta: number): Float64Array {
  const f = new Float64Array(headDim / 2);
  for (let i = 0; i < headDim / 2; i++) f[i] = Math.pow(theta, (-2 * i) / headDim);
  return f;
}

/**
 * Rotary embedding in place, Hugging Face rotate-half layout: within each head, element i pairs with
 * i + headDim/2 and both use angle pos * inv_freq[i]:
 *   x1' = x1 cos - x2 sin,  x2' = x2 cos + x1 sin.
 * x: [rows, numHeads, headDim]; positions[t] is row t's absolute position.
 */
export function applyRotary(
  x: Float32Array,
  rows: number,
  numHeads: number,
  headDim: number,
  positions: ArrayLike<number>,
  theta: number,
): void {
  const half = headDim / 2;
  const invFreq = rotaryInvFreq(headDim, theta); // [half]
  const cos = new Float64Array(half);
  const sin = new Float64Array(half);
  for (let t = 0; t < rows; t++) {
    for (let i = 0; i < half; i++) {
      const angle = positions[t]! * invFreq[i]!;
      cos[i] = Math.cos(angle);
      sin[i] = Math.sin(angle);
    }
    for (let h = 0; h < numHeads; h++) {
      const off = (t * numHeads + h) * headDim;
      for (let i = 0; i < half; i++) {
        const x1 = x[off + i]!;
        const x2 = x[off + half + i]!;
        x[off + i] = x1 * cos[i]! - x2 * sin[i]!;
        x[off + half + i] = x2 * cos[i]! + x1 * sin[i]!;
      }
    }
  }
}

/**
 * Causal grouped-query attention, softmax(q k^T / sqrt(headDim)) v, in float64.
 * q: [rows, numHeads, headDim], query row t sits at absolute position firstPos + t.
 * k, v: [keys, numKvHeads, headDim] for positions 0..keys-1 (keys >= firstPos + rows).
 * Row t attends to positions 0..firstPos+t; head h reads kv head floor(h / (numHeads / numKvHeads)).
 * Returns [rows, numHeads, headDim].
 */
export function attention(
  q: Float32Array,
  k: Float32Array,
  v: Float32Array,
  rows: number,
  keys: number,
  numHeads: number,
  numKvHeads: number,
  headDim: number,
  firstPos: number,
): Float32Array {
  if (numHeads % numKvHeads !== 0) throw new Error(`numHeads ${numHeads} is not a multiple of numKvHeads ${numKvHeads}`);
  if (firstPos + rows > keys) throw new Error(`attention: rows up to position ${firstPos + rows - 1} but only ${keys} keys`);
  const group = numHeads / numKvHeads;
  const kvStride = numKvHeads * headDim;
  const scale = 1 / Math.sqrt(headDim);
  const out = new Float32Array(rows * numHeads * headDim);
  const score = new Float64Array(keys); // [keys], one query's scores, then probabilities
  const acc = new Float64Array(headDim); // [headDim], one head's output
  for (let t = 0; t < rows; t++) {
    const last = firstPos + t; // causal: positions 0..last
    for (let h = 0; h < numHeads; h++) {
      const qOff = (t * numHeads + h) * headDim;
      const kvOff = Math.floor(h / group) * headDim;
      let max = -Infinity;
      for (let j = 0; j <= last; j++) {
        let s = 0;
        const kOff = j * kvStride + kvOff;
        for (let d = 0; d < headDim; d++) s += q[qOff + d]! * k[kOff + d]!;
        s *= scale;
        score[j] = s;
        if (s > max) max = s;
      }
      let sum = 0; // subtract the max so exp cannot overflow
      for (let j = 0; j <= last; j++) {
        score[j] = Math.exp(score[j]! - max);
        sum += score[j]!;
      }
      acc.fill(0);
      for (let j = 0; j <= last; j++) {
        const p = score[j]! / sum;
        const vOff = j * kvStride + kvOff;
        for (let d = 0; d < headDim; d++) acc[d] += p * v[vOff + d]!;
      }
      for (let d = 0; d < headDim; d++) out[qOff + d] = acc[d]!;
    }
  }
  return out;
}

/** silu(x) = x * sigmoid(x), elementwise into `out` (default: in place). */
export function silu(x: Float32Array, out: Float32Array = x): Float32Array {
  for (let i = 0; i < x.length; i++) out[i] = x[i]! / (1 + Math.exp(-x[i]!));
  return out;
}

/** gelu_new / gelu_pytorch_tanh: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), elementwise. */
export function geluNew(x: Float32Array, out: Float32Array = x): Float32Array {
  const c = Math.sqrt(2 / Math.PI);
  for (let i = 0; i < x.length; i++) {
    const v = x[i]!;
    out[i] = 0.5 * v * (1 + Math.tanh(c * (v + 0.044715 * v * v * v)));
  }
  return out;
}

/** Exact gelu: 0.5 x (1 + erf(x / sqrt 2)) = 0.5 x erfc(-x / sqrt 2), elementwise. */
export function gelu(x: Float32Array, out: Float32Array = x): Float32Array {
  for (let i = 0; i < x.length; i++) out[i] = 0.5 * x[i]! * erfc(-x[i]! / Math.SQRT2);
  return out;
}

/** erf to ~1e-15 (JavaScript has no Math.erf). */
export function erf(x: number): number {
  if (x < 0) return -erf(-x);
  if (x >= 2) return 1 - erfc(x);
  // erf(x) = 2/sqrt(pi) e^{-x^2} sum_n 2^n x^{2n+1} / (1*3*...*(2n+1)): all terms positive, no cancellation.
  let term = x;
  let sum = x;
  for (let n = 1; n < 200 && term > 1e-17 * sum; n++) {
    term *= (2 * x * x) / (2 * n + 1);
    sum += term;
  }
  return (2 / Math.sqrt(Math.PI)) * Math.exp(-x * x) * sum;
}

/** erfc = 1 - erf, accurate in the tail (a continued fraction for x >= 2, where 1 - erf would cancel). */
export function erfc(x: number): number {
  if (x < 2) return 1 - erf(x);
  // erfc(x) = e^{-x^2}/sqrt(pi) * 1/(x + (1/2)/(x + 1/(x + (3/2)/(x + ...)))), evaluated from the tail.
  let f = x;
  for (let k = 80; k >= 1; k--) f = x + k / 2 / f;
  return Math.exp(-x * x) / Math.sqrt(Math.PI) / f;
}

/** x += y, elementwise (the residual stream). */
function addInPlace(x: Float32Array, y: Float32Array): void {
  for (let i = 0; i < x.length; i++) x[i] = x[i]! + y[i]!;
}

/** Row-major argmax; ties go to the lowest index, as in llama2.c. */
export function argmax(x: Float32Array, offset = 0, length = x.length - offset): number {
  let best = 0;
  for (let i = 1; i < length; i++) if (x[offset + i]! > x[offset + best]!) best = i;
  return best;
}

// ---------------------------------------------------------------------------------------------------------
// The model

interface LlamaLayer {
  inputNorm: Float32Array; // [hidden]
  q: Float32Array; // [numHeads*headDim, hidden]
  k: Float32Array; // [numKvHeads*headDim, hidden]
  v: Float32Array; // [numKvHeads*headDim, hidden]
  qBias: Float32Array | null; // [numHeads*headDim]
  kBias: Float32Array | null; // [numKvHeads*headDim]
  vBias: Float32Array | null; // [numKvHeads*headDim]
  o: Float32Array; // [hidden, numHeads*headDim]
  oBias: Float32Array | null; // [hidden]
  postNorm: Float32Array; // [hidden]
  gate: Float32Array; // [intermediate, hidden]
  up: Float32Array; // [intermediate, hidden]
  down: Float32Array; // [hidden, intermediate]
  gateBias: Float32Array | null;
  upBias: Float32Array | null;
  downBias: Float32Array | null;
}

interface Gpt2Layer {
  ln1W: Float32Array; // [hidden]
  ln1B: Float32Array; // [hidden]
  attnW: Float32Array; // c_attn [hidden, 3*hidden] (Conv1D: [in, out])
  attnB: Float32Array; // [3*hidden]
  projW: Float32Array; // attn.c_proj [hidden, hidden]
  projB: Float32Array; // [hidden]
  ln2W: Float32Array;
  ln2B: Float32Array;
  fcW: Float32Array; // mlp.c_fc [hidden, intermediate]
  fcB: Float32Array; // [intermediate]
  fcProjW: Float32Array; // mlp.c_proj [intermediate, hidden]
  fcProjB: Float32Array; // [hidden]
}

export interface ReferenceOptions {
  lora?: readonly ReferenceLora[];
}

/**
 * An incremental decoder with a plain KV cache: step(ids) feeds tokens at the next positions and returns
 * their logits. Feeding a whole sequence in one step is the full causal forward (referenceForward); the
 * per-row arithmetic is the same either way, so incremental and full logits agree exactly.
 */
export class ReferenceDecoder {
  private readonly spec: ReferenceSpec;
  private readonly embedding: Float32Array; // [vocab, hidden] (llama embed_tokens, gpt2 wte)
  private readonly positionEmbedding: Float32Array | null; // gpt2 wpe [maxPositions, hidden]
  private readonly llamaLayers: LlamaLayer[] = [];
  private readonly gpt2Layers: Gpt2Layer[] = [];
  private readonly finalNormW: Float32Array; // [hidden]
  private readonly finalNormB: Float32Array | null; // gpt2 ln_f bias
  private readonly lmHead: Float32Array; // [vocab, hidden]
  private readonly loras = new Map<string, ReferenceLora[]>();
  /** Per layer: keys/values after rotary, [capacity, numKvHeads*headDim]; rows 0..length-1 are filled. */
  private readonly keyCache: Float32Array[] = [];
  private readonly valueCache: Float32Array[] = [];
  private capacity = 0;
  private pos = 0;

  constructor(spec: ReferenceSpec, weights: ReferenceWeightsInput, opts: ReferenceOptions = {}) {
    this.spec = spec;
    const w = toReferenceWeights(weights);
    const { hiddenSize: H, intermediateSize: I, numHeads: NH, numKvHeads: NKV, headDim: D, vocabSize: V } = spec;
    const modules: string[] = ['lm_head'];

    if (spec.family === 'llama') {
      this.embedding = tensor(w, 'model.embed_tokens.weight', [V, H]);
      this.positionEmbedding = null;
      const opt = (name: string, on: boolean, shape: number[]) => (on ? tensor(w, name, shape) : null);
      for (let i = 0; i < spec.numLayers; i++) {
        const p = `model.layers.${i}`;
        this.llamaLayers.push({
          inputNorm: tensor(w, `${p}.input_layernorm.weight`, [H]),
          q: tensor(w, `${p}.self_attn.q_proj.weight`, [NH * D, H]),
          k: tensor(w, `${p}.self_attn.k_proj.weight`, [NKV * D, H]),
          v: tensor(w, `${p}.self_attn.v_proj.weight`, [NKV * D, H]),
          qBias: opt(`${p}.self_attn.q_proj.bias`, spec.attentionBias, [NH * D]),
          kBias: opt(`${p}.self_attn.k_proj.bias`, spec.attentionBias, [NKV * D]),
          vBias: opt(`${p}.self_attn.v_proj.bias`, spec.attentionBias, [NKV * D]),
          o: tensor(w, `${p}.self_attn.o_proj.weight`, [H, NH * D]),
          oBias: opt(`${p}.self_attn.o_proj.bias`, spec.outputBias, [H]),
          postNorm: tensor(w, `${p}.post_attention_layernorm.weight`, [H]),
          gate: tensor(w, `${p}.mlp.gate_proj.weight`, [I, H]),
          up: tensor(w, `${p}.mlp.up_proj.weight`, [I, H]),
          down: tensor(w, `${p}.mlp.down_proj.weight`, [H, I]),
          gateBias: opt(`${p}.mlp.gate_proj.bias`, spec.mlpBias, [I]),
          upBias: opt(`${p}.mlp.up_proj.bias`, spec.mlpBias, [I]),
          downBias: opt(`${p}.mlp.down_proj.bias`, spec.mlpBias, [H]),
        });
        for (const m of ['self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj', 'self_attn.o_proj', 'mlp.gate_proj', 'mlp.up_proj', 'mlp.down_proj']) {
          modules.push(`${p}.${m}`);
        }
      }
      this.finalNormW = tensor(w, 'model.norm.weight', [H]);
      this.finalNormB = null;
    } else if (spec.family === 'gpt2') {
      if (NKV !== NH) throw new Error(`gpt2 has no grouped-query attention (numKvHeads ${NKV} != numHeads ${NH})`);
      if (NH * D !== H) throw new Error(`gpt2: numHeads*headDim ${NH * D} != hiddenSize ${H}`);
      // Names without the `transformer.` prefix; tolerate the prefixed layout of some checkpoints.
      const pre = !w.has('wte.weight') && w.has('transformer.wte.weight') ? 'transformer.' : '';
      this.embedding = tensor(w, `${pre}wte.weight`, [V, H]);
      this.positionEmbedding = tensor(w, `${pre}wpe.weight`, [spec.maxPositions, H]);
      for (let i = 0; i < spec.numLayers; i++) {
        const p = `${pre}h.${i}`;
        this.gpt2Layers.push({
          ln1W: tensor(w, `${p}.ln_1.weight`, [H]),
          ln1B: tensor(w, `${p}.ln_1.bias`, [H]),
          attnW: tensor(w, `${p}.attn.c_attn.weight`, [H, 3 * H]),
          attnB: tensor(w, `${p}.attn.c_attn.bias`, [3 * H]),
          projW: tensor(w, `${p}.attn.c_proj.weight`, [H, H]),
          projB: tensor(w, `${p}.attn.c_proj.bias`, [H]),
          ln2W: tensor(w, `${p}.ln_2.weight`, [H]),
          ln2B: tensor(w, `${p}.ln_2.bias`, [H]),
          fcW: tensor(w, `${p}.mlp.c_fc.weight`, [H, I]),
          fcB: tensor(w, `${p}.mlp.c_fc.bias`, [I]),
          fcProjW: tensor(w, `${p}.mlp.c_proj.weight`, [I, H]),
          fcProjB: tensor(w, `${p}.mlp.c_proj.bias`, [H]),
        });
        // LoRA module names are always unprefixed (as the brief's adapters name them).
        for (const m of ['attn.c_attn', 'attn.c_proj', 'mlp.c_fc', 'mlp.c_proj']) modules.push(`h.${i}.${m}`);
      }
      this.finalNormW = tensor(w, `${pre}ln_f.weight`, [H]);
      this.finalNormB = tensor(w, `${pre}ln_f.bias`, [H]);
    } else {
      throw new Error(`unknown model family ${String(spec.family)}`);
    }

    // lm_head: the embedding when tied or when the checkpoint has no separate head.
    this.lmHead = spec.tieWordEmbeddings || !w.has('lm_head.weight') ? this.embedding : tensor(w, 'lm_head.weight', [V, H]);

    for (const l of opts.lora ?? []) {
      if (!modules.includes(l.module)) {
        throw new Error(`LoRA module ${l.module} is not a module of this ${spec.modelType} model (e.g. ${modules.slice(1, 5).join(', ')})`);
      }
      const list = this.loras.get(l.module) ?? [];
      list.push(l);
      this.loras.set(l.module, list);
    }
    for (let i = 0; i < spec.numLayers; i++) {
      this.keyCache.push(new Float32Array(0));
      this.valueCache.push(new Float32Array(0));
    }
  }

  /** Tokens consumed so far (the position of the next token). */
  get length(): number {
    return this.pos;
  }

  /** Feeds tokenIds at positions length..length+n-1; returns their logits, [n, vocab]. */
  step(tokenIds: readonly number[]): Float32Array {
    const n = tokenIds.length;
    if (n === 0) return new Float32Array(0);
    const first = this.pos;
    if (first + n > this.spec.maxPositions) {
      throw new Error(`positions up to ${first + n - 1} exceed maxPositions ${this.spec.maxPositions}`);
    }
    this.reserve(first + n);
    const logits = this.spec.family === 'gpt2' ? this.gpt2Chunk(tokenIds, first) : this.llamaChunk(tokenIds, first);
    this.pos = first + n;
    return logits;
  }

  /** Layer `layer`'s cache in the Hugging Face past_key_values layout: key/value [numKvHeads, length, headDim]. */
  kvCache(layer: number): { key: Float32Array; value: Float32Array } {
    const { numKvHeads: NKV, headDim: D } = this.spec;
    const S = this.pos;
    const toHf = (c: Float32Array) => {
      const out = new Float32Array(NKV * S * D);
      for (let s = 0; s < S; s++) for (let h = 0; h < NKV; h++) {
        out.set(c.subarray((s * NKV + h) * D, (s * NKV + h + 1) * D), (h * S + s) * D);
      }
      return out;
    };
    return { key: toHf(this.keyCache[layer]!), value: toHf(this.valueCache[layer]!) };
  }

  private reserve(total: number): void {
    if (total <= this.capacity) return;
    const cap = Math.min(this.spec.maxPositions, Math.max(total, this.capacity * 2, 16));
    const stride = this.spec.numKvHeads * this.spec.headDim;
    for (let i = 0; i < this.spec.numLayers; i++) {
      const k = new Float32Array(cap * stride);
      k.set(this.keyCache[i]!);
      this.keyCache[i] = k;
      const v = new Float32Array(cap * stride);
      v.set(this.valueCache[i]!);
      this.valueCache[i] = v;
    }
    this.capacity = cap;
  }

  private lora(module: string): ReferenceLora[] {
    return this.loras.get(module) ?? [];
  }

  /** Writes n rows of k, v ([n, numKvHeads*headDim]) at positions first.. of layer i's cache. */
  private store(i: number, k: Float32Array, v: Float32Array, first: number): void {
    const stride = this.spec.numKvHeads * this.spec.headDim;
    this.keyCache[i]!.set(k, first * stride);
    this.valueCache[i]!.set(v, first * stride);
  }

  private llamaChunk(ids: readonly number[], first: number): Float32Array {
    const s = this.spec;
    const { hiddenSize: H, intermediateSize: I, numHeads: NH, numKvHeads: NKV, headDim: D, vocabSize: V } = s;
    const n = ids.length;
    const positions = ids.map((_, t) => first + t);
    const x = embed(this.embedding, ids, V, H); // [n, H], the residual stream
    this.llamaLayers.forEach((L, i) => {
      const p = `model.layers.${i}`;
      // Attention block.
      const h = rmsNorm(x, L.inputNorm, n, H, s.normEps); // [n, H]
      const q = linear(h, L.q, L.qBias, n, H, NH * D, this.lora(`${p}.self_attn.q_proj`)); // [n, NH, D]
      const k = linear(h, L.k, L.kBias, n, H, NKV * D, this.lora(`${p}.self_attn.k_proj`)); // [n, NKV, D]
      const v = linear(h, L.v, L.vBias, n, H, NKV * D, this.lora(`${p}.self_attn.v_proj`)); // [n, NKV, D]
      applyRotary(q, n, NH, D, positions, s.ropeTheta);
      applyRotary(k, n, NKV, D, positions, s.ropeTheta);
      this.store(i, k, v, first);
      const a = attention(q, this.keyCache[i]!, this.valueCache[i]!, n, first + n, NH, NKV, D, first); // [n, NH*D]
      addInPlace(x, linear(a, L.o, L.oBias, n, NH * D, H, this.lora(`${p}.self_attn.o_proj`))); // x += o_proj(a)
      // SwiGLU MLP: down(silu(gate(h)) * up(h)).
      const h2 = rmsNorm(x, L.postNorm, n, H, s.normEps); // [n, H]
      const g = silu(linear(h2, L.gate, L.gateBias, n, H, I, this.lora(`${p}.mlp.gate_proj`))); // [n, I]
      const u = linear(h2, L.up, L.upBias, n, H, I, this.lora(`${p}.mlp.up_proj`)); // [n, I]
      for (let j = 0; j < g.length; j++) g[j] = g[j]! * u[j]!;
      addInPlace(x, linear(g, L.down, L.downBias, n, I, H, this.lora(`${p}.mlp.down_proj`))); // [n, H]
    });
    const xf = rmsNorm(x, this.finalNormW, n, H, s.normEps); // [n, H]
    return linear(xf, this.lmHead, null, n, H, V, this.lora('lm_head')); // [n, V]
  }

  private gpt2Chunk(ids: readonly number[], first: number): Float32Array {
    const s = this.spec;
    const { hiddenSize: H, intermediateSize: I, numHeads: NH, headDim: D, vocabSize: V } = s;
    const n = ids.length;
    const x = embed(this.embedding, ids, V, H); // [n, H], the residual stream
    const wpe = this.positionEmbedding!;
    for (let t = 0; t < n; t++) for (let j = 0; j < H; j++) x[t * H + j] = x[t * H + j]! + wpe[(first + t) * H + j]!;
    const act = s.hiddenAct === 'gelu' ? gelu : s.hiddenAct === 'gelu_new' ? geluNew : null;
    if (!act) throw new Error(`gpt2 with hiddenAct ${s.hiddenAct} is not supported`);
    this.gpt2Layers.forEach((L, i) => {
      const p = `h.${i}`;
      const h = layerNorm(x, L.ln1W, L.ln1B, n, H, s.normEps); // [n, H]
      const qkv = conv1d(h, L.attnW, L.attnB, n, H, 3 * H, this.lora(`${p}.attn.c_attn`)); // [n, 3H] = q | k | v
      const q = new Float32Array(n * H); // [n, NH, D]
      const k = new Float32Array(n * H); // [n, NH, D]
      const v = new Float32Array(n * H); // [n, NH, D]
      for (let t = 0; t < n; t++) {
        q.set(qkv.subarray(t * 3 * H, t * 3 * H + H), t * H);
        k.set(qkv.subarray(t * 3 * H + H, t * 3 * H + 2 * H), t * H);
        v.set(qkv.subarray(t * 3 * H + 2 * H, t * 3 * H + 3 * H), t * H);
      }
      this.store(i, k, v, first);
      const a = attention(q, this.keyCache[i]!, this.valueCache[i]!, n, first + n, NH, NH, D, first); // [n, H]
      addInPlace(x, conv1d(a, L.projW, L.projB, n, H, H, this.lora(`${p}.attn.c_proj`)));
      const h2 = layerNorm(x, L.ln2W, L.ln2B, n, H, s.normEps); // [n, H]
      const f = act(conv1d(h2, L.fcW, L.fcB, n, H, I, this.lora(`${p}.mlp.c_fc`))); // [n, I]
      addInPlace(x, conv1d(f, L.fcProjW, L.fcProjB, n, I, H, this.lora(`${p}.mlp.c_proj`))); // [n, H]
    });
    const xf = layerNorm(x, this.finalNormW, this.finalNormB!, n, H, s.normEps); // [n, H]
    return linear(xf, this.lmHead, null, n, H, V, this.lora('lm_head')); // [n, V], lm_head = wte (tied)
  }
}

/** Logits for every position, [tokenIds.length, vocab]: the full causal forward over positions 0..T-1. */
export function referenceForward(
  spec: ReferenceSpec,
  weights: ReferenceWeightsInput,
  tokenIds: readonly number[],
  opts: ReferenceOptions = {},
): Float32Array {
  return new ReferenceDecoder(spec, weights, opts).step(tokenIds);
}

/**
 * Greedy decoding with the KV-cached decoder: feeds the prompt, then appends the argmax token
 * maxNewTokens times (stopping after a token in stopIds). Returns the new ids only.
 */
export function referenceGreedy(
  spec: ReferenceSpec,
  weights: ReferenceWeightsInput,
  promptIds: readonly number[],
  maxNewTokens: number,
  opts: ReferenceOptions & { stopIds?: readonly number[] } = {},
): number[] {
  if (promptIds.length === 0) throw new Error('referenceGreedy needs at least one prompt token');
  const V = spec.vocabSize;
  const dec = new ReferenceDecoder(spec, weights, opts);
  let logits = dec.step(promptIds);
  let last = promptIds.length - 1;
  const out: number[] = [];
  while (out.length < maxNewTokens) {
    const next = argmax(logits, last * V, V);
    out.push(next);
    if (opts.stopIds?.includes(next)) break;
    logits = dec.step([next]);
    last = 0;
  }
  return out;
}

/** Re-exported for callers that build weights from a checkpoint. */
export type { HostTensor, WeightSource };
