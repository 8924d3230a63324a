/**
 * Reverse-mode autodiff over a Graph's tape (ORT has no training API: a training step is an inference session
 * whose outputs include the gradients). The backward nodes are emitted into the same graph by the rules in
 * kernels/ops/grad.ts; only nodes on a path from a `wrt` value to the loss are visited, so frozen weights,
 * masks and index arithmetic cost nothing.
 */
import type { Graph, TapeNode, Value } from './ir.js';
import { DIFFERENTIABLE, gradientOps, gradientRule, zerosLike } from './ops/grad.js';

export { quantizedLinearOp, registerGradient, gradientOps, type GradRule, type GradArgs } from './ops/grad.js';

function isScalar(v: Value): boolean {
  return v.shape.length === 0 || (v.shape.length === 1 && v.shape[0] === 1);
}

const inNames = (n: TapeNode): string[] => (n.raw ? n.raw.inputs.filter((s) => s !== '') : n.inputs.flatMap((v) => (v ? [v.name] : [])));
const outNames = (n: TapeNode): string[] => (n.raw ? [...n.raw.outputs] : n.outputs.map((v) => v.name));

/**
 * d loss / d wrt[i] for each i, as Values of the graph (each shaped like its wrt; zeros when the loss does not
 * depend on it). loss must be a scalar (shape [] or [1]); dLoss is seeded with 1. Values feeding a node more than
 * once, or several nodes, get their contributions summed (Add, or one Sum for more than two).
 */
export function gradients(g: Graph, loss: Value, wrt: Value[]): Value[] {
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
    for (const s of inNames(n)) if (active.has(s)) needed.add(s);
  }

  const saved = g.scope;
  const contributions = new Map<string, Value[]>();
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
      g.scope = `grad.${n.outputs[0]!.name}.`;
      const grads = gradientRule(n)!({ g, node: n, dOut, needs });
      n.inputs.forEach((v, i) => {
        const d = grads[i];
        if (!needs[i] || !d || !v) return;
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
