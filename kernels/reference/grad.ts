/**
 * Plain-TS float64 tensors and the ops the gradient rules cover, for finite-difference checks of the autodiff
 * (test/kernels/grad-ops.test.ts, autodiff.test.ts). Slow and obvious: every op walks the output by index.
 * Broadcasting follows numpy/ONNX (align trailing dims; a dim of 1 stretches).
 */
import { erf } from './transformer.js';

export interface T64 {
  shape: number[];
  data: Float64Array;
}

export function size(shape: readonly number[]): number {
  return shape.reduce((p, n) => p * n, 1);
}

export function t64(shape: number[], data?: ArrayLike<number>): T64 {
  const n = size(shape);
  if (data && data.length !== n) throw new Error(`t64: [${shape}] needs ${n} values, got ${data.length}`);
  return { shape: [...shape], data: data ? Float64Array.from(data) : new Float64Array(n) };
}

function strides(shape: readonly number[]): number[] {
  const s = new Array<number>(shape.length);
  let acc = 1;
  for (let i = shape.length - 1; i >= 0; i--) { s[i] = acc; acc *= shape[i]!; }
  return s;
}

function unravel(i: number, shape: readonly number[]): number[] {
  const idx = new Array<number>(shape.length);
  for (let a = shape.length - 1; a >= 0; a--) { idx[a] = i % shape[a]!; i = Math.floor(i / shape[a]!); }
  return idx;
}

function normAxis(axis: number, rank: number): number {
  return axis < 0 ? axis + rank : axis;
}

export function broadcastShapes(...shapes: (readonly number[])[]): number[] {
  const r = Math.max(...shapes.map((s) => s.length));
  const out: number[] = [];
  for (let i = 0; i < r; i++) {
    let d = 1;
    for (const s of shapes) {
      const v = s[s.length - r + i] ?? 1;
      if (v !== 1) {
        if (d !== 1 && d !== v) throw new Error(`broadcast: [${shapes.map((x) => `[${x}]`).join(', ')}] do not broadcast`);
        d = v;
      }
    }
    out.push(d);
  }
  return out;
}

/** Flat index into `shape` of the element at the broadcast output index `idx`. */
function bIndex(idx: readonly number[], shape: readonly number[], st: readonly number[]): number {
  const off = idx.length - shape.length;
  let k = 0;
  for (let a = 0; a < shape.length; a++) k += (shape[a] === 1 ? 0 : idx[a + off]!) * st[a]!;
  return k;
}

export function map(xs: T64[], f: (...v: number[]) => number): T64 {
  const shape = broadcastShapes(...xs.map((x) => x.shape));
  const out = t64(shape);
  const sts = xs.map((x) => strides(x.shape));
  const vals = new Array<number>(xs.length);
  for (let i = 0; i < out.data.length; i++) {
    const idx = unravel(i, shape);
    for (let j = 0; j < xs.length; j++) vals[j] = xs[j]!.data[bIndex(idx, xs[j]!.shape, sts[j]!)]!;
    out.data[i] = f(...vals);
  }
  return out;
}

export const add = (a: T64, b: T64) => map([a, b], (x, y) => x! + y!);
export const sub = (a: T64, b: T64) => map([a, b], (x, y) => x! - y!);
export const mul = (a: T64, b: T64) => map([a, b], (x, y) => x! * y!);
export const div = (a: T64, b: T64) => map([a, b], (x, y) => x! / y!);
export const unary = (a: T64, f: (x: number) => number) => map([a], (x) => f(x!));
export const sigmoid = (x: number) => 1 / (1 + Math.exp(-x));
export const scalar = (v: number) => t64([], [v]);

/** Batched matmul with broadcast batch dims (ranks >= 2). */
export function matmul(a: T64, b: T64): T64 {
  const [M, K] = a.shape.slice(-2) as [number, number];
  const [K2, N] = b.shape.slice(-2) as [number, number];
  if (K !== K2) throw new Error(`matmul: [${a.shape}] @ [${b.shape}]`);
  const batch = broadcastShapes(a.shape.slice(0, -2), b.shape.slice(0, -2));
  const out = t64([...batch, M, N]);
  const aB = a.shape.slice(0, -2), bB = b.shape.slice(0, -2);
  const aSt = strides(aB), bSt = strides(bB);
  for (let p = 0; p < size(batch); p++) {
    const idx = unravel(p, batch);
    const ao = bIndex(idx, aB, aSt) * M * K;
    const bo = bIndex(idx, bB, bSt) * K * N;
    for (let m = 0; m < M; m++) for (let n = 0; n < N; n++) {
      let s = 0;
      for (let k = 0; k < K; k++) s += a.data[ao + m * K + k]! * b.data[bo + k * N + n]!;
      out.data[(p * M + m) * N + n] = s;
    }
  }
  return out;
}

