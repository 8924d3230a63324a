/**
 * Reverse-mode autodiff over a Graph's tape (ORT has no training API: a training step is an inference session
 * whose outputs include the gradients). The backward nodes are emitted into the same graph by the rules in
 * kernels/ops/grad.ts; only nodes on a path from a `wrt` value to the loss are visited, so frozen weights,
 * masks and index arithmetic cost nothing.
 */
import type { Graph, TapeNode, Value } from './ir.js';
import { DIFFERENTIABLE, gradientOps, gradientRule, STOP_GRADIENT, zerosLike } from './ops/grad.js';

export { dequantizedOnTape, dequantizedWeight, quantizedLinearOp, stopGradient, zeroAfter, registerGradient, gradientOps, type GradRule, type GradArgs } from './ops/grad.js';

function isScalar(v: Value): boolean {
  return v.shape.length === 0 || (v.shape.length === 1 && v.shape[0] === 1);
}

interface SegmentRange extends CheckpointSegment {
  /** The segment's nodes that depend on start, in forward order. */
  nodes: TapeNode[];
}

/** Each recomputed node -> its segment. */
function checkpointRanges(tape: readonly TapeNode[], checkpoints: CheckpointSegment[]): Map<TapeNode, SegmentRange> {
  const byNode = new Map<TapeNode, SegmentRange>();
  const index = new Map<string, number>();
  tape.forEach((n, i) => outNames(n).forEach((o) => index.set(o, i)));
  for (const c of checkpoints) {
    const from = index.get(c.start.name) ?? -1;
    const to = index.get(c.end.name);
    if (to === undefined || to <= from) throw new Error(`gradients: checkpoint ${c.start.name} -> ${c.end.name} is not a forward range of the graph`);
    const dependent = new Set([c.start.name]);
    const range: SegmentRange = { ...c, nodes: [] };
    for (let i = from + 1; i <= to; i++) {
      const n = tape[i]!;
      if (!inNames(n).some((s) => dependent.has(s))) continue;
      if (n.raw) throw new Error(`gradients: node ${n.name} (${n.opType}) inside checkpoint ${c.start.name} was added with Graph.emit and cannot be recomputed`);
      if (byNode.has(n)) throw new Error(`gradients: checkpoints overlap at node ${n.name}`);
      for (const o of n.outputs) dependent.add(o.name);
      range.nodes.push(n);
      byNode.set(n, range);
    }
  }
  return byNode;
}

/**
 * Re-emits a segment's nodes from start' = start + 0 * sum(after): the data dependency makes onnxruntime run the
 * recomputation only once `after` (the backward up to here) exists, and keeps its CSE from merging it with the
 * forward (a sum, not a max: `after` may be empty, whose max is -inf).
 */
function recompute(g: Graph, s: SegmentRange, after: Value[], twins: Map<TapeNode, TapeNode>): void {
  const hint = s.start.name;
  const sums = after.map((a, i) => g.op1('ReduceSum', [a], { dtype: a.dtype, shape: [] }, { keepdims: 0 }, undefined, `${hint}.after_sum${i}`));
  const sum = sums.length === 1 ? sums[0]! : g.op1('Sum', sums, { dtype: 'float32', shape: [] }, undefined, undefined, `${hint}.after_sum`);
  const zero = g.op1('Mul', [sum, g.scalar(0)], { dtype: 'float32', shape: [] }, undefined, undefined, `${hint}.after_zero`);
  const start = g.op1('Add', [s.start, zero], { dtype: s.start.dtype, shape: s.start.shape }, undefined, undefined, `${hint}.recomputed`);
  const values = new Map<string, Value>([[s.start.name, start]]);
  for (const n of s.nodes) {
    const inputs = n.inputs.map((v) => (v ? (values.get(v.name) ?? v) : null));
    if (n.opType === 'Dropout' && !n.domain) {
      const twin = dropoutTwin(g, n, inputs[0]!);
      values.set(n.outputs[0]!.name, twin);
      twins.set(n, g.producer(twin)!);
      continue;
    }
    const outs = g.op(n.opType, inputs, {
      outputs: n.outputs.map((o) => ({ dtype: o.dtype, shape: o.shape })),
      attrs: n.attrs,
      ...(n.domain ? { domain: n.domain } : {}),
      ...(n.meta ? { meta: n.meta } : {}),
    }, `${n.outputs[0]!.name}.re`);
    n.outputs.forEach((o, i) => values.set(o.name, outs[i]!));
    twins.set(n, g.producer(outs[0]!)!);
  }
}

