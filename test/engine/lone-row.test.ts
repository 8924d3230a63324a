import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { Engine } from '../../src/engine/engine.js';
import { startTestEngine, STORIES } from '../helpers/engine.js';

const QUANT = { kind: 'int4' as const, blockSize: 32, accuracyLevel: 4 };
const PROMPTS = [[1, 403, 407, 261, 378], [1, 50, 60, 70, 80, 90, 100]];

/** Row 0's decode logits after its prompt: alone, then next to row 1 decoding its own prompt. */
async function loneAndBatched(engine: Engine): Promise<{ alone: Float32Array; batched: Float32Array }> {
  for (const [row, prompt] of PROMPTS.entries()) await engine.step([{ kvRow: row, slot: 0, pastLen: 0, tokens: prompt }]);
  const decode = (row: number) => ({ kvRow: row, slot: 0, pastLen: PROMPTS[row]!.length, tokens: [42 + row] });
  const alone = (await engine.step([decode(0)])).logits.slice();
  const both = (await engine.step([decode(0), decode(1)])).logits;
  return { alone, batched: both.slice(0, alone.length) };
}

const identical = (a: Float32Array, b: Float32Array) => a.length === b.length && a.every((v, i) => Object.is(v, b[i]));

test('the start probe is right: without pairing a lone row differs from batched exactly when the default engine pairs', async () => {
  const fast = await startTestEngine(STORIES, QUANT, { exactBatches: false });
  const exact = await startTestEngine(STORIES, QUANT);
  try {
    assert.equal(fast.engine.info.pairsSingleRows, false, 'exactBatches false never pairs');
    const unpaired = await loneAndBatched(fast.engine);
    assert.equal(exact.engine.info.pairsSingleRows, !identical(unpaired.alone, unpaired.batched), 'the probe saw what a real lone step does');
    const paired = await loneAndBatched(exact.engine);
    assert.ok(identical(paired.alone, paired.batched), 'with the default, a lone decode step equals the same row batched, bit for bit');
  } finally {
    await fast.engine.close();
    await exact.engine.close();
  }
});
