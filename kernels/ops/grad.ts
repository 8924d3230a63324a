/**
 * Gradient rules for kernels/autodiff.ts: one per recorded op type, each emitting standard ONNX ops (opset 21)
 * into the same graph. A rule gets the forward node (its input/output Values and attributes), dLoss/dOutput per
 * output, and which inputs need a gradient; it returns one gradient per input (null: none), shaped like it.
 *
 * Shapes in the IR are partly symbolic, so broadcasting is undone at run time unless the informational shapes
 * settle it statically (see unbroadcast). Named dims ('batch', 'seq') are trusted to mean the same size.
 */
import { broadcast } from './basic.js';
import type { OnnxAttributeValue, OnnxDataType, OnnxNode, OnnxTensor } from '../onnx.js';
import type { Dim, Graph, TapeNode, Value } from '../ir.js';
import { emitDequantizedWeight, emitLinear, type BlockIntLinear, type QuantizedLinear } from '../quant/index.js';

export interface GradArgs {
  g: Graph;
  node: TapeNode;
  /** dLoss/dOutput for each output; null where that output does not reach the loss. */
  dOut: (Value | null)[];
  /** needs[i]: input i lies on a path from a `wrt` value (it wants a gradient). */
  needs: boolean[];
}

/** One gradient per input (null / undefined: none); only the inputs with needs[i] are read. */
export type GradRule = (a: GradArgs) => (Value | null | undefined)[];

export const DIFFERENTIABLE: ReadonlySet<OnnxDataType> = new Set<OnnxDataType>(['float32', 'float16']);

// ---------------------------------------------------------------------------------------------------------
// Small emit helpers (every node goes through Graph.op, so backward graphs are recorded too)

function like(g: Graph, opType: string, inputs: (Value | null)[], shape: readonly Dim[], attrs?: Record<string, OnnxAttributeValue>, hint?: string, dtype: OnnxDataType = 'float32'): Value {
  return g.op1(opType, inputs, { dtype, shape }, attrs, undefined, hint);
}

const bin = (opType: string) => (g: Graph, a: Value, b: Value, hint?: string): Value =>
  like(g, opType, [a, b], broadcast(a.shape, b.shape), undefined, hint, a.dtype);
const addV = bin('Add');
const subV = bin('Sub');
const mulV = bin('Mul');
const divV = bin('Div');
const neg = (g: Graph, a: Value, hint = 'neg'): Value => like(g, 'Neg', [a], a.shape, undefined, hint, a.dtype);


/** Same dim for sure: equal numbers, or the same symbolic name ('?' is never equal). */
function sameDim(a: Dim | undefined, b: Dim | undefined): boolean {
  return a !== undefined && a === b && a !== '?';
}

function sameShape(a: readonly Dim[], b: readonly Dim[]): boolean {
  return a.length === b.length && a.every((d, i) => sameDim(d, b[i]));
}

function staticDims(v: Value): number[] | undefined {
  return v.shape.every((d) => typeof d === 'number') ? (v.shape as number[]) : undefined;
}

const shapeKey = (v: Value) => `grad:shape:${v.name}`;

/** Shape(v) as int64 [rank]: a constant when static, else one Shape node per value. */
export function shapeTensor(g: Graph, v: Value): Value {
  const dims = staticDims(v);
  if (dims) return g.ints(dims);
  return g.once(shapeKey(v), () => like(g, 'Shape', [v], [v.shape.length], undefined, `${v.name}_shape`, 'int64'));
}

/** Zeros shaped like v (ConstantOfShape: no read of v). */
export function zerosLike(g: Graph, v: Value, hint = 'zeros'): Value {
  const value: OnnxTensor | undefined = v.dtype === 'float16' ? { name: 'value', dataType: 'float16', dims: [1], data: new Uint16Array(1) } : undefined;
  return like(g, 'ConstantOfShape', [shapeTensor(g, v)], v.shape, value ? { value } : undefined, hint, v.dtype);
}

function reduceSum(g: Graph, x: Value, axes: number[], keepdims: boolean, shape: readonly Dim[], hint = 'sum'): Value {
  return like(g, 'ReduceSum', [x, g.ints(axes)], shape, { keepdims: keepdims ? 1 : 0 }, hint, x.dtype);
}

function reduceMean(g: Graph, x: Value, axes: number[], hint = 'mean'): Value {
  const r = x.shape.length;
  const shape = x.shape.map((d, i) => (axes.includes(i) || axes.includes(i - r) ? 1 : d));
  return like(g, 'ReduceMean', [x, g.ints(axes)], shape, { keepdims: 1 }, hint, x.dtype);
}

/** x with its last two axes swapped; a Transpose that made x is folded in (x^T^T = x for a LoRA A^T). */
function transposeLast2(g: Graph, x: Value, hint = 't'): Value {
  return g.once(`grad:t:${x.name}`, () => swapLast2(g, x, hint)); // shared by every backward use of x
}

function swapLast2(g: Graph, x: Value, hint: string): Value {
  const r = x.shape.length;
  let perm = [...Array(r).keys()];
  [perm[r - 2], perm[r - 1]] = [perm[r - 1]!, perm[r - 2]!];
  let src = x;
  const made = g.producer(x);
  if (made?.opType === 'Transpose' && made.inputs[0]) {
    const inner = (made.attrs['perm'] as number[] | undefined) ?? [...Array(r).keys()].reverse();
    src = made.inputs[0];
    perm = perm.map((p) => inner[p]!);
    if (perm.every((p, i) => p === i)) return src;
  }
  return like(g, 'Transpose', [src], perm.map((p) => src.shape[p]!), { perm }, hint, x.dtype);
}

