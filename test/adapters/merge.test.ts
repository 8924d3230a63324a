import { test } from 'node:test';
import assert from 'node:assert/strict';
import { makeRandomAdapter, type PeftAdapter } from '../../src/adapters/peft.js';
import { denseDelta, mergeAdapters, type MergeOptions, type MergeSource } from '../../src/adapters/merge.js';
import { readModelSpec } from '../../src/models/config.js';
import { Rng } from '../../src/sampling/index.js';
import { LoraplexError } from '../../src/errors.js';
import { mat, svd } from '../../kernels/linalg/svd.js';
import { STORIES } from '../helpers/engine.js';
import { referenceCombine } from './merge-reference.js';

const spec = readModelSpec(STORIES);
const adapter = (r: number, seed: number, targets = ['q_proj', 'v_proj', 'down_proj'], alpha = 16): PeftAdapter =>
  makeRandomAdapter(spec, { r, alpha, targetModules: targets, seed, bStd: 0.2 });

/** Σ w_i s_i B_i A_i for one module, dense float64. */
function weightedDelta(sources: MergeSource[], module: string): Float64Array {
  let acc: Float64Array | null = null;
  for (const s of sources) {
    const m = s.adapter.modules.find((x) => x.module === module);
    if (!m) continue;
    const d = denseDelta(m, s.weight * s.adapter.scaling).data;
    if (!acc) acc = new Float64Array(d.length);
    for (let i = 0; i < d.length; i++) acc[i]! += d[i]!;
  }
  return acc!;
}

function maxRelDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let m = 0;
  let scale = 0;
  for (let i = 0; i < a.length; i++) {
    m = Math.max(m, Math.abs(a[i]! - b[i]!));
    scale = Math.max(scale, Math.abs(b[i]!));
  }
  return m / scale;
}

const A = adapter(4, 1);
const B = adapter(8, 2, ['q_proj', 'k_proj', 'down_proj'], 32);
const sources: MergeSource[] = [
  { adapterId: 'a', adapter: A, weight: 0.7 },
  { adapterId: 'b', adapter: B, weight: -1.3 },
];

test('cat is exactly the weighted sum of the deltas (rank = sum of ranks, scaling 1)', () => {
  const merged = mergeAdapters(sources, { method: 'cat' });
  assert.equal(merged.r, 12);
  assert.equal(merged.scaling, 1);
  assert.deepEqual(new Set(merged.config.targetModules), new Set(['q_proj', 'v_proj', 'k_proj', 'down_proj']));
  for (const m of merged.modules) {
    assert.ok(maxRelDiff(denseDelta(m, merged.scaling).data, weightedDelta(sources, m.module)) < 1e-6, m.module);
  }
});

test('svd at full rank equals cat; at rank k it is the best rank-k approximation; clamp bounds the factors', () => {
  const full = mergeAdapters(sources, { method: 'svd', svdRank: 12 });
  for (const m of full.modules) assert.ok(maxRelDiff(denseDelta(m, 1).data, weightedDelta(sources, m.module)) < 1e-5, m.module);
  const k = 3;
  const low = mergeAdapters(sources, { method: 'svd', svdRank: k });
  for (const m of low.modules) {
    const target = weightedDelta(sources, m.module);
    const approx = denseDelta(m, 1).data;
    let err = 0;
    for (let i = 0; i < target.length; i++) err += (target[i]! - approx[i]!) ** 2;
    // Eckart-Young: the residual is the energy of the discarded singular values of the dense delta.
    const { s } = svd(mat(m.outFeatures, m.inFeatures, target));
    let tail = 0;
    for (let j = k; j < s.length; j++) tail += s[j]! ** 2;
    assert.ok(Math.abs(err - tail) <= 1e-6 * (tail + 1e-12) + 1e-9, `${m.module}: residual ${err} vs ${tail}`);
  }
  const clamped = mergeAdapters(sources, { method: 'svd', svdRank: k, svdClamp: 0.9 });
  for (const m of clamped.modules) {
    const all = [...m.a, ...m.b].map(Math.abs);
    const unclamped = low.modules.find((x) => x.module === m.module)!;
    assert.ok(Math.max(...all) <= Math.max(...[...unclamped.a, ...unclamped.b].map(Math.abs)));
  }
});

/** PEFT's _generalized_task_arithmetic_weighted_adapter: w s split as sign(w s) sqrt(|w s|) on A, sqrt(|w s|) on B. */
const peftWeightsA = (src: MergeSource[]) => src.map((s) => Math.sign(s.weight * s.adapter.scaling || 1) * Math.sqrt(Math.abs(s.weight * s.adapter.scaling)));
const peftWeightsB = (src: MergeSource[]) => src.map((s) => Math.sqrt(Math.abs(s.weight * s.adapter.scaling)));

