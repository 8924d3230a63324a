/**
 * Every gradient rule (kernels/ops/grad.ts) on a small graph y = op(inputs), loss = sum(y * R) with a fixed
 * random R (every output element matters), `gradients` w.r.t. the float inputs run on onnxruntime (float32),
 * against central finite differences (step 1e-3 * max(|x|, 1)) of a plain-TS float64 reference of the same op.
 * Pass: max |grad - fd| <= 1e-3 * max |fd|. Several cases declare symbolic dims so that the run-time
 * broadcasting / shape paths are exercised as well as the static ones.
 */
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { Graph, type Dim, type Value } from '../../kernels/ir.js';
import { gradients, quantizedLinearOp } from '../../kernels/autodiff.js';
import { add, cast, concat, div, gather, matmul, mul, reshape, slice, softmax, sub, transpose, unary } from '../../kernels/ops/basic.js';
import { gelu, layerNorm, rmsNorm } from '../../kernels/ops/nn.js';
import { dequantizeLinear, quantizeLinear, type QuantOptions } from '../../kernels/quant/index.js';
import * as R from '../../kernels/reference/grad.js';
import { randomFloats, runGraph, type Feed } from '../helpers/ort.js';

const TOL = 1e-3;
const INT64_MAX = 2 ** 53; // serialized as int64; any end past the dim means "to the end"

interface FloatIn { name: string; dims: number[]; data: Float32Array; shape?: Dim[]; diff?: boolean }
interface IntIn { name: string; dims: number[]; ints: number[]; shape?: Dim[] }
type In = FloatIn | IntIn;
type Vals = Record<string, R.T64>;
type Ints = Record<string, number[]>;

const f = (name: string, dims: number[], seed: number, scale = 1, shape?: Dim[], diff = true): FloatIn => ({ name, dims, data: randomFloats(R.size(dims), seed, scale), ...(shape ? { shape } : {}), diff });
/** Values in [lo, hi) (for Log, Sqrt, divisors ...). */
const pos = (name: string, dims: number[], seed: number, lo = 0.5, hi = 2): FloatIn => ({ name, dims, data: randomFloats(R.size(dims), seed, 1).map((v) => lo + ((v + 1) / 2) * (hi - lo)) });
const ints = (name: string, dims: number[], values: number[], shape?: Dim[]): IntIn => ({ name, dims, ints: values, ...(shape ? { shape } : {}) });

const measured: { name: string; rel: number }[] = [];
after(() => {
  const worst = measured.reduce((m, x) => Math.max(m, x.rel), 0);
  console.log(`grad-ops: ${measured.length} gradients, max rel error ${worst.toExponential(2)} (tolerance ${TOL})`);
  for (const m of measured) console.log(`  ${m.rel.toExponential(2)}  ${m.name}`);
});

let seedCounter = 1000;

