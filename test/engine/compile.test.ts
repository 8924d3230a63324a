import { test } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, openSync, readdirSync, readFileSync, renameSync, rmSync, statSync, utimesSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { compileModel } from '../../src/engine/compile.js';
import { contentKey } from '../../src/models/load.js';
import { makeModel } from '../../src/models/make.js';
import { startTestEngine, STORIES, tempDir } from '../helpers/engine.js';

test('quantized graphs are cached by model content, quant settings and engine version', () => {
  const cacheDir = tempDir('compile');
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
  // Only finished entries (and the model files' identities) remain: no temporary folders are left behind.
  assert.deepEqual(readdirSync(cacheDir).sort(), [cold.key, other.key, 'identities'].sort());
});

/** Model files written by a test are seconds old at most; pretending a minute passed lets their identity count. */
const later = () => Date.now() + 60_000;
const quant = { kind: 'int4' as const, blockSize: 32, accuracyLevel: 4 };

/** A counting stand-in for the full-content hash, so a test can see whether a start read the weights. */
function countingHash(): { hashContent: (dir: string) => string; calls: () => number } {
  let calls = 0;
  return { hashContent: (dir) => (calls++, contentKey(dir)), calls: () => calls };
}

/** Whole seconds survive utimes exactly (a Date or a float loses the nanoseconds), so a test can put an mtime back. */
const PINNED_MTIME = 1_700_000_000;

function pinTimes(file: string): void {
  utimesSync(file, PINNED_MTIME, PINNED_MTIME);
}

/** A tiny random model whose key files carry PINNED_MTIME. */
function tinyModel(seed: number): string {
  const dir = join(tempDir('identity-model'), 'model');
  makeModel({ arch: 'llama', size: 'tiny', outDir: dir, seed });
  for (const f of ['config.json', 'generation_config.json', 'model.safetensors']) pinTimes(join(dir, f));
  return dir;
}

/** Waits (without a time limit) until the kernel's file clock has moved past `file`'s ctime, so a write now gives it a new one. */
function afterFileClockTick(file: string): void {
  const probe = `${file}.clock-probe`;
  const ctime = statSync(file, { bigint: true }).ctimeNs;
  do writeFileSync(probe, 'x');
  while (statSync(probe, { bigint: true }).ctimeNs <= ctime);
  rmSync(probe);
}

async function lastLogits(modelDir: string, cacheDir: string): Promise<{ logits: Float32Array; cached: boolean }> {
  const { engine, compiled } = await startTestEngine(modelDir, quant, { cacheDir, maxNumSeqs: 1, maxLoras: 1 });
  try {
    const { logits } = await engine.step([{ kvRow: 0, slot: 0, pastLen: 0, tokens: [1, 5, 9, 14] }]);
    return { logits, cached: compiled.cached };
  } finally {
    await engine.close();
  }
}

test('an unchanged model is served from the cache without reading its weights', () => {
  const dir = tinyModel(1);
  const cacheDir = tempDir('identity-cache');
  const hash = countingHash();
  const cold = compileModel(dir, { quant, cacheDir, hashContent: hash.hashContent, now: later });
  assert.equal(cold.cached, false);
  assert.equal(hash.calls(), 1);
  const warm = compileModel(dir, { quant, cacheDir, hashContent: hash.hashContent, now: later });
  assert.equal(warm.cached, true);
  assert.equal(warm.contentHashed, false);
  assert.equal(hash.calls(), 1, 'the warm start did not hash the weights');
  assert.equal(warm.key, cold.key);
  const meta = JSON.parse(readFileSync(join(cacheDir, cold.key, 'meta.json'), 'utf8')) as { contentKey: string };
  assert.equal(meta.contentKey, contentKey(dir), 'the entry records the full content hash it was built from');
});

test('files written just now are hashed again at the next start (their timestamps may not have ticked yet)', () => {
  const dir = tinyModel(2);
  const cacheDir = tempDir('identity-cache');
  const hash = countingHash();
  compileModel(dir, { quant, cacheDir, hashContent: hash.hashContent, now: () => statSync(join(dir, 'model.safetensors')).ctimeMs + 10 });
  const warm = compileModel(dir, { quant, cacheDir, hashContent: hash.hashContent, now: later });
  assert.equal(hash.calls(), 2);
  assert.equal(warm.cached, true, 'same content, same entry');
});

test('a touched model is hashed again but not quantized again', () => {
  const dir = tinyModel(3);
  const cacheDir = tempDir('identity-cache');
  const hash = countingHash();
  const cold = compileModel(dir, { quant, cacheDir, hashContent: hash.hashContent, now: later });
  const weights = join(dir, 'model.safetensors');
  afterFileClockTick(weights);
  utimesSync(weights, new Date(), new Date());
  const warm = compileModel(dir, { quant, cacheDir, hashContent: hash.hashContent, now: later });
  assert.equal(hash.calls(), 2);
  assert.equal(warm.contentHashed, true);
  assert.equal(warm.cached, true);
  assert.equal(warm.key, cold.key);
});

test('a weight rewritten in place, its size and mtime kept, is quantized again', () => {
  const dir = tinyModel(4);
  const cacheDir = tempDir('identity-cache');
  const cold = compileModel(dir, { quant, cacheDir, now: later });
  const weights = join(dir, 'model.safetensors');
  const { size, mtimeNs } = statSync(weights, { bigint: true });
  afterFileClockTick(weights);
  const fd = openSync(weights, 'r+');
  writeSync(fd, Buffer.alloc(64, 0x3f), 0, 64, Number(size) - 64); // the last tensor's last 16 floats become 0.75
  closeSync(fd);
  pinTimes(weights);
  assert.deepEqual([statSync(weights, { bigint: true }).size, statSync(weights, { bigint: true }).mtimeNs], [size, mtimeNs], 'only the content and ctime changed');
  const warm = compileModel(dir, { quant, cacheDir, now: later });
  assert.equal(warm.cached, false);
  assert.notEqual(warm.key, cold.key);
});

test('a config of another size with the same mtime is read again', () => {
  const dir = tinyModel(5);
  const cacheDir = tempDir('identity-cache');
  const hash = countingHash();
  compileModel(dir, { quant, cacheDir, hashContent: hash.hashContent, now: later });
  const config = join(dir, 'config.json');
  writeFileSync(config, readFileSync(config, 'utf8') + '\n');
  pinTimes(config);
  compileModel(dir, { quant, cacheDir, hashContent: hash.hashContent, now: later });
  assert.equal(hash.calls(), 2);
});

test('a weight file replaced by another model, same size and mtime, serves the new weights', async () => {
  const dir = tinyModel(6);
  const other = tinyModel(7);
  const cacheDir = tempDir('identity-cache');
  const before = await lastLogits(dir, cacheDir);
  const weights = join(dir, 'model.safetensors');
  renameSync(join(other, 'model.safetensors'), weights);
  const after = await lastLogits(dir, cacheDir);
  assert.equal(after.cached, false, 'rebuilt, not served from the old entry');
  const fresh = await lastLogits(dir, tempDir('identity-cache-fresh'));
  assert.deepEqual(after.logits, fresh.logits, "the new weights' logits");
  assert.notDeepEqual(after.logits, before.logits);
});