test('linear, ties, dare_linear and dare_ties equal the plain reference on fixed seeds, negative weights included', () => {
  const same: MergeSource[] = [
    { adapterId: 'x', adapter: adapter(4, 3, ['q_proj', 'o_proj']), weight: 0.6 },
    { adapterId: 'y', adapter: adapter(4, 4, ['q_proj', 'o_proj'], 8), weight: -1.5 },
    { adapterId: 'z', adapter: adapter(4, 5, ['q_proj', 'o_proj'], 4), weight: 0.25 },
  ];
  const cases: MergeOptions[] = [
    { method: 'linear' },
    { method: 'ties', density: 0.4 },
    { method: 'ties', density: 0.7, majoritySignMethod: 'frequency' },
    { method: 'dare_linear', density: 0.5, seed: 11 },
    { method: 'dare_ties', density: 0.3, seed: 12 },
    { method: 'dare_ties', density: 0.9, seed: 13, majoritySignMethod: 'frequency' },
  ];
  for (const opts of cases) {
    const merged = mergeAdapters(same, opts);
    assert.equal(merged.r, 4);
    const rng = new Rng(opts.seed ?? 0);
    for (const m of merged.modules) {
      const parts = same.map((s) => s.adapter.modules.find((x) => x.module === m.module)!);
      const method = opts.method as 'linear' | 'ties' | 'dare_linear' | 'dare_ties';
      const refA = referenceCombine(method, parts.map((p) => p.a), peftWeightsA(same), opts.density ?? 1, opts.majoritySignMethod ?? 'total', rng);
      const refB = referenceCombine(method, parts.map((p) => p.b), peftWeightsB(same), opts.density ?? 1, opts.majoritySignMethod ?? 'total', rng);
      assert.deepEqual(m.a, refA, `${opts.method} A ${m.module}`);
      assert.deepEqual(m.b, refB, `${opts.method} B ${m.module}`);
    }
    // A seed makes DARE repeatable.
    assert.deepEqual(mergeAdapters(same, opts).modules[0]!.a, merged.modules[0]!.a);
  }
  // Two linear sources with opposite weights of one adapter cancel: a negative weight subtracts.
  const x = same[0]!.adapter;
  const cancel = mergeAdapters([{ adapterId: 'p', adapter: x, weight: 0.5 }, { adapterId: 'n', adapter: x, weight: -0.5 }], { method: 'linear' });
  for (const m of cancel.modules) assert.ok(m.a.every((v) => Math.abs(v) < 1e-7), m.module);
});

test('with one source every method is linear, as PEFT: A = sign(w s) sqrt(|w s|) A, B = sqrt(|w s|) B, same rank', () => {
  const src = adapter(4, 6, ['q_proj', 'v_proj'], 16);
  for (const weight of [0.8, -2.5]) {
    const one: MergeSource[] = [{ adapterId: 'x', adapter: src, weight }];
    const [wa] = peftWeightsA(one);
    const [wb] = peftWeightsB(one);
    const methods: MergeOptions[] = [
      { method: 'linear' },
      { method: 'cat' },
      { method: 'svd', svdRank: 2, svdClamp: 0.5 },
      { method: 'ties', density: 0.3 },
      { method: 'dare_linear', density: 0.5, seed: 3 },
      { method: 'dare_ties', density: 0.5, seed: 4 },
    ];
    for (const opts of methods) {
      const merged = mergeAdapters(one, opts);
      assert.equal(merged.r, 4, `${opts.method} r`);
      assert.equal(merged.scaling, 1);
      for (const m of merged.modules) {
        const s = src.modules.find((x) => x.module === m.module)!;
        assert.deepEqual(m.a, Float32Array.from(s.a, (v) => v * wa!), `${opts.method} w=${weight} A ${m.module}`);
        assert.deepEqual(m.b, Float32Array.from(s.b, (v) => v * wb!), `${opts.method} w=${weight} B ${m.module}`);
        // Hence the delta is exactly w times the source's (ties used to prune it, svd to truncate it).
        assert.ok(maxRelDiff(denseDelta(m, 1).data, weightedDelta(one, m.module)) < 1e-6, `${opts.method} delta ${m.module}`);
      }
    }
  }
});

test('incompatible sources and bad options are INVALID_ARGUMENT saying which and why', () => {
  const bad = (sourcesOf: MergeSource[], opts: MergeOptions, message: RegExp) =>
    assert.throws(() => mergeAdapters(sourcesOf, opts), (e: unknown) => e instanceof LoraplexError && e.code === 'INVALID_ARGUMENT' && message.test(e.message), message.source);
  bad(sources, { method: 'linear' }, /linear needs equal ranks; "a" has r=4, "b" has r=8/);
  bad(sources, { method: 'ties', density: 0.5 }, /ties needs equal ranks/);
  bad([{ adapterId: 'a', adapter: A, weight: 1 }, { adapterId: 'c', adapter: adapter(4, 9, ['q_proj']), weight: 1 }], { method: 'linear' }, /linear needs the same target modules; "a" and "c" differ at/);
  const A2: MergeSource = { adapterId: 'a2', adapter: adapter(4, 7), weight: 1 };
  bad([{ adapterId: 'a', adapter: A, weight: 1 }, A2], { method: 'ties' }, /density \(unset\): ties needs a density in \(0, 1\]/);
  bad([{ adapterId: 'a', adapter: A, weight: 1 }, A2], { method: 'dare_linear', density: 1.5 }, /density 1.5/);
  bad(sources, { method: 'svd', svdRank: 13 }, /svd_rank 13: must be an integer in \[1, 12\]/);
  bad(sources, { method: 'svd', svdClamp: 0 }, /svd_clamp 0: must be in \(0, 1\]/);
  bad([], { method: 'cat' }, /sources: give at least one adapter/);
  bad([sources[0]!, sources[0]!], { method: 'cat' }, /"a" is given twice/);
  bad([{ adapterId: 'a', adapter: A, weight: NaN }], { method: 'cat' }, /weight of "a" must be a finite number/);
  const otherBase = { ...B, config: { ...B.config, baseModelNameOrPath: 'other/model' } };
  const thisBase = { ...A, config: { ...A.config, baseModelNameOrPath: 'stories260K' } };
  bad([{ adapterId: 'a', adapter: thisBase, weight: 1 }, { adapterId: 'b', adapter: otherBase, weight: 1 }], { method: 'cat' }, /different base models/);
  bad(sources, { method: 'nope' as never }, /method "nope": must be one of/);
});
