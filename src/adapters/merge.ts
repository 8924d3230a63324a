import { invalidArgument } from '../errors.js';
import { Rng } from '../sampling/index.js';
import { mat, matmul, qr, svd, transpose, type Mat } from '../../kernels/linalg/svd.js';
import type { PeftAdapter } from './peft.js';
import type { LoraLayerWeights, LoraModuleShape } from '../models/lora.js';

/**
 * Adapter arithmetic with PEFT's add_weighted_adapter semantics. Every source contributes its delta
 * ΔW_i = s_i B_i A_i (s_i = its lora_alpha / r). The result has lora_alpha = r (scaling 1), as PEFT writes it.
 * - cat: A = [w_i s_i A_i] stacked, B = [B_i] side by side: exactly Σ w_i ΔW_i, rank Σ r_i.
 * - svd: the best rank-k approximation of Σ w_i ΔW_i (computed from the low-rank factors, never the dense
 *   matrix), optionally clamped at a quantile of the factor entries.
 * - linear / ties / dare_linear / dare_ties: combine the A's and the B's separately with weights
 *   sign(w_i) sqrt(|w_i s_i|) for A and sqrt(|w_i s_i|) for B (so a negative weight subtracts; equal ranks and
 *   modules needed), via task arithmetic, TIES (magnitude pruning, sign election, disjoint mean) or DARE
 *   (random pruning with rescale; a seeded RNG: the same seed gives the same adapter, though not torch's
 *   random draws).
 * - One source: every method is linear, as PEFT does (nothing to elect a sign against or to approximate).
 */
export type MergeMethod = 'linear' | 'cat' | 'svd' | 'ties' | 'dare_linear' | 'dare_ties';
export type MajoritySignMethod = 'total' | 'frequency';

export interface MergeSource {
  adapterId: string;
  adapter: PeftAdapter;
  weight: number;
}

export interface MergeOptions {
  method: MergeMethod;
  /** svd: rank of the result (default: the largest source rank). */
  svdRank?: number;
  /** svd: clamp factor entries to this quantile of their absolute values, in (0, 1]. */
  svdClamp?: number;
  /** ties / dare: fraction of entries kept, in (0, 1]. */
  density?: number;
  majoritySignMethod?: MajoritySignMethod;
  /** dare: seed of the random pruning. */
  seed?: number;
}

const SHORT = (module: string) => module.slice(module.lastIndexOf('.') + 1);

export function mergeAdapters(sources: MergeSource[], requested: MergeOptions): PeftAdapter {
  validateMethod(requested.method);
  const opts: MergeOptions = sources.length === 1 ? { method: 'linear' } : requested;
  validate(sources, opts);
  const modules = moduleUnion(sources);
  let merged: LoraLayerWeights[];
  switch (opts.method) {
    case 'cat':
      merged = modules.map((m) => catModule(sources, m));
      break;
    case 'svd':
      merged = svdModules(sources, modules, opts);
      break;
    default:
      merged = taskArithmeticModules(sources, modules, opts);
  }
  const r = merged[0]!.r;
  const base = sources.map((s) => s.adapter.config.baseModelNameOrPath).find((b) => b !== null) ?? null;
  const targetModules = [...new Set(merged.map((m) => SHORT(m.module)))];
  return {
    config: { r, loraAlpha: r, targetModules, useRslora: false, baseModelNameOrPath: base, raw: {} },
    r,
    alpha: r,
    scaling: 1,
    modules: merged,
  };
}

function validateMethod(method: MergeMethod): void {
  const methods: MergeMethod[] = ['linear', 'cat', 'svd', 'ties', 'dare_linear', 'dare_ties'];
  if (!methods.includes(method)) throw invalidArgument(`method ${JSON.stringify(method)}: must be one of ${methods.join(', ')}`);
}

