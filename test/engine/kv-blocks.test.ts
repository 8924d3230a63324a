import { test } from 'node:test';
import assert from 'node:assert/strict';
import { argmax } from '../../kernels/reference/transformer.js';
import type { Engine } from '../../src/engine/engine.js';
import { KV_BLOCK, KvCache } from '../../src/engine/kv-cache.js';
import { STORIES, startTestEngine } from '../helpers/engine.js';

const CHUNK = 16;
const prompt = (seed: number, n: number) => Array.from({ length: n }, (_, i) => 3 + ((i * 7919 + seed * 104729) % 509));

/**
 * Greedy generation of rows together: same-length prompts prefilled in fixed chunks, then `steps` decode steps.
 * `freeRows` go back to the pool at the first step. Returns each row's generated tokens.
 */
async function generate(engine: Engine, kvRows: number[], prompts: number[][], steps: number, freeRows: number[] = []): Promise<number[][]> {
  const vocab = engine.vocabSize;
  let logits: Float32Array = new Float32Array(0);
  for (let p = 0; p < prompts[0]!.length; p += CHUNK) {
    const rows = kvRows.map((kvRow, b) => ({ kvRow, slot: 0, pastLen: p, tokens: prompts[b]!.slice(p, p + CHUNK) }));
    ({ logits } = await engine.step(rows, undefined, p === 0 ? freeRows : undefined));
  }
  const out: number[][] = kvRows.map(() => []);
  for (let s = 0; s < steps; s++) {
    const next = kvRows.map((_, b) => argmax(logits.subarray(b * vocab, (b + 1) * vocab)));
    next.forEach((t, b) => out[b]!.push(t));
    const rows = kvRows.map((kvRow, b) => ({ kvRow, slot: 0, pastLen: prompts[b]!.length + s, tokens: [next[b]!] }));
    ({ logits } = await engine.step(rows));
  }
  return out;
}

test('KV blocks: rows reuse blocks another row left dirty and give the tokens of a fresh run; a full pool fails the step', async () => {
  // 4 blocks of 64 positions for 3 rows: every block is reused.
  const { engine } = await startTestEngine(STORIES, { kind: 'int4', blockSize: 32, accuracyLevel: 4 }, { maxNumSeqs: 3, maxModelLen: 256, kvBlocks: 4 });
  try {
    assert.equal(engine.kvBlocks, 4);
    const p = prompt(1, 80);
    // Alone, on fresh (all-zero) blocks: 80 + 20 positions take 2 blocks.
    const [alone] = await generate(engine, [0], [p], 20);
    // Another row then writes all 4 blocks (230 positions), the 2 that row 0 held included.
    await generate(engine, [1], [prompt(2, 230)], 0, [0]);
    await assert.rejects(engine.step([{ kvRow: 2, slot: 0, pastLen: 0, tokens: [5] }]), (e: Error & { code?: string }) => {
      assert.match(e.message, /KV cache full: the step needs 1 more blocks of 64 positions, 0 of 4 are free/);
      assert.equal(e.code, 'RESOURCE_EXHAUSTED');
      return true;
    });
    // Row 1 ends; p runs again beside another prompt, on blocks row 1 wrote (none is fresh any more).
    const [other, together] = await generate(engine, [2, 0], [prompt(3, 80), p], 20, [1]);
    assert.deepEqual(together, alone);
    assert.notDeepEqual(other, alone);
    // Ending both rows with nothing to run gives every block back.
    assert.equal((await engine.step([], undefined, [0, 2])).kvBlocksUsed, 0);
  } finally {
    await engine.close();
  }
});

test('KvCache: a block handed to a new owner, or a row rewound, reads exact zeros after what it wrote', () => {
  const kvDim = 2;
  const cache = new KvCache(1, 2, 3, kvDim); // 2 usable blocks
  const nan = (n: number) => new Float32Array(2 * n * kvDim).fill(Number.NaN); // k then v, as the graph returns
  cache.prepare(0, 0, 70);
  cache.append(nan(70), [0], [0], 70);
  assert.deepEqual(cache.blocksOf(0), [1, 2]);
  cache.freeRow(0);
  cache.prepare(1, 0, 5);
  cache.append(new Float32Array(2 * 5 * kvDim).fill(1), [1], [0], 5);
  const [block] = cache.blocksOf(1);
  const positions = (from: number, to: number) => Array.from(cache.keys[0]!.subarray((block! * KV_BLOCK + from) * kvDim, (block! * KV_BLOCK + to) * kvDim));
  assert.ok(block === 1 || block === 2);
  assert.deepEqual(positions(0, 5), Array(5 * kvDim).fill(1));
  assert.deepEqual(positions(5, KV_BLOCK), Array((KV_BLOCK - 5) * kvDim).fill(0));
  assert.ok(cache.values[0]!.subarray((block! * KV_BLOCK + 5) * kvDim, (block! + 1) * KV_BLOCK * kvDim).every((x) => x === 0));
  // Rewound to 2 cached positions: what it wrote after them is gone too.
  cache.prepare(1, 2, 3);
  assert.deepEqual(positions(0, 5), [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]);
  // Block 0, the padding of short rows, is never handed out.
  assert.equal(cache.usedBlocks, 1);
  assert.deepEqual(Array.from(cache.blockTable([1, 0], 2)), [BigInt(block!), 0n, 0n, 0n]);
});