/** Builds y, differentiates sum(y * R) on ORT, compares with finite differences of ref. */
async function check(name: string, inputs: In[], build: (g: Graph, v: Record<string, Value>) => Value, ref: (v: Vals, i: Ints) => R.T64, tol = TOL, exactR = false): Promise<number> {
  const vals: Vals = {};
  const intVals: Ints = {};
  for (const x of inputs) {
    if ('data' in x) vals[x.name] = R.t64(x.dims, x.data);
    else intVals[x.name] = x.ints;
  }
  const y0 = ref(vals, intVals);
  const r = randomFloats(y0.data.length, ++seedCounter);
  if (exactR) for (let i = 0; i < r.length; i++) r[i] = Math.round(r[i]! * 64) / 64;

  const g = new Graph(name.replace(/\W+/g, '_'));
  const v: Record<string, Value> = {};
  const feeds: Record<string, Feed> = {};
  for (const x of inputs) {
    if ('data' in x) {
      v[x.name] = g.input(x.name, 'float32', x.shape ?? x.dims);
      feeds[x.name] = { type: 'float32', data: x.data, dims: x.dims };
    } else {
      v[x.name] = g.input(x.name, 'int64', x.shape ?? x.dims);
      feeds[x.name] = { type: 'int64', data: x.ints, dims: x.dims };
    }
  }
  const y = build(g, v);
  const weighted = g.op1('Mul', [y, g.constant('r', 'float32', y0.shape, r)], { dtype: 'float32', shape: y.shape }, undefined, undefined, 'weighted');
  const loss = g.op1('ReduceSum', [weighted], { dtype: 'float32', shape: [] }, { keepdims: 0 }, undefined, 'loss');
  const wrt = inputs.filter((x): x is FloatIn => 'data' in x && x.diff !== false);
  const grads = gradients(g, loss, wrt.map((x) => v[x.name]!));
  g.output(loss, 'loss', []);
  grads.forEach((d, i) => g.output(d, `grad_${wrt[i]!.name}`, wrt[i]!.dims));
  const out = await runGraph(g, feeds);

  const lossRef = R.dot(y0, r);
  assert.ok(Math.abs(out['loss']![0]! - lossRef) <= 1e-4 * Math.max(1, Math.abs(lossRef)), `${name}: loss ${out['loss']![0]} vs ${lossRef}`);
  let worst = 0;
  for (const x of wrt) {
    const fd = R.numericGradient(() => R.dot(ref(vals, intVals), r), vals[x.name]!.data);
    const got = out[`grad_${x.name}`]!;
    assert.equal(got.length, fd.length, `${name}: d${x.name} has ${got.length} elements, expected ${fd.length}`);
    const rel = R.relError(got, fd);
    measured.push({ name: `${name} d/d${x.name}`, rel });
    worst = Math.max(worst, rel);
    assert.ok(rel <= tol, `${name}: d/d${x.name} rel error ${rel} > ${tol}`);
  }
  return worst;
}

// ---------------------------------------------------------------------------------------------------------
// Elementwise binary ops, with broadcasting

test('Add / Sub / Mul / Div / Sum, same shapes and broadcast', async () => {
  await check('Add same shape', [f('a', [2, 3], 1), f('b', [2, 3], 2)], (g, v) => add(g, v['a']!, v['b']!), (v) => R.add(v['a']!, v['b']!));
  await check('Add [2,3,4] + [4]', [f('a', [2, 3, 4], 3), f('b', [4], 4)], (g, v) => add(g, v['a']!, v['b']!), (v) => R.add(v['a']!, v['b']!));
  await check('Add [2,1,4] + [3,1]', [f('a', [2, 1, 4], 5), f('b', [3, 1], 6)], (g, v) => add(g, v['a']!, v['b']!), (v) => R.add(v['a']!, v['b']!));
  await check('Add [n,4] + [m,4], m=1 at run time', [f('a', [3, 4], 7, 1, ['n', 4]), f('b', [1, 4], 8, 1, ['m', 4])], (g, v) => add(g, v['a']!, v['b']!), (v) => R.add(v['a']!, v['b']!));
  await check('Add [n,1,4] + [?,3,?] run time both sides', [f('a', [2, 1, 4], 9, 1, ['n', 1, 4]), f('b', [3, 1], 10, 1, ['?', '?'])], (g, v) => add(g, v['a']!, v['b']!), (v) => R.add(v['a']!, v['b']!));
  await check('Sub [2,3] - [3]', [f('a', [2, 3], 11), f('b', [3], 12)], (g, v) => sub(g, v['a']!, v['b']!), (v) => R.sub(v['a']!, v['b']!));
  await check('Mul [2,3,4] * [3,1]', [f('a', [2, 3, 4], 13), f('b', [3, 1], 14)], (g, v) => mul(g, v['a']!, v['b']!), (v) => R.mul(v['a']!, v['b']!));
  await check('Mul by a constant scalar', [f('a', [2, 3], 15)], (g, v) => mul(g, v['a']!, g.scalar(0.37)), (v) => R.mul(v['a']!, R.scalar(Math.fround(0.37))));
  await check('Mul x * x', [f('a', [5], 16)], (g, v) => mul(g, v['a']!, v['a']!), (v) => R.mul(v['a']!, v['a']!));
  await check('Div [2,3] / [3]', [f('a', [2, 3], 17), pos('b', [3], 18)], (g, v) => div(g, v['a']!, v['b']!), (v) => R.div(v['a']!, v['b']!));
  await check('Div [3] / [2,3]', [f('a', [3], 19), pos('b', [2, 3], 20)], (g, v) => div(g, v['a']!, v['b']!), (v) => R.div(v['a']!, v['b']!));
  await check('Sum of [2,3], [3], [2,1]', [f('a', [2, 3], 21), f('b', [3], 22), f('c', [2, 1], 23)],
    (g, v) => g.op1('Sum', [v['a']!, v['b']!, v['c']!], { dtype: 'float32', shape: [2, 3] }),
    (v) => R.add(R.add(v['a']!, v['b']!), v['c']!));
});

