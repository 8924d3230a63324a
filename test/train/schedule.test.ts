import assert from 'node:assert/strict';
import { test } from 'node:test';
import { lrAt, lrMultiplier, warmupStepsFor } from '../../src/train/schedule.js';

// Expected values worked out by hand from transformers' lr_lambda formulas.
const close = (a: number, b: number) => assert.ok(Math.abs(a - b) < 1e-12, `${a} != ${b}`);

test('constant with warm-up: step / warmup, then 1', () => {
  const f = (s: number) => lrMultiplier(s, 'constant', 4, 100);
  assert.deepEqual([0, 1, 2, 3, 4, 50, 100, 200].map(f), [0, 0.25, 0.5, 0.75, 1, 1, 1, 1]);
  assert.equal(lrMultiplier(0, 'constant', 0, 10), 1);
});

test('linear: warm-up, then (T - step) / (T - warmup), 0 at and after T', () => {
  const f = (s: number) => lrMultiplier(s, 'linear', 2, 10);
  close(f(0), 0);
  close(f(1), 0.5);
  close(f(2), 1);
  close(f(3), 7 / 8);
  close(f(6), 0.5);
  close(f(9), 1 / 8);
  close(f(10), 0);
  close(f(12), 0);
  // No warm-up: the first step has the full rate.
  close(lrMultiplier(0, 'linear', 0, 4), 1);
  close(lrMultiplier(3, 'linear', 0, 4), 0.25);
});

test('cosine: 0.5 * (1 + cos(pi * progress)) after warm-up (num_cycles 0.5)', () => {
  const f = (s: number) => lrMultiplier(s, 'cosine', 2, 10);
  close(f(1), 0.5);
  close(f(2), 1);
  close(f(4), 0.5 * (1 + Math.SQRT1_2)); // progress 1/4: cos(pi/4)
  close(f(6), 0.5); // progress 1/2
  close(f(8), 0.5 * (1 - Math.SQRT1_2)); // progress 3/4
  close(f(10), 0);
  // transformers does not clamp past T: progress 9/8 rises again (cos(9pi/8) = -cos(pi/8)).
  close(f(11), 0.5 * (1 - Math.cos(Math.PI / 8)));
});

test('lrAt multiplies the base rate; warmupStepsFor is steps, else ceil(ratio * total)', () => {
  close(lrAt(6, { schedule: 'linear', baseLr: 2e-4, warmupSteps: 2, totalSteps: 10 }), 1e-4);
  assert.equal(warmupStepsFor(5, 0, 100), 5);
  assert.equal(warmupStepsFor(0, 0.1, 95), 10);
  assert.equal(warmupStepsFor(0, 0, 95), 0);
});
