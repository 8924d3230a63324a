/**
 * A plain reference of PEFT's merge_utils (task_arithmetic, ties, dare_linear, dare_ties) written the way PEFT
 * writes them: prune each task tensor, stack, compute a sign mask, weight, then disjoint-merge or sum; plain
 * arrays and separate passes, no fusion. The production code (src/adapters/merge.ts) must agree exactly.
 * DARE's randomness follows loraplex's contract: one uniform draw per entry, from the seeded generator, in the
 * order module -> (A tensors of each source, then B tensors of each source) -> entry.
 */
import { Rng } from '../../src/sampling/index.js';

type Method = 'linear' | 'ties' | 'dare_linear' | 'dare_ties';

function magnitudePrune(t: number[], density: number): number[] {
  if (density >= 1) return t;
  const k = Math.floor(density * t.length);
  const ranked = t.map((v, i) => ({ v: Math.abs(v), i })).sort((a, b) => b.v - a.v || a.i - b.i);
  const keep = new Set(ranked.slice(0, k).map((e) => e.i));
  return t.map((v, i) => (keep.has(i) ? v : 0));
}

function randomPrune(t: number[], density: number, rng: Rng): number[] {
  if (density >= 1) return t;
  const mask = t.map(() => (rng.nextFloat() < density ? 1 : 0));
  // torch keeps the pruned, rescaled tensor in float32.
  return t.map((v, i) => Math.fround(Math.fround(v * mask[i]!) / density));
}

function majoritySignMask(stack: number[][], method: 'total' | 'frequency'): boolean[][] {
  const n = stack[0]!.length;
  const majority: number[] = [];
  for (let i = 0; i < n; i++) {
    const m = stack.reduce((acc, t) => acc + (method === 'total' ? t[i]! : Math.sign(t[i]!)), 0);
    majority.push(m >= 0 ? 1 : -1);
  }
  return stack.map((t) => t.map((v, i) => Math.sign(v) === majority[i]));
}

function disjointMerge(weighted: number[][], mask: boolean[][]): number[] {
  const n = weighted[0]!.length;
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    let sum = 0;
    let count = 0;
    for (let t = 0; t < weighted.length; t++) {
      if (mask[t]![i]) {
        sum += weighted[t]![i]!;
        count++;
      }
    }
    out.push(sum / Math.max(count, 1));
  }
  return out;
}

export function referenceCombine(method: Method, tensors: Float32Array[], weights: number[], density: number, sign: 'total' | 'frequency', rng: Rng): Float32Array {
  let stack = tensors.map((t) => Array.from(t));
  if (method === 'ties') stack = stack.map((t) => magnitudePrune(t, density));
  if (method === 'dare_linear' || method === 'dare_ties') stack = stack.map((t) => randomPrune(t, density, rng));
  const weighted = stack.map((t, i) => t.map((v) => v * weights[i]!));
  if (method === 'linear' || method === 'dare_linear') {
    return Float32Array.from(weighted[0]!.map((_, i) => weighted.reduce((acc, t) => acc + t[i]!, 0)));
  }
  return Float32Array.from(disjointMerge(weighted, majoritySignMask(stack, sign)));
}