/**
 * d (shaped like a broadcast result) summed back to x's shape. Static when the informational shapes decide
 * every axis (leading axes always reduce; an axis reduces when x has a literal 1 there); otherwise the leading
 * axes are summed away, then the axes where Shape(x) is 1 at run time (NonZero(Equal(., 1)), keepdims).
 */
export function unbroadcast(g: Graph, d: Value, x: Value, hint = 'unbroadcast'): Value {
  if (sameShape(d.shape, x.shape)) return d;
  const r = d.shape.length;
  const lead = r - x.shape.length;
  if (lead < 0) throw new Error(`unbroadcast: gradient ${d.name} has rank ${r} < rank ${x.shape.length} of ${x.name}`);
  const axes: number[] = [];
  let decided = true;
  for (let i = 0; i < r; i++) {
    if (i < lead) { axes.push(i); continue; }
    const xd = x.shape[i - lead]!;
    const yd = d.shape[i]!;
    if (xd === 1) { if (yd !== 1) axes.push(i); } // reducing a size-1 axis is harmless, skipping it is leaner
    else if (typeof xd === 'number' || sameDim(xd, yd)) continue; // x's dim is not 1: no broadcast there
    else { decided = false; break; }
  }
  if (decided) {
    if (axes.length === 0) return d;
    if (axes.every((a) => a < lead)) return reduceSum(g, d, axes, false, x.shape, hint);
    const kept = reduceSum(g, d, axes, true, d.shape.map((v, i) => (axes.includes(i) ? 1 : v)), `${hint}_keep`);
    return lead === 0 ? kept : like(g, 'Squeeze', [kept, g.ints([...Array(lead).keys()])], x.shape, undefined, hint, d.dtype);
  }
  // Leading axes first (static), then the axes where x is 1 at run time, kept: that is x's shape already, so no
  // Reshape to Shape(x) (see reshapeLike for the ORT fusion bug such a Reshape can trigger).
  const d1 = lead === 0 ? d : reduceSum(g, d, [...Array(lead).keys()], false, d.shape.slice(lead), `${hint}_lead`);
  const isOne = like(g, 'Equal', [shapeTensor(g, x), g.ints([1])], [x.shape.length], undefined, `${hint}_is1`, 'bool');
  const nz = like(g, 'NonZero', [isOne], [1, '?'], undefined, `${hint}_nz`, 'int64');
  const dynAxes = like(g, 'Squeeze', [nz, g.ints([0])], ['?'], undefined, `${hint}_axes`, 'int64');
  return like(g, 'ReduceSum', [d1, dynAxes], x.shape, { keepdims: 1, noop_with_empty_axes: 1 }, hint, d.dtype);
}

/**
 * d reshaped to x's shape. The target is a constant when x's informational shape allows (numbers, 0 for a named
 * dim that d has at the same index, one -1), else Shape(x). A d that is itself one of these reshapes is replaced
 * by its source, so backward graphs have no Reshape -> Reshape chains: ORT 1.30's FuseContiguousReshapes fails
 * ("GetIndexFromName") on such a chain when the inner target comes from a Shape node.
 */
export function reshapeLike(g: Graph, d: Value, x: Value, hint = 'dx'): Value {
  const sources = g.once('grad:reshape_sources', () => new Map<string, Value>());
  const src = sources.get(d.name) ?? d;
  if (sameShape(src.shape, x.shape)) return src;
  const out = like(g, 'Reshape', [src, reshapeTarget(g, src, x)], x.shape, undefined, hint, d.dtype);
  sources.set(out.name, src);
  return out;
}

/** d's source when d was made by reshapeLike (reshaping that instead saves a chain), else d. */
function reshapeSource(g: Graph, d: Value): Value {
  return g.once('grad:reshape_sources', () => new Map<string, Value>()).get(d.name) ?? d;
}

function reshapeTarget(g: Graph, src: Value, x: Value): Value {
  let unknown = 0;
  const target = x.shape.map((dim, i) => {
    if (typeof dim === 'number') return dim;
    if (dim !== '?' && src.shape[i] === dim) return 0;
    unknown++;
    return -1;
  });
  return unknown <= 1 ? g.ints(target) : shapeTensor(g, x);
}

// ---------------------------------------------------------------------------------------------------------
// Attribute access

function intAttr(n: TapeNode, name: string, def: number): number {
  const v = n.attrs[name];
  return typeof v === 'number' ? v : def;
}

function floatAttr(n: TapeNode, name: string, def: number): number {
  const v = n.attrs[name];
  if (typeof v === 'number') return v;
  if (v && typeof v === 'object' && 'float' in v) return v.float;
  return def;
}

function normAxis(axis: number, rank: number): number {
  return axis < 0 ? axis + rank : axis;
}

/** v's shape with one axis reduced to 1 (keepdims). */
function keptShape(v: Value, axis: number): Dim[] {
  const ax = normAxis(axis, v.shape.length);
  return v.shape.map((d, i) => (i === ax ? 1 : d));
}

function input(n: TapeNode, i: number): Value {
  const v = n.inputs[i];
  if (!v) throw new Error(`${n.opType} ${n.name}: input ${i} is absent`);
  return v;
}

/** The rule's single upstream gradient (single-output ops). */
function dy(a: GradArgs): Value {
  const d = a.dOut[0];
  if (!d) throw new Error(`${a.node.opType} ${a.node.name}: no gradient for its output`);
  return d;
}

function unsupported(n: TapeNode, what: string): never {
  throw new Error(`gradient of ${n.opType} (${n.name}): ${what}`);
}

// ---------------------------------------------------------------------------------------------------------
// Rules

const elementwise = (f: (a: GradArgs, d: Value, x: Value, y: Value) => Value): GradRule => (a) => {
  const x = input(a.node, 0);
  return [f(a, dy(a), x, a.node.outputs[0]!)];
};

