import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import type { Engine } from '../../src/engine/engine.js';
import type { PrefixOps } from '../../src/engine/prefix-cache.js';
import { STORIES, startTestEngine } from '../helpers/engine.js';

const CHUNK = 16;
const BLOCK = 64;
const prompt = (seed: number, n: number) => Array.from({ length: n }, (_, i) => 3 + ((i * 7919 + seed * 104729) % 509));

let engine: Engine;
before(async () => {
  ({ engine } = await startTestEngine(STORIES, { kind: 'int4', blockSize: 32, accuracyLevel: 4 }, { maxNumSeqs: 3, maxModelLen: 256 }));
});
after(async () => {
  await engine.close();
});

/** Prefills tokens[from..] into a row in fixed chunks; `ops(end)` gives each chunk's prefix work. Returns the last logits. */
async function prefill(kvRow: number, tokens: number[], from: number, ops: (end: number, first: boolean) => PrefixOps | undefined = () => undefined): Promise<Float32Array> {
  let logits: Float32Array = new Float32Array(0);
  for (let p = from; p < tokens.length; p += CHUNK) {
    const chunk = tokens.slice(p, p + CHUNK);
    ({ logits } = await engine.step([{ kvRow, slot: 0, pastLen: p, tokens: chunk }], ops(p + chunk.length, p === from)));
  }
  return logits;
}

test('a restored prefix gives bit-identical logits to a fresh prefill, over a row a longer request left dirty', async () => {
  const tokens = prompt(1, 150);
  const saves = (end: number): PrefixOps | undefined => (end % BLOCK === 0 ? { blockTokens: BLOCK, save: [{ kvRow: 0, start: end - BLOCK, id: `b${end}` }] } : undefined);
  const fresh = await prefill(0, tokens, 0, saves);
  // Row 1 first holds another, longer prompt: the restore and the step's clear must leave nothing of it.
  await prefill(1, prompt(2, 230), 0);
  const restored = await prefill(1, tokens, 2 * BLOCK, (_end, first) => (first ? { blockTokens: BLOCK, restore: [{ kvRow: 1, ids: ['b64', 'b128'] }] } : undefined));
  assert.deepEqual(restored, fresh);
  // And a decode step after it agrees too (the whole row, restored part included, is what attention reads).
  const a = await engine.step([{ kvRow: 0, slot: 0, pastLen: 150, tokens: [42] }]);
  const b = await engine.step([{ kvRow: 1, slot: 0, pastLen: 150, tokens: [42] }]);
  assert.deepEqual(b.logits, a.logits);
});

test('a dropped block is gone: restoring it fails the step, and the drop happens even then', async () => {
  await prefill(2, prompt(3, 64), 0, (end) => (end === 64 ? { blockTokens: BLOCK, save: [{ kvRow: 2, start: 0, id: 'gone' }] } : undefined));
  await engine.step([{ kvRow: 2, slot: 0, pastLen: 0, tokens: [5] }], { blockTokens: BLOCK, drop: ['gone'] });
  await assert.rejects(engine.step([{ kvRow: 2, slot: 0, pastLen: 64, tokens: [5] }], { blockTokens: BLOCK, restore: [{ kvRow: 2, ids: ['gone'] }] }), /prefix block gone is not in the engine's store/);
});