test('MatMul: 2-D, rows @ weight, batched with broadcast batch dims, symbolic dims', async () => {
  await check('MatMul [3,4]@[4,5]', [f('a', [3, 4], 31), f('b', [4, 5], 32)], (g, v) => matmul(g, v['a']!, v['b']!), (v) => R.matmul(v['a']!, v['b']!));
  await check('MatMul [2,3,4]@[4,5]', [f('a', [2, 3, 4], 33), f('b', [4, 5], 34)], (g, v) => matmul(g, v['a']!, v['b']!), (v) => R.matmul(v['a']!, v['b']!));
  await check('MatMul [b,s,4]@[4,5] symbolic rows', [f('a', [2, 3, 4], 35, 1, ['b', 's', 4]), f('b', [4, 5], 36)], (g, v) => matmul(g, v['a']!, v['b']!), (v) => R.matmul(v['a']!, v['b']!));
  await check('MatMul [2,1,3,4]@[3,4,5]', [f('a', [2, 1, 3, 4], 37), f('b', [3, 4, 5], 38)], (g, v) => matmul(g, v['a']!, v['b']!), (v) => R.matmul(v['a']!, v['b']!));
  await check('MatMul [2,3,4]@[2,4,5]', [f('a', [2, 3, 4], 39), f('b', [2, 4, 5], 40)], (g, v) => matmul(g, v['a']!, v['b']!), (v) => R.matmul(v['a']!, v['b']!));
  await check('MatMul [3,4]@[2,4,5]', [f('a', [3, 4], 41), f('b', [2, 4, 5], 42)], (g, v) => matmul(g, v['a']!, v['b']!), (v) => R.matmul(v['a']!, v['b']!));
  await check('MatMul [n,3,4]@[m,4,5] m=1 at run time', [f('a', [2, 3, 4], 43, 1, ['n', 3, 4]), f('b', [1, 4, 5], 44, 1, ['m', 4, 5])], (g, v) => matmul(g, v['a']!, v['b']!), (v) => R.matmul(v['a']!, v['b']!));
});

// ---------------------------------------------------------------------------------------------------------
// Shape ops

