import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { Engine } from '../../src/engine/engine.js';
import type { LoraAdapterWeights } from '../../src/models/lora.js';
import type { LoraModuleInfo } from '../../src/models/graph.js';
import { randomFloats } from '../helpers/ort.js';
import { startTestEngine, STORIES, tempDir } from '../helpers/engine.js';

const QUANT = { kind: 'int4' as const, blockSize: 32, accuracyLevel: 4 };
const SHORT = [1, 403, 407, 261, 378];
const LONG = Array.from({ length: 40 }, (_, i) => 1 + ((i * 37) % 400));

/** A rank-r adapter on every module; `fill` replaces lora_B (e.g. 3e38, finite but absurd). */
function adapter(modules: LoraModuleInfo[], r: number, seed: number, fill?: number): LoraAdapterWeights {
  return {
    scaling: 2,
    modules: modules.map((m, i) => ({
      module: m.module,
      r,
      a: randomFloats(r * m.inFeatures, seed * 1000 + i, 0.5),
      b: fill === undefined ? randomFloats(m.outFeatures * r, seed * 2000 + i, 0.3) : new Float32Array(m.outFeatures * r).fill(fill),
    })),
  };
}

/** Prefill then greedy decode on one row; every step's logits. */
async function run(engine: Engine, kvRow: number, slot: number, prompt: number[], steps: number): Promise<Float32Array[]> {
  const out: Float32Array[] = [];
  let r = await engine.step([{ kvRow, slot, pastLen: 0, tokens: prompt }]);
  out.push(r.logits);
  for (let past = prompt.length; out.length <= steps; past++) {
    let next = 0;
    for (let i = 1; i < r.logits.length; i++) if (r.logits[i]! > r.logits[next]!) next = i;
    r = await engine.step([{ kvRow, slot, pastLen: past, tokens: [next] }]);
    out.push(r.logits);
  }
  return out;
}

function assertBitIdentical(actual: Float32Array[], expected: Float32Array[], what: string): void {
  assert.equal(actual.length, expected.length);
  actual.forEach((l, s) => {
    assert.ok(l.every((v, i) => Object.is(v, expected[s]![i])), `${what}: step ${s} logits differ from a fresh engine's`);
  });
}

test('what a poisoned request leaves in its KV row and LoRA slot never reaches the next request', async () => {
  const cacheDir = tempDir('iso-cache');
  const opts = { cacheDir, maxNumSeqs: 2, maxLoras: 1, maxLoraRank: 8 };
  const fresh = await startTestEngine(STORIES, QUANT, opts);
  const modules = fresh.compiled.layout.loraModules;
  const small = adapter(modules, 2, 7);
  let expectBase: Float32Array[];
  let expectAdapter: Float32Array[];
  try {
    expectBase = await run(fresh.engine, 0, 0, SHORT, 6);
    await fresh.engine.setSlot(1, small);
    expectAdapter = await run(fresh.engine, 0, 1, SHORT, 6);
  } finally {
    await fresh.engine.close();
  }

  const { engine } = await startTestEngine(STORIES, QUANT, opts);
  try {
    // A rank-8 adapter whose lora_B is finite but huge: its request's K/V and logits turn to Inf/NaN.
    await engine.setSlot(1, adapter(modules, 8, 9, 3e38));
    const poisoned = await run(engine, 0, 1, LONG, 4);
    assert.ok(poisoned.some((l) => l.some((v) => !Number.isFinite(v))), 'the huge adapter really produced non-finite logits');

    // The normal release: the row is simply handed to the next request (pastLen 0), the slot is vacated.
    await engine.clearSlot(1);
    assertBitIdentical(await run(engine, 0, 0, SHORT, 6), expectBase, 'base request in the reused row');

    // Poison again, then reload the slot with a lower-rank adapter: no plane of the old one may survive.
    await run(engine, 0, 1, LONG, 4);
    await engine.setSlot(1, small);
    assertBitIdentical(await run(engine, 0, 1, SHORT, 6), expectAdapter, 'rank-2 adapter in the reused slot and row');
    assertBitIdentical(await run(engine, 0, 0, SHORT, 6), expectBase, 'base request after that');
  } finally {
    await engine.close();
  }
});

test('a poisoned row does not touch the other rows of its batch', async () => {
  const { engine, compiled } = await startTestEngine(STORIES, QUANT, { maxNumSeqs: 2, maxLoras: 1, maxLoraRank: 8 });
  try {
    await engine.setSlot(1, adapter(compiled.layout.loraModules, 8, 9, 3e38));
    await engine.step([{ kvRow: 0, slot: 1, pastLen: 0, tokens: SHORT.slice(0, 4) }]);
    await engine.step([{ kvRow: 1, slot: 0, pastLen: 0, tokens: SHORT.slice(0, 4) }]);
    // Decode both together: row 0 (poisoned) and row 1 (base) at the same position.
    const both = (await engine.step([
      { kvRow: 0, slot: 1, pastLen: 4, tokens: [SHORT[4]!] },
      { kvRow: 1, slot: 0, pastLen: 4, tokens: [SHORT[4]!] },
    ])).logits;
    const V = compiled.layout.vocabSize;
    assert.ok(both.subarray(0, V).some((v) => !Number.isFinite(v)));
    // Decoding the same position again alone (the cache row is rewound to pastLen 4) gives the same bits.
    const again = (await engine.step([{ kvRow: 1, slot: 0, pastLen: 4, tokens: [SHORT[4]!] }])).logits;
    assert.ok(both.subarray(V).every((v, i) => Object.is(v, again[i])), 'base row batched next to a poisoned row vs alone');
  } finally {
    await engine.close();
  }
});