export function reshape(x: T64, shape: number[]): T64 {
  if (size(shape) !== x.data.length) throw new Error(`reshape [${x.shape}] -> [${shape}]`);
  return { shape: [...shape], data: x.data };
}

export function transpose(x: T64, perm: number[]): T64 {
  const shape = perm.map((p) => x.shape[p]!);
  const st = strides(x.shape);
  const out = t64(shape);
  for (let i = 0; i < out.data.length; i++) {
    const idx = unravel(i, shape);
    let k = 0;
    perm.forEach((p, a) => { k += idx[a]! * st[p]!; });
    out.data[i] = x.data[k]!;
  }
  return out;
}

/** x[..., start:end, ...] along one axis, step 1 (bounds already clamped, non-negative). */
export function slice(x: T64, axis: number, start: number, end: number): T64 {
  const ax = normAxis(axis, x.shape.length);
  const shape = x.shape.map((d, i) => (i === ax ? end - start : d));
  const st = strides(x.shape);
  const out = t64(shape);
  for (let i = 0; i < out.data.length; i++) {
    const idx = unravel(i, shape);
    idx[ax]! += start;
    out.data[i] = x.data[idx.reduce((k, v, a) => k + v * st[a]!, 0)]!;
  }
  return out;
}

export function concat(xs: T64[], axis: number): T64 {
  const ax = normAxis(axis, xs[0]!.shape.length);
  const shape = xs[0]!.shape.map((d, i) => (i === ax ? xs.reduce((s, x) => s + x.shape[ax]!, 0) : d));
  const out = t64(shape);
  const st = strides(shape);
  let off = 0;
  for (const x of xs) {
    for (let i = 0; i < x.data.length; i++) {
      const idx = unravel(i, x.shape);
      idx[ax]! += off;
      out.data[idx.reduce((k, v, a) => k + v * st[a]!, 0)] = x.data[i]!;
    }
    off += x.shape[ax]!;
  }
  return out;
}

export function split(x: T64, axis: number, sizes: number[]): T64[] {
  let off = 0;
  return sizes.map((s) => slice(x, axis, off, (off += s)));
}

/** Gather along `axis` with integer indices of shape idxShape. */
export function gather(data: T64, indices: readonly number[], idxShape: number[], axis: number): T64 {
  const ax = normAxis(axis, data.shape.length);
  const shape = [...data.shape.slice(0, ax), ...idxShape, ...data.shape.slice(ax + 1)];
  const st = strides(data.shape);
  const out = t64(shape);
  const q = idxShape.length;
  for (let i = 0; i < out.data.length; i++) {
    const idx = unravel(i, shape);
    const src = [...idx.slice(0, ax), indices[idx.slice(ax, ax + q).reduce((k, v, a) => k * idxShape[a]! + v, 0)]!, ...idx.slice(ax + q)];
    out.data[i] = data.data[src.reduce((k, v, a) => k + v * st[a]!, 0)]!;
  }
  return out;
}

/** out[idx] = data[idx with idx[axis] = indices[idx]], indices shaped like the output. */
export function gatherElements(data: T64, indices: readonly number[], idxShape: number[], axis: number): T64 {
  const ax = normAxis(axis, data.shape.length);
  const st = strides(data.shape);
  const out = t64(idxShape);
  for (let i = 0; i < out.data.length; i++) {
    const idx = unravel(i, idxShape);
    idx[ax] = indices[i]!;
    out.data[i] = data.data[idx.reduce((k, v, a) => k + v * st[a]!, 0)]!;
  }
  return out;
}

/** data with data[indices[j]] = updates[j] for index tuples over the leading dims (ScatterND, reduction none). */
export function scatterND(data: T64, indices: readonly number[], idxShape: number[], updates: T64): T64 {
  const out = { shape: [...data.shape], data: data.data.slice() };
  const kk = idxShape[idxShape.length - 1]!;
  const n = size(idxShape.slice(0, -1));
  const slab = size(data.shape.slice(kk));
  const st = strides(data.shape);
  for (let j = 0; j < n; j++) {
    let off = 0;
    for (let a = 0; a < kk; a++) off += indices[j * kk + a]! * st[a]!;
    for (let e = 0; e < slab; e++) out.data[off + e] = updates.data[j * slab + e]!;
  }
  return out;
}