test('Reshape / Transpose / Unsqueeze / Squeeze / Flatten / Identity / Expand', async () => {
  await check('Reshape [2,3,4]->[6,4]', [f('x', [2, 3, 4], 51)], (g, v) => reshape(g, v['x']!, [6, 4]), (v) => R.reshape(v['x']!, [6, 4]));
  await check('Reshape symbolic [b,3,4]->[0,-1]', [f('x', [2, 3, 4], 52, 1, ['b', 3, 4])], (g, v) => reshape(g, v['x']!, [0, -1]), (v) => R.reshape(v['x']!, [2, 12]));
  await check('Reshape chain, symbolic', [f('x', [2, 3, 4], 50, 1, ['b', 3, 4])], (g, v) => reshape(g, reshape(g, v['x']!, [0, -1]), [-1]), (v) => R.reshape(v['x']!, [24]));
  await check('Transpose [2,0,1]', [f('x', [2, 3, 4], 53)], (g, v) => transpose(g, v['x']!, [2, 0, 1]), (v) => R.transpose(v['x']!, [2, 0, 1]));
  await check('Transpose default (reverse)', [f('x', [2, 3, 4], 54)], (g, v) => g.op1('Transpose', [v['x']!], { dtype: 'float32', shape: [4, 3, 2] }), (v) => R.transpose(v['x']!, [2, 1, 0]));
  await check('Unsqueeze axes [1, -1]', [f('x', [2, 3], 55)], (g, v) => g.op1('Unsqueeze', [v['x']!, g.ints([1, -1])], { dtype: 'float32', shape: [2, 1, 3, 1] }), (v) => R.reshape(v['x']!, [2, 1, 3, 1]));
  await check('Squeeze axes [1]', [f('x', [2, 1, 3], 56)], (g, v) => g.op1('Squeeze', [v['x']!, g.ints([1])], { dtype: 'float32', shape: [2, 3] }), (v) => R.reshape(v['x']!, [2, 3]));
  await check('Squeeze all', [f('x', [2, 1, 3, 1], 57)], (g, v) => g.op1('Squeeze', [v['x']!], { dtype: 'float32', shape: [2, 3] }), (v) => R.reshape(v['x']!, [2, 3]));
  await check('Flatten axis 1', [f('x', [2, 3, 4], 58)], (g, v) => g.op1('Flatten', [v['x']!], { dtype: 'float32', shape: [2, 12] }, { axis: 1 }), (v) => R.reshape(v['x']!, [2, 12]));
  await check('Identity', [f('x', [3], 59)], (g, v) => g.op1('Identity', [v['x']!], { dtype: 'float32', shape: [3] }), (v) => v['x']!);
  await check('Expand [3,1]->[2,3,4]', [f('x', [3, 1], 60)], (g, v) => g.op1('Expand', [v['x']!, g.ints([2, 3, 4])], { dtype: 'float32', shape: [2, 3, 4] }), (v) => R.add(v['x']!, R.t64([2, 3, 4])));
});

test('Slice (static, negative, multi-axis, symbolic dims, run-time bounds), Concat, Split', async () => {
  await check('Slice rope halves', [f('x', [2, 3, 8], 61)],
    (g, v) => concat(g, [mul(g, slice(g, v['x']!, -1, 4, 8), g.scalar(-1)), slice(g, v['x']!, -1, 0, 4)], -1),
    (v) => R.concat([R.mul(R.slice(v['x']!, -1, 4, 8), R.scalar(-1)), R.slice(v['x']!, -1, 0, 4)], -1));
  await check('Slice start -3 to end', [f('x', [2, 5, 3], 62)],
    (g, v) => g.op1('Slice', [v['x']!, g.ints([-3]), g.ints([INT64_MAX]), g.ints([1])], { dtype: 'float32', shape: [2, 3, 3] }),
    (v) => R.slice(v['x']!, 1, 2, 5));
  await check('Slice two axes, no axes input', [f('x', [4, 5], 63)],
    (g, v) => g.op1('Slice', [v['x']!, g.ints([1, 0]), g.ints([3, -2])], { dtype: 'float32', shape: [2, 3] }),
    (v) => R.slice(R.slice(v['x']!, 0, 1, 3), 1, 0, 3));
  await check('Slice symbolic dim [n,6][1:3]', [f('x', [4, 6], 64, 1, ['n', 6])],
    (g, v) => g.op1('Slice', [v['x']!, g.ints([1]), g.ints([3]), g.ints([0])], { dtype: 'float32', shape: [2, 6] }),
    (v) => R.slice(v['x']!, 0, 1, 3));
  await check('Slice run-time ends', [f('x', [3, 7], 65), ints('end', [1], [-2])],
    (g, v) => g.op1('Slice', [v['x']!, g.ints([2]), v['end']!, g.ints([1])], { dtype: 'float32', shape: [3, '?'] }),
    (v) => R.slice(v['x']!, 1, 2, 5));
  await check('Concat static', [f('a', [2, 3], 66), f('b', [2, 5], 67)], (g, v) => concat(g, [v['a']!, v['b']!], 1), (v) => R.concat([v['a']!, v['b']!], 1));
  await check('Concat symbolic sizes', [f('a', [2, 3], 68, 1, ['n', 3]), f('b', [4, 3], 69, 1, ['m', 3])], (g, v) => concat(g, [v['a']!, v['b']!], 0), (v) => R.concat([v['a']!, v['b']!], 0));
  await check('Split, one output unused', [f('x', [2, 9], 70)], (g, v) => {
    const [a, , c] = g.op('Split', [v['x']!, g.ints([2, 3, 4])], { attrs: { axis: 1 }, outputs: [2, 3, 4].map((n) => ({ dtype: 'float32' as const, shape: [2, n] })) });
    return concat(g, [c!, mul(g, a!, g.scalar(3))], 1);
  }, (v) => {
    const [a, , c] = R.split(v['x']!, 1, [2, 3, 4]);
    return R.concat([c!, R.mul(a!, R.scalar(3))], 1);
  });
});