function validate(sources: MergeSource[], opts: MergeOptions): void {
  if (sources.length === 0) throw invalidArgument('sources: give at least one adapter');
  if (sources.length > 64) throw invalidArgument(`sources: ${sources.length} adapters exceed the limit of 64`);
  const ids = new Set<string>();
  for (const s of sources) {
    if (ids.has(s.adapterId)) throw invalidArgument(`sources: adapter_id "${s.adapterId}" is given twice; give it once with the summed weight`);
    ids.add(s.adapterId);
    if (!Number.isFinite(s.weight)) throw invalidArgument(`sources: weight of "${s.adapterId}" must be a finite number`);
  }
  const bases = new Set(sources.map((s) => s.adapter.config.baseModelNameOrPath).filter((b) => b !== null));
  if (bases.size > 1) throw invalidArgument(`sources: adapters were trained on different base models (${[...bases].join(', ')})`);
  const sqrtMethods: MergeMethod[] = ['linear', 'ties', 'dare_linear', 'dare_ties'];
  if (sqrtMethods.includes(opts.method)) {
    const r0 = sources[0]!.adapter.r;
    for (const s of sources) {
      if (s.adapter.r !== r0) throw invalidArgument(`sources: ${opts.method} needs equal ranks; "${sources[0]!.adapterId}" has r=${r0}, "${s.adapterId}" has r=${s.adapter.r} (use cat or svd)`);
    }
    const first = new Set(sources[0]!.adapter.modules.map((m) => m.module));
    for (const s of sources.slice(1)) {
      const mods = new Set(s.adapter.modules.map((m) => m.module));
      const missing = [...first].find((m) => !mods.has(m)) ?? [...mods].find((m) => !first.has(m));
      if (missing) throw invalidArgument(`sources: ${opts.method} needs the same target modules; "${sources[0]!.adapterId}" and "${s.adapterId}" differ at ${missing} (use cat or svd)`);
    }
  }
  if (opts.method === 'ties' || opts.method === 'dare_linear' || opts.method === 'dare_ties') {
    const d = opts.density;
    if (d === undefined || !Number.isFinite(d) || d <= 0 || d > 1) throw invalidArgument(`density ${d ?? '(unset)'}: ${opts.method} needs a density in (0, 1]`);
  }
  if (opts.method === 'svd') {
    const total = sources.reduce((n, s) => n + s.adapter.r, 0);
    const k = opts.svdRank;
    if (k !== undefined && (!Number.isInteger(k) || k < 1 || k > total)) throw invalidArgument(`svd_rank ${k}: must be an integer in [1, ${total}] (the sum of the source ranks)`);
    const c = opts.svdClamp;
    if (c !== undefined && (!Number.isFinite(c) || c <= 0 || c > 1)) throw invalidArgument(`svd_clamp ${c}: must be in (0, 1]`);
  }
}

function moduleUnion(sources: MergeSource[]): LoraModuleShape[] {
  const seen = new Map<string, LoraModuleShape>();
  for (const s of sources) for (const m of s.adapter.modules) if (!seen.has(m.module)) seen.set(m.module, { module: m.module, inFeatures: m.inFeatures, outFeatures: m.outFeatures });
  // Keep the sources' order (layer order for adapters read from disk).
  return [...seen.values()];
}

const find = (s: MergeSource, module: string) => s.adapter.modules.find((m) => m.module === module);

/** cat: rows w_i s_i A_i, columns B_i; a source without the module contributes zero rows/columns. */
function catModule(sources: MergeSource[], shape: LoraModuleShape): LoraLayerWeights {
  const R = sources.reduce((n, s) => n + s.adapter.r, 0);
  const { inFeatures: inF, outFeatures: outF } = shape;
  const a = new Float32Array(R * inF);
  const b = new Float32Array(outF * R);
  let row = 0;
  for (const s of sources) {
    const m = find(s, shape.module);
    const r = s.adapter.r;
    if (m) {
      const f = s.weight * s.adapter.scaling;
      for (let i = 0; i < r * inF; i++) a[row * inF + i] = m.a[i]! * f;
      for (let o = 0; o < outF; o++) for (let j = 0; j < r; j++) b[o * R + row + j] = m.b[o * r + j]!;
    }
    row += r;
  }
  return { module: shape.module, a, b, r: R, inFeatures: inF, outFeatures: outF };
}

function svdModules(sources: MergeSource[], modules: LoraModuleShape[], opts: MergeOptions): LoraLayerWeights[] {
  const k = opts.svdRank ?? Math.max(...sources.map((s) => s.adapter.r));
  return modules.map((shape) => {
    const cat = catModule(sources, shape);
    const { inFeatures: inF, outFeatures: outF, r: R } = cat;
    // Σ w_i ΔW_i = Bc Ac with Bc [out, R], Ac [R, in]. QR both factors, SVD the small core.
    const bc = mat(outF, R, Float64Array.from(cat.b));
    const acT = transpose(mat(R, inF, Float64Array.from(cat.a)));
    const { q: qb, r: rb } = qr(bc);
    const { q: qa, r: ra } = qr(acT);
    const core = matmul(rb, transpose(ra)); // [R, R]
    const { u, s, v } = svd(core);
    const uFull = matmul(qb, u); // [out, R]
    const vFull = matmul(qa, v); // [in, R]
    const bNew = new Float32Array(outF * k);
    const aNew = new Float32Array(k * inF);
    for (let j = 0; j < Math.min(k, R); j++) {
      for (let o = 0; o < outF; o++) bNew[o * k + j] = uFull.data[o * R + j]! * s[j]!;
      for (let i = 0; i < inF; i++) aNew[j * inF + i] = vFull.data[i * R + j]!;
    }
    if (opts.svdClamp !== undefined) clampAtQuantile(aNew, bNew, opts.svdClamp);
    return { module: shape.module, a: aNew, b: bNew, r: k, inFeatures: inF, outFeatures: outF };
  });
}