function matmulRule(a: GradArgs): (Value | null)[] {
  const { g, node, needs } = a;
  const d = dy(a);
  const A = input(node, 0);
  const B = input(node, 1);
  const ra = A.shape.length;
  const rb = B.shape.length;
  if (ra < 2 || rb < 2) unsupported(node, '1-D MatMul operands are not supported (reshape to 2-D)');
  let dA: Value | null = null;
  let dB: Value | null = null;
  if (needs[0]) {
    const full = like(g, 'MatMul', [d, transposeLast2(g, B, 'b_t')], [...d.shape.slice(0, -1), A.shape[ra - 1]!], undefined, 'da_full');
    dA = unbroadcast(g, full, A, 'da');
  }
  if (needs[1]) {
    const [K, N] = B.shape as [Dim, Dim];
    if (rb === 2 && ra > 2 && typeof K === 'number' && typeof N === 'number') {
      // x [.., K] @ W [K, N]: one GEMM over all rows, [K, rows] @ [rows, N] (the Transpose folds into FusedMatMul).
      const a2 = g.once(`grad:rows:${A.name}:${K}`, () => like(g, 'Reshape', [A, g.ints([-1, K])], ['?', K], undefined, 'a_rows'));
      const d2 = like(g, 'Reshape', [reshapeSource(g, d), g.ints([-1, N])], ['?', N], undefined, 'd_rows');
      dB = like(g, 'MatMul', [transposeLast2(g, a2, 'a_t'), d2], [K, N], undefined, 'db');
    } else {
      const full = like(g, 'MatMul', [transposeLast2(g, A, 'a_t'), d], [...d.shape.slice(0, -2), B.shape[rb - 2]!, d.shape[d.shape.length - 1]!], undefined, 'db_full');
      dB = unbroadcast(g, full, B, 'db');
    }
  }
  return [dA, dB];
}

/** dX of a frozen quantized linear: dY @ W with W [N, K] rebuilt from the SAME packed bytes (ENGINE-NOTES). */
function quantizedLinearRule(a: GradArgs): (Value | null)[] {
  const { g, node } = a;
  const q = node.meta?.['quantized'] as QuantizedLinear | undefined;
  if (!q) unsupported(node, 'no quantized weight recorded; build it with quantizedLinearOp');
  if (a.needs.some((n, i) => n && i > 0)) unsupported(node, 'the quantized weight is frozen (gradient w.r.t. x only)');
  if (!a.needs[0]) return [];
  const x = input(node, 0);
  // Its own dequantization, after dY: the recomputed forward's W could serve here too, but holding it until dX
  // raised the 1.1B step's peak by 0.7 GB for 10 % of speed (measured).
  const w = dequantizedWeight(g, q, dy(a));
  return [like(g, 'MatMul', [dy(a), w], x.shape, undefined, 'dx')];
}

/**
 * W [N, K] float32 from q's packed initializers, built once per graph (every backward use shares it).
 * With `after`, the dequantization takes a data dependency on it (its scales plus an exact 0 derived from it):
 * otherwise every layer's float weight depends on initializers only, onnxruntime computes them all at the start
 * of the run and the whole float32 model stays alive through the forward pass.
 */
export function dequantizedWeight(g: Graph, q: QuantizedLinear, after?: Value): Value {
  return g.once(`grad:dq:${q.namePrefix}`, () => {
    const { nodes, out } = dequantization(g, q);
    const dq = { nodes: nodes.map((n) => ({ ...n, inputs: [...n.inputs] })) };
    const deq = dq.nodes.find((n) => n.opType === 'DequantizeLinear');
    if (after && deq) {
      // A sum, not a max: `after` may be empty (a chunk past the end of the sequence), whose max is -inf.
      const zero = g.op1('Mul', [g.op1('ReduceSum', [after], { dtype: 'float32', shape: [] }, { keepdims: 0 }, undefined, `${q.namePrefix}.after_sum`), g.scalar(0)], { dtype: 'float32', shape: [] }, undefined, undefined, `${q.namePrefix}.after_zero`);
      const scale = g.fresh(`${q.namePrefix}.scale_after`);
      g.emit([{ opType: 'Add', name: g.fresh(`${q.namePrefix}.scale_after_node`), inputs: [deq.inputs[1]!, zero.name], outputs: [scale] }]);
      deq.inputs[1] = scale;
    }
    g.emit(dq.nodes);
    return { name: out, dtype: 'float32' as const, shape: [q.N, q.K] };
  });
}

/**
 * An exact float32 0 [1] computed from x's shape only: a data dependency on x that carries no gradient (int64 is
 * not differentiable) and that onnxruntime can neither fold into a constant nor schedule before x exists.
 */
export function zeroAfter(g: Graph, x: Value, hint: string): Value {
  const dim = g.op1('Shape', [x], { dtype: 'int64', shape: [1] }, { start: 0, end: 1 }, undefined, `${hint}.dim`);
  const zero = g.op1('Mul', [dim, g.ints([0])], { dtype: 'int64', shape: [1] }, undefined, undefined, `${hint}.dim_zero`);
  return g.op1('Cast', [zero], { dtype: 'float32', shape: [1] }, { to: 1 }, undefined, `${hint}.zero`);
}

/**
 * q's dequantization (nodes not yet emitted, ending in `out` = W [N, K]) and the initializers they read, added to
 * the graph once: the forward's and dX's dequantizations share them.
 */
function dequantization(g: Graph, q: QuantizedLinear): { nodes: OnnxNode[]; out: string; byName: Map<string, Value> } {
  return g.once(`dq:${q.namePrefix}`, () => {
    const out = g.fresh(`${q.namePrefix}.w_deq`);
    const dq = emitDequantizedWeight(q, out);
    return { nodes: dq.nodes, out, byName: new Map(dq.tensors.map((t) => [t.name, g.addInitializer(t)] as const)) };
  });
}