/** Reduce over `axes` (all when empty) with a (sum) or mean. */
export function reduce(x: T64, axes: number[], keepdims: boolean, mean = false): T64 {
  const r = x.shape.length;
  const ax = axes.length ? axes.map((a) => normAxis(a, r)) : [...Array(r).keys()];
  const kept = x.shape.map((d, i) => (ax.includes(i) ? 1 : d));
  const out = t64(kept);
  const st = strides(kept);
  for (let i = 0; i < x.data.length; i++) {
    const idx = unravel(i, x.shape);
    out.data[idx.reduce((k, v, a) => k + (ax.includes(a) ? 0 : v) * st[a]!, 0)] += x.data[i]!;
  }
  if (mean) {
    const n = ax.reduce((p, a) => p * x.shape[a]!, 1);
    for (let i = 0; i < out.data.length; i++) out.data[i] /= n;
  }
  return keepdims ? out : reshape(out, x.shape.filter((_, i) => !ax.includes(i)));
}

export function softmax(x: T64, axis = -1, log = false): T64 {
  const ax = normAxis(axis, x.shape.length);
  const kept = x.shape.map((d, i) => (i === ax ? 1 : d));
  const max = t64(kept);
  max.data.fill(-Infinity);
  const st = strides(kept);
  const at = (idx: number[]) => idx.reduce((k, v, a) => k + (a === ax ? 0 : v) * st[a]!, 0);
  for (let i = 0; i < x.data.length; i++) { const k = at(unravel(i, x.shape)); max.data[k] = Math.max(max.data[k]!, x.data[i]!); }
  const sum = t64(kept);
  for (let i = 0; i < x.data.length; i++) { const k = at(unravel(i, x.shape)); sum.data[k] += Math.exp(x.data[i]! - max.data[k]!); }
  const out = t64(x.shape);
  for (let i = 0; i < x.data.length; i++) {
    const k = at(unravel(i, x.shape));
    const z = x.data[i]! - max.data[k]!;
    out.data[i] = log ? z - Math.log(sum.data[k]!) : Math.exp(z) / sum.data[k]!;
  }
  return out;
}

/** RMSNorm over the last axis: x / sqrt(mean(x^2) + eps) * w. */
export function rmsNorm(x: T64, w: T64, eps: number): T64 {
  const ms = reduce(mul(x, x), [-1], true, true);
  return mul(div(x, unary(ms, (v) => Math.sqrt(v + eps))), w);
}

/** LayerNorm over the last axis: (x - mean) / sqrt(var + eps) * w + b. */
export function layerNorm(x: T64, w: T64, b: T64 | null, eps: number): T64 {
  const xc = sub(x, reduce(x, [-1], true, true));
  const v = reduce(mul(xc, xc), [-1], true, true);
  const y = mul(div(xc, unary(v, (s) => Math.sqrt(s + eps))), w);
  return b ? add(y, b) : y;
}

export function gelu(x: T64, approximate: 'tanh' | 'none'): T64 {
  const c = Math.sqrt(2 / Math.PI);
  return approximate === 'tanh'
    ? unary(x, (v) => 0.5 * v * (1 + Math.tanh(c * (v + 0.044715 * v * v * v))))
    : unary(x, (v) => 0.5 * v * (1 + erf(v / Math.SQRT2)));
}

export { erf };

/** Mean over labels != ignoreIndex of -log softmax(logits)[label]; logits [..., V], labels flat over the rows. */
export function crossEntropy(logits: T64, labels: readonly number[], ignoreIndex = -100): number {
  const V = logits.shape[logits.shape.length - 1]!;
  const logp = softmax(logits, -1, true);
  let s = 0;
  let n = 0;
  labels.forEach((l, t) => {
    if (l === ignoreIndex) return;
    s -= logp.data[t * V + l]!;
    n++;
  });
  return s / Math.max(n, 1);
}

/** sum(y * r) */
export function dot(y: T64, r: ArrayLike<number>): number {
  if (y.data.length !== r.length) throw new Error(`dot: ${y.data.length} vs ${r.length}`);
  let s = 0;
  for (let i = 0; i < r.length; i++) s += y.data[i]! * r[i]!;
  return s;
}

/**
 * Central finite differences of f w.r.t. every element of x (changed in place, then restored):
 * step h = relStep * max(|x_i|, 1).
 */
export function numericGradient(f: () => number, x: Float64Array, relStep = 1e-3): Float64Array {
  const grad = new Float64Array(x.length);
  for (let i = 0; i < x.length; i++) {
    const v = x[i]!;
    const h = relStep * Math.max(Math.abs(v), 1);
    x[i] = v + h;
    const up = f();
    x[i] = v - h;
    const down = f();
    x[i] = v;
    grad[i] = (up - down) / (2 * h);
  }
  return grad;
}

/** max |a - b| / max |b| (b the reference; 0 when both are all zero). */
export function relError(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new Error(`relError: length ${a.length} != ${b.length}`);
  let diff = 0;
  let scale = 0;
  for (let i = 0; i < a.length; i++) {
    diff = Math.max(diff, Math.abs(a[i]! - b[i]!));
    scale = Math.max(scale, Math.abs(b[i]!));
  }
  return scale === 0 ? diff : diff / scale;
}
