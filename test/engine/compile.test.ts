import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync } from 'node:fs';
import { compileModel } from '../../src/engine/compile.js';
import { STORIES, tempDir } from '../helpers/engine.js';

test('quantized graphs are cached by model content, quant settings and engine version', () => {
  const cacheDir = tempDir('compile');
  const quant = { kind: 'int4' as const, blockSize: 32, accuracyLevel: 4 };
  const cold = compileModel(STORIES, { quant, cacheDir });
  assert.equal(cold.cached, false);
  const warm = compileModel(STORIES, { quant, cacheDir });
  assert.equal(warm.cached, true, 'the second start does not quantize again');
  assert.equal(warm.key, cold.key);
  assert.equal(warm.modelPath, cold.modelPath);
  assert.deepEqual(warm.layout, cold.layout);
  const other = compileModel(STORIES, { quant: { ...quant, blockSize: 64 }, cacheDir });
  assert.equal(other.cached, false);
  assert.notEqual(other.key, cold.key);
  // Only finished entries remain: no temporary folders are left behind.
  assert.deepEqual(readdirSync(cacheDir).sort(), [cold.key, other.key].sort());
});