/**
 * W [N, K] float32 dequantized on the tape just before x's use (its scales take zeroAfter(x)): recorded with
 * Graph.op, so a checkpointed segment recomputes it too and no layer's float weight outlives its matmul.
 */
export function dequantizedOnTape(g: Graph, x: Value, q: BlockIntLinear): Value {
  const { nodes, byName } = dequantization(g, q);
  const deq = nodes.find((n) => n.opType === 'DequantizeLinear')!;
  const [qt, scale, zp] = deq.inputs.map((n) => byName.get(n)!);
  const scaleAfter = g.op1('Add', [scale!, zeroAfter(g, x, q.namePrefix)], { dtype: 'float32', shape: scale!.shape }, undefined, undefined, `${q.namePrefix}.scale_fwd`);
  const padded = q.nBlocks * q.blockSize;
  let w = g.op1('DequantizeLinear', [qt!, scaleAfter, zp!], { dtype: 'float32', shape: [q.N, padded] }, { axis: 1, block_size: q.blockSize }, undefined, `${q.namePrefix}.w_fwd`);
  if (padded !== q.K) w = g.op1('Slice', [w, g.ints([0]), g.ints([q.K]), g.ints([1])], { dtype: 'float32', shape: [q.N, q.K] }, undefined, undefined, `${q.namePrefix}.w_fwd_k`);
  return w;
}

export const STOP_GRADIENT = 'StopGradient';

/**
 * x, as a value the backward pass does not look through: for a gradient computed in the forward pass (the output
 * head's, see train-graph.ts) that is then fed into a surrogate loss.
 */
export function stopGradient(g: Graph, x: Value, hint = `${x.name}.stopped`): Value {
  return g.op('Identity', [x], { outputs: [{ dtype: x.dtype, shape: x.shape }], meta: { gradRule: STOP_GRADIENT } }, hint)[0]!;
}

export interface QuantizedLinearOpOptions {
  /**
   * Run the forward as DequantizeLinear + MatMul (sgemm) instead of MatMulNBits: no prepacked copy of the weights
   * in the session (the 4-bit bytes are read where they are mapped), at the price of one dequantization per use.
   * Block-int codecs only; others keep their kernel.
   */
  dequantized?: boolean;
}

/**
 * y[..., N] = x[..., K] W^T through the frozen quantized weight: MatMulNBits / MatMulBnb4 / MatMul forward
 * (fast), recorded with q so that its gradient rule builds dX exactly (see quantizedLinearRule).
 * The same q may be used several times (its initializers are added once).
 */
export function quantizedLinearOp(g: Graph, x: Value, q: QuantizedLinear, hint = `${q.namePrefix}.y`, opts: QuantizedLinearOpOptions = {}): Value {
  if (opts.dequantized && q.kind !== 'none' && q.kind !== 'nf4') {
    const w = dequantizedOnTape(g, x, q);
    // FusedMatMul reads W transposed in place (sgemm's transB); its W input is inactive, so only dX is built.
    return g.op('FusedMatMul', [x, w], {
      outputs: [{ dtype: 'float32', shape: [...x.shape.slice(0, -1), q.N] }],
      attrs: { transB: 1, alpha: { float: 1 } },
      domain: 'com.microsoft',
      meta: { gradRule: 'QuantizedLinear', quantized: q },
    }, hint)[0]!;
  }
  const byName = new Map<string, Value>();
  for (const t of q.tensors) {
    const v = g.initializer(t.name) === t ? { name: t.name, dtype: t.dataType, shape: t.dims } : g.addInitializer(t);
    byName.set(t.name, v);
  }
  const [n] = emitLinear(q, x.name, '');
  const inputs = [x, ...n!.inputs.slice(1).map((name) => byName.get(name)!)];
  const spec = {
    outputs: [{ dtype: 'float32' as const, shape: [...x.shape.slice(0, -1), q.N] }],
    meta: { gradRule: 'QuantizedLinear', quantized: q },
    ...(n!.domain ? { domain: n!.domain } : {}),
    ...(n!.attributes ? { attrs: n!.attributes } : {}),
  };
  return g.op(n!.opType, inputs, spec, hint)[0]!;
}