test('Gather (axis 0 and 1, repeated indices), GatherElements, ScatterND', async () => {
  const idx = [0, 4, 0, 2, 2, 1];
  await check('Gather axis 0', [f('x', [5, 3], 71), ints('i', [2, 3], idx)], (g, v) => gather(g, v['x']!, v['i']!, 0), (v, i) => R.gather(v['x']!, i['i']!, [2, 3], 0));
  await check('Gather axis 1', [f('x', [2, 5, 3], 72), ints('i', [4], [1, 3, 1, 0])], (g, v) => gather(g, v['x']!, v['i']!, 1), (v, i) => R.gather(v['x']!, i['i']!, [4], 1));
  await check('Gather axis 1, 2-D indices, symbolic data', [f('x', [2, 5, 3], 73, 1, ['b', 5, 3]), ints('i', [2, 2], [4, 0, 4, 2])], (g, v) => gather(g, v['x']!, v['i']!, 1), (v, i) => R.gather(v['x']!, i['i']!, [2, 2], 1));
  const ge = [0, 4, 1, 1, 3, 3, 2, 0, 4, 4, 1, 2];
  await check('GatherElements axis -1', [f('x', [2, 3, 5], 74), ints('i', [2, 3, 2], ge)],
    (g, v) => g.op1('GatherElements', [v['x']!, v['i']!], { dtype: 'float32', shape: [2, 3, 2] }, { axis: -1 }),
    (v, i) => R.gatherElements(v['x']!, i['i']!, [2, 3, 2], -1));
  // As in nn.ts attention: new rows scattered into a window at (batch, position).
  const sIdx = [0, 1, 0, 4, 1, 0, 1, 5];
  await check('ScatterND data and updates', [f('d', [2, 6, 4], 75), ints('i', [2, 2, 2], sIdx), f('u', [2, 2, 4], 76)],
    (g, v) => g.op1('ScatterND', [v['d']!, v['i']!, v['u']!], { dtype: 'float32', shape: [2, 6, 4] }),
    (v, i) => R.scatterND(v['d']!, i['i']!, [2, 2, 2], v['u']!));
});

// ---------------------------------------------------------------------------------------------------------
// Activations, reductions, normalization