/** PEFT's svd_clamp: clamp B and A to ±(the q-quantile of all their entries), linear interpolation as torch.quantile. */
function clampAtQuantile(a: Float32Array, b: Float32Array, q: number): void {
  const all = Float64Array.from([...b, ...a]).sort();
  const pos = q * (all.length - 1);
  const lo = Math.floor(pos);
  const hi = Math.min(lo + 1, all.length - 1);
  const limit = all[lo]! + (all[hi]! - all[lo]!) * (pos - lo);
  for (const t of [a, b]) for (let i = 0; i < t.length; i++) t[i] = Math.min(Math.max(t[i]!, -limit), limit);
}

/** PEFT's split of w s between the factors: the sign goes on A only, or B A would not change sign. */
export function factorWeights(weight: number, scaling: number): { a: number; b: number } {
  const ws = weight * scaling;
  const root = Math.sqrt(Math.abs(ws));
  return { a: ws >= 0 ? root : -root, b: root };
}

function taskArithmeticModules(sources: MergeSource[], modules: LoraModuleShape[], opts: MergeOptions): LoraLayerWeights[] {
  const split = sources.map((s) => factorWeights(s.weight, s.adapter.scaling));
  const rng = new Rng(opts.seed ?? 0);
  const r = sources[0]!.adapter.r;
  return modules.map((shape) => {
    const parts = sources.map((s) => find(s, shape.module)!);
    const a = combine(parts.map((p) => p.a), split.map((w) => w.a), opts, rng);
    const b = combine(parts.map((p) => p.b), split.map((w) => w.b), opts, rng);
    return { module: shape.module, a, b, r, inFeatures: shape.inFeatures, outFeatures: shape.outFeatures };
  });
}

/** One tensor position across the sources: linear sum, TIES or DARE (PEFT's merge_utils semantics). */
function combine(tensors: Float32Array[], weights: number[], opts: MergeOptions, rng: Rng): Float32Array {
  const n = tensors[0]!.length;
  const density = opts.density ?? 1;
  let pruned = tensors;
  if (opts.method === 'ties') pruned = tensors.map((t) => magnitudePrune(t, density));
  if (opts.method === 'dare_linear' || opts.method === 'dare_ties') pruned = tensors.map((t) => randomPrune(t, density, rng));
  const out = new Float32Array(n);
  if (opts.method === 'linear' || opts.method === 'dare_linear') {
    for (let i = 0; i < n; i++) {
      let sum = 0;
      for (let t = 0; t < pruned.length; t++) sum += pruned[t]![i]! * weights[t]!;
      out[i] = sum;
    }
    return out;
  }
  // TIES: elect a sign per position from the pruned (unweighted) tensors, then average the agreeing weighted entries.
  const bySum = (opts.majoritySignMethod ?? 'total') === 'total';
  for (let i = 0; i < n; i++) {
    let magnitude = 0;
    for (let t = 0; t < pruned.length; t++) magnitude += bySum ? pruned[t]![i]! : Math.sign(pruned[t]![i]!);
    const majority = magnitude >= 0 ? 1 : -1;
    let sum = 0;
    let count = 0;
    for (let t = 0; t < pruned.length; t++) {
      const x = pruned[t]![i]!;
      if (Math.sign(x) === majority) {
        sum += x * weights[t]!;
        count++;
      }
    }
    out[i] = sum / Math.max(count, 1);
  }
  return out;
}

/** Keeps the floor(density * n) largest |x| (ties: lower index first), zeroes the rest. */
function magnitudePrune(t: Float32Array, density: number): Float32Array {
  if (density >= 1) return t;
  const k = Math.floor(density * t.length);
  const order = Array.from(t.keys()).sort((x, y) => Math.abs(t[y]!) - Math.abs(t[x]!) || x - y);
  const out = new Float32Array(t.length);
  for (let j = 0; j < k; j++) out[order[j]!] = t[order[j]!]!;
  return out;
}

/** DARE: keep each entry with probability density and rescale the kept ones by 1/density. */
function randomPrune(t: Float32Array, density: number, rng: Rng): Float32Array {
  if (density >= 1) return t;
  const out = new Float32Array(t.length);
  for (let i = 0; i < t.length; i++) if (rng.nextFloat() < density) out[i] = t[i]! / density;
  return out;
}

/** The dense delta Σ-free helper for tests and export: s B A as [out, in] float64. */
export function denseDelta(m: LoraLayerWeights, scale: number): Mat {
  const d = mat(m.outFeatures, m.inFeatures);
  for (let o = 0; o < m.outFeatures; o++) {
    for (let j = 0; j < m.r; j++) {
      const bv = m.b[o * m.r + j]! * scale;
      if (bv === 0) continue;
      for (let i = 0; i < m.inFeatures; i++) d.data[o * m.inFeatures + i]! += bv * m.a[j * m.inFeatures + i]!;
    }
  }
  return d;
}