function sliceRule(a: GradArgs): (Value | null)[] {
  const { g, node } = a;
  const d = dy(a);
  const x = input(node, 0);
  const r = x.shape.length;
  const starts = g.constInts(node.inputs[1]);
  const ends = g.constInts(node.inputs[2]);
  const axesIn = node.inputs[3] ?? null;
  const steps = node.inputs[4] ? g.constInts(node.inputs[4]) : [];
  if (!steps || steps.some((s) => s !== 1)) unsupported(node, 'only step 1 is supported');
  let axes = axesIn ? g.constInts(axesIn) : undefined;
  if (!axesIn) {
    const n = starts?.length ?? node.inputs[1]!.shape[0];
    if (typeof n !== 'number') unsupported(node, 'starts of unknown length and no axes');
    axes = [...Array(n).keys()];
  }
  const axesV = axesIn ?? g.ints(axes!);
  // Static pads when the bounds are constants and each sliced dim is known (or the slice runs to the end).
  if (starts && ends && axes) {
    const begin: number[] = [];
    const after: number[] = [];
    const ok = axes.every((ax, i) => {
      const dim = x.shape[normAxis(ax, r)];
      let s = starts[i]!;
      let e = ends[i]!;
      if (typeof dim === 'number') {
        s = Math.min(Math.max(s < 0 ? s + dim : s, 0), dim);
        e = Math.min(Math.max(e < 0 ? e + dim : e, 0), dim);
        begin.push(s);
        after.push(dim - Math.max(e, s));
        return true;
      }
      if (s >= 0 && e >= 2 ** 31 - 1) { begin.push(s); after.push(0); return true; }
      return false;
    });
    if (ok) return [like(g, 'Pad', [d, g.ints([...begin, ...after]), null, axesV], x.shape, undefined, 'dx')];
  }
  // Run-time bounds: clamp like Slice does, pad with zeros before and after.
  const n = axes?.length ?? '?';
  const i64 = (op: string, ins: Value[], hint: string) => like(g, op, ins, [n], undefined, hint, 'int64');
  const dims = i64('Gather', [shapeTensor(g, x), axesV], 'dims');
  const zero = g.ints([0]);
  const clamp = (v: Value, hint: string) => {
    const wrapped = like(g, 'Where', [like(g, 'Less', [v, zero], [n], undefined, `${hint}_neg`, 'bool'), i64('Add', [v, dims], `${hint}_wrapped`), v], [n], undefined, `${hint}_norm`, 'int64');
    return i64('Max', [i64('Min', [wrapped, dims], `${hint}_min`), zero], hint);
  };
  const s = clamp(input(node, 1), 'begin');
  const e = i64('Max', [clamp(input(node, 2), 'end'), s], 'end_c');
  const pads = like(g, 'Concat', [s, i64('Sub', [dims, e], 'after')], ['?'], { axis: 0 }, 'pads', 'int64');
  return [like(g, 'Pad', [d, pads, null, axesV], x.shape, undefined, 'dx')];
}

function concatRule(a: GradArgs): (Value | null)[] {
  const { g, node, needs } = a;
  const d = dy(a);
  const xs = node.inputs.map((v) => v!);
  if (xs.length === 1) return [d];
  const r = d.shape.length;
  const axis = normAxis(intAttr(node, 'axis', 0), r);
  const sizes = xs.map((x) => x.shape[axis]);
  const split = sizes.every((s) => typeof s === 'number')
    ? g.ints(sizes as number[])
    : like(g, 'Concat', xs.map((x, i) => like(g, 'Gather', [shapeTensor(g, x), g.ints([axis])], [1], undefined, `size${i}`, 'int64')), [xs.length], { axis: 0 }, 'sizes', 'int64');
  const parts = g.op('Split', [d, split], { attrs: { axis }, outputs: xs.map((x) => ({ dtype: d.dtype, shape: x.shape })) }, 'dx');
  return parts.map((p, i) => (needs[i] ? p : null));
}

function splitRule(a: GradArgs): (Value | null)[] {
  const { g, node } = a;
  const x = input(node, 0);
  const axis = intAttr(node, 'axis', 0);
  const parts = node.outputs.map((o, i) => a.dOut[i] ?? zerosLike(g, o, `zeros${i}`));
  return [like(g, 'Concat', parts, x.shape, { axis }, 'dx', x.dtype)];
}

function gatherRule(a: GradArgs): (Value | null)[] {
  const { g, node } = a;
  const d = dy(a);
  const data = input(node, 0);
  const idx = input(node, 1);
  const r = data.shape.length;
  const q = idx.shape.length;
  const axis = normAxis(intAttr(node, 'axis', 0), r);
  const idxCol = like(g, 'Unsqueeze', [idx, g.ints([-1])], [...idx.shape, 1], undefined, 'idx_col', 'int64');
  if (axis === 0) {
    // Repeated indices add up (reduction add); indices must be non-negative.
    return [like(g, 'ScatterND', [zerosLike(g, data), idxCol, d], data.shape, { reduction: 'add' }, 'dx', data.dtype)];
  }
  // Move the gathered axis to the front, scatter, move it back.
  const perm = [axis, ...[...Array(r).keys()].filter((i) => i !== axis)];
  const inv = perm.map((_, i) => perm.indexOf(i));
  const dPerm = [...Array(q).keys()].map((i) => axis + i).concat([...Array(axis).keys()], [...Array(r - axis - 1).keys()].map((i) => axis + q + i));
  const dT = like(g, 'Transpose', [d], dPerm.map((p) => d.shape[p]!), { perm: dPerm }, 'd_t', d.dtype);
  const zShape = perm.map((p) => data.shape[p]!);
  const zShapeV = staticDims(data) ? g.ints(zShape as number[]) : like(g, 'Gather', [shapeTensor(g, data), g.ints(perm)], [r], undefined, 'zeros_shape', 'int64');
  const zeros = like(g, 'ConstantOfShape', [zShapeV], zShape, undefined, 'zeros', data.dtype);
  const scattered = like(g, 'ScatterND', [zeros, idxCol, dT], zShape, { reduction: 'add' }, 'dx_t', data.dtype);
  return [like(g, 'Transpose', [scattered], data.shape, { perm: inv }, 'dx', data.dtype)];
}

function reduceRule(mean: boolean): GradRule {
  return (a) => {
    const { g, node } = a;
    const d = dy(a);
    const x = input(node, 0);
    const r = x.shape.length;
    const keep = intAttr(node, 'keepdims', 1) === 1;
    const axesV = node.inputs[1] ?? null;
    const axes = axesV ? g.constInts(axesV) : []; // undefined: axes known only at run time
    if (axes === undefined && !keep) unsupported(node, 'run-time axes with keepdims=0');
    if (axesV && axes?.length === 0 && intAttr(node, 'noop_with_empty_axes', 0) === 1) return [d];
    const all = axes?.length === 0;
    let scaled = d;
    if (mean) {
      const dims = axes === undefined ? ['?'] : (all ? [...Array(r).keys()] : axes.map((ax) => normAxis(ax, r))).map((i) => x.shape[i]);
      if (dims.every((n) => typeof n === 'number')) {
        scaled = mulV(g, d, g.scalar(1 / (dims as number[]).reduce((p, n) => p * n, 1)), 'd_scaled');
      } else {
        const size = (v: Value, hint: string) => like(g, 'Cast', [like(g, 'Size', [v], [], undefined, `${hint}_i64`, 'int64')], [], { to: 1 }, hint);
        scaled = divV(g, d, divV(g, size(x, 'size_x'), size(node.outputs[0]!, 'size_y'), 'count'), 'd_scaled');
      }
    }
    if (!keep && !all) scaled = like(g, 'Unsqueeze', [scaled, axesV], x.shape.map((s, i) => (axes!.map((ax) => normAxis(ax, r)).includes(i) ? 1 : s)), undefined, 'd_keep', d.dtype);
    return [like(g, 'Expand', [scaled, shapeTensor(g, x)], x.shape, undefined, 'dx', d.dtype)];
  };
}