test('Softmax / LogSoftmax and unary ops', async () => {
  await check('Softmax axis -1', [f('x', [2, 3, 5], 81, 2)], (g, v) => softmax(g, v['x']!, -1), (v) => R.softmax(v['x']!, -1));
  await check('Softmax axis 1', [f('x', [2, 3, 5], 82, 2)], (g, v) => softmax(g, v['x']!, 1), (v) => R.softmax(v['x']!, 1));
  await check('LogSoftmax axis -1', [f('x', [2, 3, 5], 83, 2)], (g, v) => g.op1('LogSoftmax', [v['x']!], { dtype: 'float32', shape: [2, 3, 5] }, { axis: -1 }), (v) => R.softmax(v['x']!, -1, true));
  await check('LogSoftmax axis 0', [f('x', [4, 3], 84, 2)], (g, v) => g.op1('LogSoftmax', [v['x']!], { dtype: 'float32', shape: [4, 3] }, { axis: 0 }), (v) => R.softmax(v['x']!, 0, true));
  const un = (op: string, fn: (x: number) => number, x: FloatIn) => check(op, [x], (g, v) => unary(g, op, v['x']!), (v) => R.unary(v['x']!, fn));
  await un('Sigmoid', R.sigmoid, f('x', [2, 6], 85, 3));
  await un('Tanh', Math.tanh, f('x', [2, 6], 86, 2));
  await un('Exp', Math.exp, f('x', [2, 6], 87, 2));
  await un('Log', Math.log, pos('x', [2, 6], 88));
  await un('Sqrt', Math.sqrt, pos('x', [2, 6], 89));
  await un('Reciprocal', (x) => 1 / x, pos('x', [2, 6], 90));
  await un('Erf', R.erf, f('x', [2, 6], 91, 2));
  await un('Neg', (x) => -x, f('x', [2, 6], 92));
  const relu = f('x', [2, 6], 93, 2);
  relu.data = relu.data.map((x) => (Math.abs(x) < 0.05 ? x + 0.1 : x)); // away from the kink
  await un('Relu', (x) => Math.max(x, 0), relu);
  await check('Sigmoid via swiglu-style x * sigmoid(x)', [f('x', [7], 94, 3)], (g, v) => mul(g, v['x']!, unary(g, 'Sigmoid', v['x']!)), (v) => R.unary(v['x']!, (x) => x * R.sigmoid(x)));
});

test('Pow (constant exponents, tensor exponent, w.r.t. the exponent), Where, Cast', async () => {
  const p = (k: number) => check(`Pow ${k}`, [pos('x', [2, 5], 100 + k)], (g, v) => g.op1('Pow', [v['x']!, g.scalar(k)], { dtype: 'float32', shape: [2, 5] }), (v) => R.unary(v['x']!, (x) => Math.pow(x, k)));
  await p(2);
  await p(3);
  await p(0.5);
  await p(-1.5);
  await check('Pow tensor constant exponent [5]', [pos('x', [2, 5], 110)],
    (g, v) => g.op1('Pow', [v['x']!, g.constant('e', 'float32', [5], new Float32Array([1, 2, 0.5, -1, 3]))], { dtype: 'float32', shape: [2, 5] }),
    (v) => R.map([v['x']!, R.t64([5], [1, 2, 0.5, -1, 3])], (x, e) => Math.pow(x!, e!)));
  await check('Pow w.r.t. x and exponent [5]', [pos('x', [2, 5], 111), pos('e', [5], 112, -1, 2)],
    (g, v) => g.op1('Pow', [v['x']!, v['e']!], { dtype: 'float32', shape: [2, 5] }),
    (v) => R.map([v['x']!, v['e']!], (x, e) => Math.pow(x!, e!)));
  // Condition from an int64 input; branches broadcast.
  await check('Where [2,3] / [3]', [ints('c', [2, 3], [0, 3, 1, 4, 2, 0]), f('a', [2, 3], 113), f('b', [3], 114)],
    (g, v) => g.op1('Where', [g.op1('Less', [v['c']!, g.ints([2])], { dtype: 'bool', shape: [2, 3] }), v['a']!, v['b']!], { dtype: 'float32', shape: [2, 3] }),
    (v, i) => R.map([v['a']!, v['b']!, R.t64([2, 3], i['c']!)], (a, b, c) => (c! < 2 ? a! : b!)));
  // float32 -> float16 -> float32: x and R are multiples of 1/64 (exact in float16), so nothing rounds.
  const x = f('x', [2, 4], 115);
  x.data = x.data.map((v) => Math.round(v * 64) / 64);
  await check('Cast f32 -> f16 -> f32', [x], (g, v) => cast(g, cast(g, v['x']!, 'float16'), 'float32'), (v) => v['x']!, TOL, true);
});

