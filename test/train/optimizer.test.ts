import assert from 'node:assert/strict';
import { test } from 'node:test';
import { AdamW, clipGradNorm } from '../../src/train/optimizer.js';

/** torch.optim.AdamW's update written out plainly in float64 (the reference, not the code under test). */
function referenceAdamW(p0: number[], grads: number[][], lrs: number[], b1: number, b2: number, eps: number, wd: number): number[] {
  const p = [...p0];
  const m = p.map(() => 0);
  const v = p.map(() => 0);
  grads.forEach((g, k) => {
    const t = k + 1;
    const lr = lrs[k]!;
    for (let j = 0; j < p.length; j++) {
      p[j] = p[j]! * (1 - lr * wd);
      m[j] = b1 * m[j]! + (1 - b1) * g[j]!;
      v[j] = b2 * v[j]! + (1 - b2) * g[j]! * g[j]!;
      const mHat = m[j]! / (1 - b1 ** t);
      const denom = Math.sqrt(v[j]!) / Math.sqrt(1 - b2 ** t) + eps;
      p[j] = p[j]! - (lr * mHat) / denom;
    }
  });
  return p;
}

test('AdamW matches hand-computed torch.optim.AdamW values for three steps', () => {
  // p=1, lr=0.1, betas (0.9, 0.999), eps 1e-8, weight_decay 0.01, grads 0.5, -0.25, 0.125; the expected
  // parameters are torch's formulas evaluated by hand in float64.
  const value = new Float32Array([1]);
  const opt = new AdamW([{ name: 'w', value }], { lr: 0.1, betas: [0.9, 0.999], eps: 1e-8, weightDecay: 0.01 });
  const expected = [0.899000002, 0.8714672987058463, 0.8365529176159483];
  [0.5, -0.25, 0.125].forEach((g, k) => {
    opt.step([new Float32Array([g])]);
    assert.ok(Math.abs(value[0]! - expected[k]!) < 1e-7, `step ${k + 1}: ${value[0]} vs ${expected[k]}`);
  });
  assert.equal(opt.stepCount, 3);
  const st = opt.state();
  assert.ok(Math.abs(st.expAvg.get('w')![0]! - 0.0305) < 1e-8);
  assert.ok(Math.abs(st.expAvgSq.get('w')![0]! - 0.00032756275) < 1e-10);
});

test('AdamW matches the float64 reference over several tensors, steps and per-step learning rates', () => {
  let s = 12345;
  const rand = () => ((s = (Math.imul(s, 1103515245) + 12345) >>> 0) / 2 ** 32) * 2 - 1;
  const sizes = [7, 3, 12];
  const p0 = sizes.map((n) => Array.from({ length: n }, rand));
  const grads = Array.from({ length: 6 }, () => sizes.map((n) => Array.from({ length: n }, () => rand() * 0.1)));
  const lrs = [0, 1e-3, 2e-3, 2e-3, 1e-3, 5e-4];
  const [b1, b2, eps, wd] = [0.8, 0.95, 1e-6, 0.1];
  const params = p0.map((p, i) => ({ name: `p${i}`, value: Float32Array.from(p) }));
  const opt = new AdamW(params, { lr: 1, betas: [b1, b2], eps, weightDecay: wd });
  grads.forEach((g, k) => opt.step(g.map((x) => Float32Array.from(x)), lrs[k]));
  p0.forEach((p, i) => {
    const ref = referenceAdamW(Array.from(Float32Array.from(p)), grads.map((g) => Array.from(Float32Array.from(g[i]!))), lrs, b1, b2, eps, wd);
    ref.forEach((r, j) => assert.ok(Math.abs(params[i]!.value[j]! - r) < 1e-6, `p${i}[${j}]: ${params[i]!.value[j]} vs ${r}`));
  });
});

test('AdamW state round-trips: resuming gives the same parameters as an uninterrupted run', () => {
  const mk = () => [{ name: 'a', value: new Float32Array([0.5, -1, 2]) }];
  const grads = [[0.1, 0.2, -0.3], [0.05, -0.1, 0.2], [-0.2, 0.3, 0.1], [0.4, 0.0, -0.1]].map((g) => Float32Array.from(g));
  const opts = { lr: 0.01, betas: [0.9, 0.999] as [number, number], eps: 1e-8, weightDecay: 0.01 };
  const straight = mk();
  const o1 = new AdamW(straight, opts);
  for (const g of grads) o1.step([g]);
  const first = mk();
  const o2 = new AdamW(first, opts);
  o2.step([grads[0]!]);
  o2.step([grads[1]!]);
  const saved = o2.state();
  const resumed = [{ name: 'a', value: first[0]!.value.slice() }];
  const o3 = new AdamW(resumed, opts);
  o3.loadState(saved);
  o3.step([grads[2]!]);
  o3.step([grads[3]!]);
  assert.deepEqual(resumed[0]!.value, straight[0]!.value);
  assert.throws(() => o3.loadState({ step: 1, expAvg: new Map([['b', new Float32Array(3)]]), expAvgSq: new Map() }), /unknown parameter b/);
  assert.throws(() => o3.step([]), /0 gradients for 1 parameters/);
});

test('clipGradNorm: global L2 norm over all tensors, scaled by maxNorm / (norm + 1e-6) only above maxNorm', () => {
  const g = [new Float32Array([3, 0]), new Float32Array([0, 4])];
  assert.equal(clipGradNorm(g, 10), 5);
  assert.deepEqual([...g[0]!, ...g[1]!], [3, 0, 0, 4]);
  assert.equal(clipGradNorm(g, 1), 5);
  const c = 1 / (5 + 1e-6);
  assert.ok(Math.abs(g[0]![0]! - 3 * c) < 1e-7 && Math.abs(g[1]![1]! - 4 * c) < 1e-7);
  assert.ok(Math.abs(clipGradNorm(g, 0) - 1) < 1e-6); // 0: norm only
  const bad = [new Float32Array([1, Number.NaN])];
  assert.ok(Number.isNaN(clipGradNorm(bad, 1)));
  assert.equal(bad[0]![0], 1);
});