function normRule(kind: 'rms' | 'layer'): GradRule {
  return (a) => {
    const { g, node, needs } = a;
    const d = dy(a);
    const x = input(node, 0);
    const w = input(node, 1);
    const r = x.shape.length;
    const ax = normAxis(intAttr(node, 'axis', -1), r);
    const axes = [...Array(r - ax).keys()].map((i) => ax + i);
    const lead = [...Array(ax).keys()];
    const eps = g.scalar(floatAttr(node, 'epsilon', 1e-5));
    // Statistics are recomputed (the forward node returns only y): [rows.., 1].
    const xc = kind === 'layer' ? subV(g, x, reduceMean(g, x, axes, 'mu'), 'xc') : x;
    const variance = addV(g, reduceMean(g, mulV(g, xc, xc, 'sq'), axes, 'var'), eps, 'var_eps');
    const inv = like(g, 'Reciprocal', [like(g, 'Sqrt', [variance], variance.shape, undefined, 'std')], variance.shape, undefined, 'inv_std');
    const out: (Value | null)[] = [null, null, null];
    let xhat: Value | null = null;
    const xHat = () => (xhat ??= mulV(g, xc, inv, 'xhat'));
    if (needs[0]) {
      const gw = mulV(g, d, w, 'gw');
      if (kind === 'rms') {
        // dx = inv gw - x inv^3 mean(gw x): only small [rows, 1] factors besides the full-size products.
        const k = mulV(g, reduceMean(g, mulV(g, gw, x, 'gwx'), axes, 'gwx_mean'), divV(g, inv, variance, 'inv3'), 'k');
        out[0] = subV(g, mulV(g, gw, inv, 'gw_inv'), mulV(g, x, k, 'xk'), 'dx');
      } else {
        const centered = subV(g, gw, reduceMean(g, gw, axes, 'gw_mean'), 'gw_c');
        const proj = mulV(g, xHat(), reduceMean(g, mulV(g, gw, xHat(), 'gw_xhat'), axes, 'gw_xhat_mean'), 'proj');
        out[0] = mulV(g, subV(g, centered, proj, 'dx_unscaled'), inv, 'dx');
      }
    }
    const sumLead = (v: Value, hint: string) => (lead.length ? reduceSum(g, v, lead, false, w.shape, hint) : v);
    if (needs[1]) out[1] = sumLead(mulV(g, d, xHat(), 'd_xhat'), 'dw');
    if (needs[2]) out[2] = sumLead(d, 'db');
    return out;
  };
}

function geluRule(a: GradArgs): Value[] {
  const { g, node } = a;
  const d = dy(a);
  const x = input(node, 0);
  const s = (v: number) => g.scalar(v);
  const approx = node.attrs['approximate'] ?? 'none';
  const x2 = mulV(g, x, x, 'x2');
  let dgelu: Value;
  if (approx === 'tanh') {
    // gelu = 0.5 x (1 + t), t = tanh(c (x + k x^3)); d/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 k x^2)
    const c = Math.sqrt(2 / Math.PI);
    const k = 0.044715;
    const t = like(g, 'Tanh', [mulV(g, x, addV(g, mulV(g, x2, s(c * k), 'ckx2'), s(c), 'u_x'), 'u')], x.shape, undefined, 't');
    const half1t = addV(g, mulV(g, t, s(0.5), 'half_t'), s(0.5), 'cdf');
    const sech2 = subV(g, s(1), mulV(g, t, t, 't2'), 'sech2');
    const du = addV(g, mulV(g, x2, s(3 * c * k), 'du_x2'), s(c), 'du');
    dgelu = addV(g, half1t, mulV(g, mulV(g, sech2, du, 'sech2_du'), mulV(g, x, s(0.5), 'half_x'), 'pdf_term'), 'dgelu');
  } else if (approx === 'none') {
    // d/dx = Phi(x) + x phi(x)
    const cdf = addV(g, mulV(g, like(g, 'Erf', [mulV(g, x, s(Math.SQRT1_2), 'x_s')], x.shape, undefined, 'erf'), s(0.5), 'half_erf'), s(0.5), 'cdf');
    const pdf = mulV(g, like(g, 'Exp', [mulV(g, x2, s(-0.5), 'mhx2')], x.shape, undefined, 'e'), s(1 / Math.sqrt(2 * Math.PI)), 'pdf');
    dgelu = addV(g, cdf, mulV(g, x, pdf, 'x_pdf'), 'dgelu');
  } else {
    unsupported(node, `approximate=${String(approx)}`);
  }
  return [mulV(g, d, dgelu, 'dx')];
}