/**
 * Dropout recomputed with the forward's mask: x' * mask / (1 - ratio) while training, x' otherwise. A second
 * Dropout would draw its own mask, and onnxruntime drops a Dropout whose mask nobody reads (as at inference):
 * reading the forward's mask here keeps the forward's dropout too.
 */
function dropoutTwin(g: Graph, n: TapeNode, x: Value): Value {
  const ratio = g.constFloats(n.inputs[1]);
  const mode = n.inputs[2];
  const mask = n.outputs[1];
  if (!ratio || ratio.length !== 1 || !mask) throw new Error(`gradients: Dropout ${n.name} needs a constant ratio and its mask output to be recomputed`);
  const keepScale = g.scalar(1 / (1 - ratio[0]!));
  const scale = mode ? g.op1('Where', [mode, keepScale, g.scalar(1)], { dtype: 'float32', shape: [] }, undefined, undefined, `${n.outputs[0]!.name}.scale`) : g.scalar(1);
  const kept = g.op1('Cast', [mask], { dtype: x.dtype, shape: mask.shape }, { to: 1 }, undefined, `${n.outputs[0]!.name}.kept`);
  const factor = g.op1('Mul', [kept, scale], { dtype: x.dtype, shape: mask.shape }, undefined, undefined, `${n.outputs[0]!.name}.factor`);
  return g.op1('Mul', [x, factor], { dtype: x.dtype, shape: x.shape }, undefined, undefined, `${n.outputs[0]!.name}.re`);
}

const inNames = (n: TapeNode): string[] => (n.raw ? n.raw.inputs.filter((s) => s !== '') : n.inputs.flatMap((v) => (v ? [v.name] : [])));
const outNames = (n: TapeNode): string[] => (n.raw ? [...n.raw.outputs] : n.outputs.map((v) => v.name));

/**
 * A gradient checkpoint: the nodes after `start`'s producer up to and including `end`'s that depend on `start`
 * (one decoder layer, one chunk of the output head). The backward pass recomputes them from `start` instead of
 * reading the forward's values, so onnxruntime frees the forward's intermediates as soon as the forward is done.
 */
export interface CheckpointSegment {
  start: Value;
  end: Value;
}

export interface GradientOptions {
  /** Segments in forward order, not overlapping. */
  checkpoints?: CheckpointSegment[];
}

/**
 * d loss / d wrt[i] for each i, as Values of the graph (each shaped like its wrt; zeros when the loss does not
 * depend on it). loss must be a scalar (shape [] or [1]); dLoss is seeded with 1. Values feeding a node more than
 * once, or several nodes, get their contributions summed (Add, or one Sum for more than two).
 */
