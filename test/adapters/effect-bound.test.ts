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
