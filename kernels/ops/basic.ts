import type { Dim, Graph, Value } from '../ir.js';

/** Thin typed wrappers over standard ONNX ops; shapes are informational ('?' where not worth inferring). */

/** Numpy-style broadcast of two (informational) shapes. */
export function broadcast(a: readonly Dim[], b: readonly Dim[]): Dim[] {
  const n = Math.max(a.length, b.length);
  const out: Dim[] = [];
  for (let i = 0; i < n; i++) {
    const x = a[a.length - n + i] ?? 1;
    const y = b[b.length - n + i] ?? 1;
    out.push(x === 1 ? y : x);
  }
  return out;
}

const binary = (opType: string) => (g: Graph, a: Value, b: Value, hint?: string): Value =>
  g.op1(opType, [a, b], { dtype: a.dtype, shape: broadcast(a.shape, b.shape) }, undefined, undefined, hint);

export const add = binary('Add');
export const sub = binary('Sub');
export const mul = binary('Mul');
export const div = binary('Div');

export function matmul(g: Graph, a: Value, b: Value, hint = 'matmul'): Value {
  const batch = broadcast(a.shape.slice(0, -2), b.shape.slice(0, -2));
  return g.op1('MatMul', [a, b], { dtype: a.dtype, shape: [...batch, a.shape[a.shape.length - 2]!, b.shape[b.shape.length - 1]!] }, undefined, undefined, hint);
}

export function reshape(g: Graph, x: Value, shape: Dim[], hint = 'reshape'): Value {
  // 0 keeps the input's dim, -1 infers it: symbolic dims are spelled with those.
  const target = shape.map((d) => (typeof d === 'number' ? d : 0));
  const out = shape.map((d, i) => (typeof d === 'number' ? (d === 0 ? x.shape[i]! : d === -1 ? '?' : d) : d));
  return g.op1('Reshape', [x, g.ints(target)], { dtype: x.dtype, shape: out }, undefined, undefined, hint);
}

export function transpose(g: Graph, x: Value, perm: number[], hint = 'transpose'): Value {
  return g.op1('Transpose', [x], { dtype: x.dtype, shape: perm.map((p) => x.shape[p]!) }, { perm }, undefined, hint);
}

export function gather(g: Graph, data: Value, indices: Value, axis = 0, hint = 'gather'): Value {
  const shape = [...data.shape.slice(0, axis), ...indices.shape, ...data.shape.slice(axis + 1)];
  return g.op1('Gather', [data, indices], { dtype: data.dtype, shape }, { axis }, undefined, hint);
}

export function concat(g: Graph, xs: Value[], axis: number, hint = 'concat'): Value {
  const first = xs[0]!;
  const ax = axis < 0 ? first.shape.length + axis : axis;
  const shape = first.shape.map((d, i) => (i === ax ? '?' : d));
  return g.op1('Concat', xs, { dtype: first.dtype, shape }, { axis }, undefined, hint);
}

/** x[..., start:end] along one axis (static bounds). */
export function slice(g: Graph, x: Value, axis: number, start: number, end: number, hint = 'slice'): Value {
  const ax = axis < 0 ? x.shape.length + axis : axis;
  const shape = x.shape.map((d, i) => (i === ax ? end - start : d));
  return g.op1('Slice', [x, g.ints([start]), g.ints([end]), g.ints([axis])], { dtype: x.dtype, shape }, undefined, undefined, hint);
}

export function softmax(g: Graph, x: Value, axis = -1, hint = 'softmax'): Value {
  return g.op1('Softmax', [x], { dtype: x.dtype, shape: x.shape }, { axis }, undefined, hint);
}

export function unary(g: Graph, opType: string, x: Value, hint = opType.toLowerCase()): Value {
  return g.op1(opType, [x], { dtype: x.dtype, shape: x.shape }, undefined, undefined, hint);
}

export function cast(g: Graph, x: Value, to: 'float32' | 'int64' | 'float16', hint = 'cast'): Value {
  const code = { float32: 1, int64: 7, float16: 10 }[to];
  return g.op1('Cast', [x], { dtype: to, shape: x.shape }, { to: code }, undefined, hint);
}

/** Dimension `axis` of x as an int64 tensor of shape [1]. */
export function dimOf(g: Graph, x: Value, axis: number, hint = 'dim'): Value {
  const shape = g.op1('Shape', [x], { dtype: 'int64', shape: [x.shape.length] }, undefined, undefined, `${hint}_shape`);
  return gather(g, shape, g.ints([axis]), 0, hint);
}

/** [0, 1, ..., n-1] for an int64 [1] or scalar n. */
export function range(g: Graph, n: Value, hint = 'range'): Value {
  const scalarN = n.shape.length === 0 ? n : reshape(g, n, [], `${hint}_n`);
  const zero = g.constant('zero_i64', 'int64', [], new BigInt64Array([0n]));
  const one = g.constant('one_i64', 'int64', [], new BigInt64Array([1n]));
  return g.op1('Range', [zero, scalarN, one], { dtype: 'int64', shape: ['?'] }, undefined, undefined, hint);
}

/** Where(cond, 0, -inf): an additive attention mask. */
export function additiveMask(g: Graph, keep: Value, hint = 'mask'): Value {
  return g.op1('Where', [keep, g.scalar(0), g.scalar(-Infinity)], { dtype: 'float32', shape: keep.shape }, undefined, undefined, hint);
}

export function compare(g: Graph, opType: 'Less' | 'LessOrEqual' | 'Greater', a: Value, b: Value, hint = opType.toLowerCase()): Value {
  return g.op1(opType, [a, b], { dtype: 'bool', shape: broadcast(a.shape, b.shape) }, undefined, undefined, hint);
}