function powRule(a: GradArgs): (Value | null)[] {
  const { g, node, needs } = a;
  const d = dy(a);
  const x = input(node, 0);
  const e = input(node, 1);
  const y = node.outputs[0]!;
  const out: (Value | null)[] = [null, null];
  if (needs[0]) {
    const c = g.constFloats(e);
    if (c && c.length === 1) {
      const k = c[0]!;
      if (k === 1) out[0] = d;
      else if (k === 0) out[0] = zerosLike(g, x, 'dx');
      else if (k === 2) out[0] = mulV(g, d, mulV(g, x, g.scalar(2), 'two_x'), 'dx');
      else out[0] = mulV(g, d, mulV(g, like(g, 'Pow', [x, g.scalar(k - 1)], x.shape, undefined, 'x_pow'), g.scalar(k), 'k_x_pow'), 'dx');
    } else {
      const ef = e.dtype === x.dtype ? e : like(g, 'Cast', [e], e.shape, { to: 1 }, 'e_f');
      const xp = like(g, 'Pow', [x, subV(g, ef, g.scalar(1), 'e_m1')], y.shape, undefined, 'x_pow');
      out[0] = unbroadcast(g, mulV(g, d, mulV(g, xp, ef, 'e_x_pow'), 'dx_full'), x, 'dx');
    }
  }
  if (needs[1]) out[1] = unbroadcast(g, mulV(g, d, mulV(g, y, like(g, 'Log', [x], x.shape, undefined, 'log_x'), 'y_log_x'), 'de_full'), e, 'de');
  return out;
}

function scatterNDRule(a: GradArgs): (Value | null)[] {
  const { g, node, needs } = a;
  const d = dy(a);
  const data = input(node, 0);
  const idx = input(node, 1);
  const upd = input(node, 2);
  const reduction = node.attrs['reduction'] ?? 'none';
  if (reduction !== 'none' && reduction !== 'add') unsupported(node, `reduction=${String(reduction)}`);
  const out: (Value | null)[] = [null, null, null];
  // Overwritten positions get no gradient (indices are unique for reduction none, as ScatterND requires).
  if (needs[0]) out[0] = reduction === 'add' ? d : like(g, 'ScatterND', [d, idx, zerosLike(g, upd, 'zero_updates')], data.shape, undefined, 'ddata', d.dtype);
  if (needs[2]) out[2] = like(g, 'GatherND', [d, idx], upd.shape, undefined, 'dupdates', d.dtype);
  return out;
}

const RULES = new Map<string, GradRule>();

/** Registers (or replaces) the rule for an op type; `gradRule` in a node's meta picks a rule by name instead. */
export function registerGradient(opType: string, rule: GradRule, domain = ''): void {
  RULES.set(domain ? `${domain}:${opType}` : opType, rule);
}

export function gradientRule(node: TapeNode): GradRule | undefined {
  const named = node.meta?.['gradRule'];
  if (typeof named === 'string') return RULES.get(named);
  return RULES.get(node.domain ? `${node.domain}:${node.opType}` : node.opType);
}

/** Op types that have a rule (for error messages and docs). */
export function gradientOps(): string[] {
  return [...RULES.keys()].sort();
}

const binaryRule = (f: (a: GradArgs, d: Value, A: Value, B: Value) => [Value | null, Value | null]): GradRule => (a) =>
  f(a, dy(a), input(a.node, 0), input(a.node, 1));

registerGradient('Identity', (a) => [dy(a)]);
registerGradient(STOP_GRADIENT, () => [null]);
registerGradient('Add', binaryRule(({ g, needs }, d, A, B) => [needs[0] ? unbroadcast(g, d, A, 'da') : null, needs[1] ? unbroadcast(g, d, B, 'db') : null]));
registerGradient('Sub', binaryRule(({ g, needs }, d, A, B) => [needs[0] ? unbroadcast(g, d, A, 'da') : null, needs[1] ? neg(g, unbroadcast(g, d, B, 'db_neg'), 'db') : null]));
registerGradient('Mul', binaryRule(({ g, needs }, d, A, B) => [
  needs[0] ? unbroadcast(g, mulV(g, d, B, 'da_full'), A, 'da') : null,
  needs[1] ? unbroadcast(g, mulV(g, d, A, 'db_full'), B, 'db') : null,
]));
registerGradient('Div', binaryRule(({ g, needs, node }, d, A, B) => {
  const dAfull = divV(g, d, B, 'da_full');
  // d(A/B)/dB = -(dY/B) * Y, negated after the reduction (fewer elements).
  return [
    needs[0] ? unbroadcast(g, dAfull, A, 'da') : null,
    needs[1] ? neg(g, unbroadcast(g, mulV(g, dAfull, node.outputs[0]!, 'db_full'), B, 'db_neg'), 'db') : null,
  ];
}));
registerGradient('Sum', (a) => a.node.inputs.map((x, i) => (a.needs[i] ? unbroadcast(a.g, dy(a), x!, `d${i}`) : null)));
registerGradient('Neg', (a) => [neg(a.g, dy(a), 'dx')]);
registerGradient('MatMul', matmulRule);
registerGradient('QuantizedLinear', quantizedLinearRule);
registerGradient('MatMulNBits', quantizedLinearRule, 'com.microsoft');
registerGradient('MatMulBnb4', quantizedLinearRule, 'com.microsoft');
registerGradient('Reshape', elementwise(({ g }, d, x) => reshapeLike(g, d, x)));
registerGradient('Flatten', elementwise(({ g }, d, x) => reshapeLike(g, d, x)));
registerGradient('Transpose', elementwise(({ g, node }, d, x) => {
  const perm = (node.attrs['perm'] as number[] | undefined) ?? [...Array(x.shape.length).keys()].reverse();
  const inv = perm.map((_, i) => perm.indexOf(i));
  return like(g, 'Transpose', [d], x.shape, { perm: inv }, 'dx', d.dtype);
}));
// Unsqueeze's axes index its output and Squeeze's its input: the same tensor undoes either.
registerGradient('Unsqueeze', elementwise(({ g, node }, d, x) => like(g, 'Squeeze', [d, input(node, 1)], x.shape, undefined, 'dx', d.dtype)));
registerGradient('Squeeze', elementwise(({ g, node }, d, x) => (node.inputs[1]
  ? like(g, 'Unsqueeze', [d, node.inputs[1]], x.shape, undefined, 'dx', d.dtype)
  : reshapeLike(g, d, x))));