test('ReduceSum / ReduceMean (axes, keepdims, all, run-time count)', async () => {
  const rs = (name: string, axes: number[] | null, keep: number, mean: boolean, x: FloatIn, outShape: Dim[]) =>
    check(name, [x], (g, v) => g.op1(mean ? 'ReduceMean' : 'ReduceSum', axes ? [v['x']!, g.ints(axes)] : [v['x']!], { dtype: 'float32', shape: outShape }, { keepdims: keep }),
      (v) => R.reduce(v['x']!, axes ?? [], keep === 1, mean));
  await rs('ReduceSum axes [1] keepdims 0', [1], 0, false, f('x', [2, 3, 4], 121), [2, 4]);
  await rs('ReduceSum axes [0,-1] keepdims 1', [0, -1], 1, false, f('x', [2, 3, 4], 122), [1, 3, 1]);
  await rs('ReduceSum all keepdims 0', null, 0, false, f('x', [2, 3], 123), []);
  await rs('ReduceMean axes [-1] keepdims 1', [-1], 1, true, f('x', [2, 3, 4], 124), [2, 3, 1]);
  await rs('ReduceMean symbolic [n,4] axes [0]', [0], 0, true, f('x', [3, 4], 125, 1, ['n', 4]), [4]);
  await rs('ReduceMean all keepdims 1', null, 1, true, f('x', [3, 4], 126), [1, 1]);
  await check('ReduceSum run-time axes keepdims 1', [f('x', [2, 3, 4], 127), ints('axes', [1], [1])],
    (g, v) => g.op1('ReduceSum', [v['x']!, v['axes']!], { dtype: 'float32', shape: [2, 1, 4] }, { keepdims: 1 }), (v) => R.reduce(v['x']!, [1], true));
  await check('ReduceMean run-time axes keepdims 1', [f('x', [2, 3, 4], 128), ints('axes', [2], [0, 2])],
    (g, v) => g.op1('ReduceMean', [v['x']!, v['axes']!], { dtype: 'float32', shape: [1, 3, 1] }, { keepdims: 1 }), (v) => R.reduce(v['x']!, [0, 2], true, true));
  await check('ReduceSum empty axes, noop', [f('x', [2, 3], 129)],
    (g, v) => g.op1('ReduceSum', [v['x']!, g.ints([])], { dtype: 'float32', shape: [2, 3] }, { keepdims: 1, noop_with_empty_axes: 1 }), (v) => v['x']!);
});

