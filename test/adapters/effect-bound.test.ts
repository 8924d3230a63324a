import { test } from 'node:test';
import assert from 'node:assert/strict';
import { firstAbsurdEffect, loraEffectNorm, MAX_EFFECT_RATIO } from '../../src/adapters/effect-bound.js';
import { randomFloats } from '../helpers/ort.js';

test('loraEffectNorm equals the Frobenius norm of scaling * B @ A computed directly', () => {
  const [r, inF, outF, scaling] = [3, 7, 5, 1.5];
  const a = randomFloats(r * inF, 1, 1);
  const b = randomFloats(outF * r, 2, 1);
  let sq = 0;
  for (let o = 0; o < outF; o++) {
    for (let i = 0; i < inF; i++) {
      let d = 0;
      for (let k = 0; k < r; k++) d += b[o * r + k]! * a[k * inF + i]!;
      sq += (scaling * d) ** 2;
    }
  }
  assert.ok(Math.abs(loraEffectNorm(a, b, r, scaling) - Math.sqrt(sq)) < 1e-9 * Math.sqrt(sq));
});

test('firstAbsurdEffect: within the bound passes, over it or overflowing names the module', () => {
  const module = { module: 'm', a: new Float32Array([1, 0]), b: new Float32Array([1, 0]), r: 1, inFeatures: 2, outFeatures: 2 };
  const served = [{ module: 'm', inFeatures: 2, outFeatures: 2, baseNorm: 1 }];
  assert.equal(firstAbsurdEffect({ scaling: MAX_EFFECT_RATIO, modules: [module] }, served), null);
  assert.equal(firstAbsurdEffect({ scaling: MAX_EFFECT_RATIO * 1.01, modules: [module] }, served)?.module, 'm');
  const huge = { ...module, b: new Float32Array([3e38, 3e38]) };
  assert.equal(firstAbsurdEffect({ scaling: 1e300, modules: [huge] }, [{ module: 'm', inFeatures: 2, outFeatures: 2 }])?.effect, Infinity);
});

test("firstAbsurdEffect with the decode's sums of squares gives the verdicts of its own pass", () => {
  const sq = (x: Float32Array) => x.reduce((s, v) => s + v * v, 0);
  const served = [{ module: 'm', inFeatures: 3, outFeatures: 2, baseNorm: 1 }];
  for (const [a, b] of [
    [new Float32Array([1, 0, 0]), new Float32Array([1, 0])],
    [new Float32Array([1, 2, -1]), new Float32Array([0.5, 0.25])],
    [new Float32Array([1, 1, 1]), new Float32Array([1, -1])],
  ] as const) {
    const module = { module: 'm', a, b, r: 1, inFeatures: 3, outFeatures: 2 };
    const sums = new Map([['m', { a: sq(a), b: sq(b) }]]);
    for (const scaling of [MAX_EFFECT_RATIO / 4, MAX_EFFECT_RATIO / 2, MAX_EFFECT_RATIO, MAX_EFFECT_RATIO * 2]) {
      const own = firstAbsurdEffect({ scaling, modules: [module] }, served);
      assert.deepEqual(firstAbsurdEffect({ scaling, modules: [module] }, served, sums), own, `scaling ${scaling}`);
    }
    // A non-finite sum (the decode met a NaN) never passes the cheap bound.
    assert.notEqual(firstAbsurdEffect({ scaling: 1, modules: [{ ...module, a: new Float32Array([NaN, 0, 0]) }] }, served, new Map([['m', { a: NaN, b: sq(b) }]])), null);
  }
});