registerGradient('Expand', elementwise(({ g }, d, x) => unbroadcast(g, d, x, 'dx')));
registerGradient('Slice', sliceRule);
registerGradient('Concat', concatRule);
registerGradient('Split', splitRule);
registerGradient('Gather', gatherRule);
registerGradient('GatherElements', (a) => {
  const { g, node } = a;
  const data = input(node, 0);
  const axis = intAttr(node, 'axis', 0);
  return [like(g, 'ScatterElements', [zerosLike(g, data), input(node, 1), dy(a)], data.shape, { axis, reduction: 'add' }, 'dx', data.dtype)];
});
registerGradient('Softmax', elementwise(({ g, node }, d, _x, y) => {
  const axis = intAttr(node, 'axis', -1);
  const s = like(g, 'ReduceSum', [mulV(g, d, y, 'dy_y'), g.ints([axis])], keptShape(d, axis), { keepdims: 1 }, 'dot', d.dtype);
  return mulV(g, subV(g, d, s, 'd_centered'), y, 'dx');
}));
registerGradient('LogSoftmax', elementwise(({ g, node }, d, _x, y) => {
  const axis = intAttr(node, 'axis', -1);
  const s = like(g, 'ReduceSum', [d, g.ints([axis])], keptShape(d, axis), { keepdims: 1 }, 'd_sum', d.dtype);
  return subV(g, d, mulV(g, like(g, 'Exp', [y], y.shape, undefined, 'p'), s, 'p_sum'), 'dx');
}));
// Dropout(x, ratio, training_mode) -> [y, mask]: dX = dY * mask / (1 - ratio) (identity when not training:
// the mask is then all true and the scale 1, which the same formula gives only if ratio is ignored, so the
// scale is applied through Where on training_mode).
registerGradient('Dropout', (a) => {
  const { g, node } = a;
  if (!a.needs[0]) return [];
  const x = input(node, 0);
  const mask = node.outputs[1];
  if (!mask) unsupported(node, 'record the mask output to differentiate Dropout');
  const keep = like(g, 'Cast', [mask!], x.shape, { to: 1 }, 'keep');
  const ratio = node.inputs[1]!;
  const train = node.inputs[2]!;
  const scale = like(g, 'Where', [train, like(g, 'Reciprocal', [subV(g, g.scalar(1), ratio, 'keep_p')], [], undefined, 'inv_keep'), g.scalar(1)], [], undefined, 'scale');
  return [mulV(g, mulV(g, dy(a), keep, 'dy_kept'), scale, 'dx')];
});
registerGradient('Sigmoid', elementwise(({ g }, d, _x, y) => mulV(g, d, mulV(g, y, subV(g, g.scalar(1), y, 'one_m_y'), 'dsig'), 'dx')));
registerGradient('Tanh', elementwise(({ g }, d, _x, y) => mulV(g, d, subV(g, g.scalar(1), mulV(g, y, y, 'y2'), 'dtanh'), 'dx')));
registerGradient('Relu', elementwise(({ g }, d, x) => like(g, 'Where', [like(g, 'Greater', [x, g.scalar(0)], x.shape, undefined, 'pos', 'bool'), d, g.scalar(0)], x.shape, undefined, 'dx')));
registerGradient('Exp', elementwise(({ g }, d, _x, y) => mulV(g, d, y, 'dx')));
registerGradient('Log', elementwise(({ g }, d, x) => divV(g, d, x, 'dx')));
registerGradient('Sqrt', elementwise(({ g }, d, _x, y) => divV(g, mulV(g, d, g.scalar(0.5), 'half_d'), y, 'dx')));
registerGradient('Reciprocal', elementwise(({ g }, d, _x, y) => neg(g, mulV(g, d, mulV(g, y, y, 'y2'), 'dx_neg'), 'dx')));
registerGradient('Erf', elementwise(({ g }, d, x) => {
  const e = like(g, 'Exp', [neg(g, mulV(g, x, x, 'x2'), 'mx2')], x.shape, undefined, 'e');
  return mulV(g, d, mulV(g, e, g.scalar(2 / Math.sqrt(Math.PI)), 'derf'), 'dx');
}));
registerGradient('Pow', powRule);
registerGradient('ReduceSum', reduceRule(false));
registerGradient('ReduceMean', reduceRule(true));
registerGradient('Where', (a) => {
  const { g, node, needs } = a;
  const d = dy(a);
  const cond = input(node, 0);
  const zero = g.scalar(0);
  const shape = broadcast(cond.shape, d.shape);
  return [
    null,
    needs[1] ? unbroadcast(g, like(g, 'Where', [cond, d, zero], shape, undefined, 'da_full'), input(node, 1), 'da') : null,
    needs[2] ? unbroadcast(g, like(g, 'Where', [cond, zero, d], shape, undefined, 'db_full'), input(node, 2), 'db') : null,
  ];
});
registerGradient('Cast', elementwise(({ g }, d, x) => (x.dtype === d.dtype ? d : like(g, 'Cast', [d], x.shape, { to: x.dtype === 'float16' ? 10 : 1 }, 'dx', x.dtype))));
registerGradient('SimplifiedLayerNormalization', normRule('rms'));
registerGradient('LayerNormalization', normRule('layer'));
registerGradient('Gelu', geluRule);
registerGradient('ScatterND', scatterNDRule);