test('SimplifiedLayerNormalization (RMSNorm), LayerNormalization, Gelu', async () => {
  await check('RMSNorm x and weight', [f('x', [2, 3, 8], 131, 2), f('w', [8], 132)],
    (g, v) => rmsNorm(g, v['x']!, v['w']!, 1e-5), (v) => R.rmsNorm(v['x']!, v['w']!, Math.fround(1e-5)));
  await check('RMSNorm symbolic rows', [f('x', [2, 3, 8], 133, 2, ['b', 's', 8]), f('w', [8], 134, 1, undefined, false)],
    (g, v) => rmsNorm(g, v['x']!, v['w']!, 1e-6), (v) => R.rmsNorm(v['x']!, v['w']!, Math.fround(1e-6)));
  await check('LayerNorm x, weight, bias', [f('x', [2, 3, 8], 135, 2), f('w', [8], 136), f('b', [8], 137)],
    (g, v) => layerNorm(g, v['x']!, v['w']!, v['b']!, 1e-5), (v) => R.layerNorm(v['x']!, v['w']!, v['b']!, Math.fround(1e-5)));
  await check('LayerNorm 2-D, no bias', [f('x', [4, 6], 138, 2), f('w', [6], 139)],
    (g, v) => g.op1('LayerNormalization', [v['x']!, v['w']!], { dtype: 'float32', shape: [4, 6] }, { axis: -1, epsilon: { float: 1e-5 } }),
    (v) => R.layerNorm(v['x']!, v['w']!, null, Math.fround(1e-5)));
  await check('Gelu tanh', [f('x', [3, 7], 140, 3)], (g, v) => gelu(g, v['x']!, 'tanh'), (v) => R.gelu(v['x']!, 'tanh'));
  await check('Gelu none (erf)', [f('x', [3, 7], 141, 3)], (g, v) => gelu(g, v['x']!, 'none'), (v) => R.gelu(v['x']!, 'none'));
});

// ---------------------------------------------------------------------------------------------------------
// Frozen quantized linear: dX through DequantizeLinear (or the NF4 table) on the same bytes

const QUANTS: { name: string; opts: QuantOptions; K: number }[] = [
  { name: 'int4 symmetric', opts: { kind: 'int4', blockSize: 32 }, K: 64 },
  { name: 'int4 asymmetric, K padded, odd blocks', opts: { kind: 'int4', blockSize: 32, symmetric: false }, K: 80 },
  { name: 'int8', opts: { kind: 'int8', blockSize: 32 }, K: 48 },
  { name: 'nf4', opts: { kind: 'nf4', blockSize: 64 }, K: 64 },
  { name: 'nf4, N*K not a multiple of the block', opts: { kind: 'nf4', blockSize: 64 }, K: 40 },
  { name: 'none (float)', opts: { kind: 'none' }, K: 24 },
];

test('quantizedLinearOp: dX = dY . Wdeq exactly (float32 rounding) and against finite differences', async () => {
  const N = 10;
  for (const [j, c] of QUANTS.entries()) {
    const q = quantizeLinear(randomFloats(N * c.K, 150 + j, 0.5), N, c.K, c.opts, `proj${j}`);
    const wT = R.transpose(R.t64([N, c.K], dequantizeLinear(q)), [1, 0]); // [K, N]
    const rel = await check(`quantized linear ${c.name}`, [f('x', [2, 3, c.K], 160 + j, 1, ['b', 's', c.K])],
      (g, v) => quantizedLinearOp(g, v['x']!, q), (v) => R.matmul(v['x']!, wT), 1e-5);
    assert.ok(rel < 1e-5, `${c.name}: ${rel}`);
  }
});

test('quantizedLinearOp: one weight used twice shares its initializers and one dequantized copy', async () => {
  const N = 6, K = 32;
  const q = quantizeLinear(randomFloats(N * K, 170, 0.5), N, K, { kind: 'int4', blockSize: 32 }, 'shared');
  const wT = R.transpose(R.t64([N, K], dequantizeLinear(q)), [1, 0]);
  let g0: Graph | undefined;
  await check('quantized linear used twice', [f('a', [3, K], 171), f('b', [2, K], 172)], (g, v) => {
    g0 = g;
    return concat(g, [quantizedLinearOp(g, v['a']!, q), quantizedLinearOp(g, v['b']!, q)], 0);
  }, (v) => R.concat([R.matmul(v['a']!, wT), R.matmul(v['b']!, wT)], 0), 1e-5);
  const dq = g0!.toOnnx().nodes.filter((n) => n.opType === 'DequantizeLinear');
  assert.equal(dq.length, 1);
});