export function gradients(g: Graph, loss: Value, wrt: Value[], opts: GradientOptions = {}): Value[] {
  if (!isScalar(loss)) throw new Error(`gradients: loss ${loss.name} must be a scalar (shape [] or [1]), got [${loss.shape.join(', ')}]`);
  for (const w of wrt) {
    if (!DIFFERENTIABLE.has(w.dtype)) throw new Error(`gradients: cannot differentiate w.r.t. ${w.name} of type ${w.dtype}`);
  }
  const tape = g.tape.slice(); // the backward nodes appended below are not part of the forward pass

  // Forward: values that depend on some wrt (only float values carry a dependence; raw nodes pass it on by name).
  const active = new Set(wrt.map((w) => w.name));
  const fed = tape.map((n) => {
    if (!inNames(n).some((s) => active.has(s))) return false;
    if (n.raw) for (const o of n.raw.outputs) active.add(o);
    else for (const o of n.outputs) if (DIFFERENTIABLE.has(o.dtype)) active.add(o.name);
    return true;
  });

  // Backward: of those, the nodes the loss depends on.
  const needed = new Set([loss.name]);
  const path: TapeNode[] = [];
  for (let i = tape.length - 1; i >= 0; i--) {
    const n = tape[i]!;
    if (!fed[i] || !outNames(n).some((s) => needed.has(s))) continue;
    if (n.raw) {
      throw new Error(`gradients: node ${n.name || n.raw.outputs[0]} (${n.opType}) was added with Graph.emit and is not differentiable, `
        + 'but lies between a wrt value and the loss; record it with Graph.op (for a quantized linear: quantizedLinearOp)');
    }
    if (!gradientRule(n)) {
      throw new Error(`gradients: no gradient rule for op ${n.domain ? `${n.domain}.` : ''}${n.opType} (node ${n.name}, output ${n.outputs[0]?.name}); `
        + `rules exist for ${gradientOps().join(', ')}`);
    }
    path.push(n);
    // What a stop-gradient reads is not differentiated (nor checked for rules).
    if (n.meta?.['gradRule'] !== STOP_GRADIENT) for (const s of inNames(n)) if (active.has(s)) needed.add(s);
  }

  const saved = g.scope;
  const contributions = new Map<string, Value[]>();
  const segments = checkpointRanges(tape, opts.checkpoints ?? []);
  /** Original node -> its recomputed twin, for the nodes of the segments recomputed so far. */
  const twins = new Map<TapeNode, TapeNode>();
  let lastStart: Value | null = null;
  const wrtNames = new Set(wrt.map((w) => w.name));
  /**
   * Gradient contributions to wrt values since the last recomputation. The next recomputation waits for them too:
   * nothing else needs them before the end, so onnxruntime would otherwise run them last and keep every segment's
   * recomputed inputs alive until then (measured: +2 GB on a 1.1B all-linear step).
   */
  let finished: Value[] = [];
  const total = (v: Value): Value | null => {
    const parts = contributions.get(v.name);
    if (!parts || parts.length === 0) return null;
    if (parts.length === 1) return parts[0]!;
    const sum = g.op1(parts.length === 2 ? 'Add' : 'Sum', parts, { dtype: v.dtype, shape: v.shape }, undefined, undefined, `${v.name}_grad`);
    contributions.set(v.name, [sum]);
    return sum;
  };
  try {
    g.scope = 'grad.';
    if (active.has(loss.name)) {
      const seed = loss.shape.length === 0 ? g.scalar(1) : g.floats([1]);
      contributions.set(loss.name, [seed]);
    }
    for (const n of path) {
      g.scope = 'grad.';
      const dOut = n.outputs.map(total);
      if (dOut.every((d) => d === null)) continue;
      const needs = n.inputs.map((v) => v !== null && active.has(v.name) && DIFFERENTIABLE.has(v.dtype));
      const segment = segments.get(n);
      if (segment && !twins.has(n)) {
        // Entering a segment (backward runs it last node first): recompute it, after the backward so far.
        const previous: Value | null = lastStart ? total(lastStart) : null;
        recompute(g, segment, [previous ?? dOut.find((d) => d !== null)!, ...finished], twins);
        finished = [];
        lastStart = segment.start;
      }
      // The rule reads the recomputed activations; its gradients still go to the original values' names.
      const node = twins.get(n) ?? n;
      g.scope = `grad.${n.outputs[0]!.name}.`;
      const grads = gradientRule(node)!({ g, node, dOut, needs });
      n.inputs.forEach((v, i) => {
        const d = grads[i];
        if (!needs[i] || !d || !v) return;
        if (wrtNames.has(v.name)) finished.push(d);
        const list = contributions.get(v.name);
        if (list) list.push(d);
        else contributions.set(v.name, [d]);
      });
    }
    g.scope = 'grad.';
    return wrt.map((w) => total(w) ?? zerosLike(g, w, `${w.name}_zero_grad`));
  } finally {
    g.scope = saved;
  }
}
