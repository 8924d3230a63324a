import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ReferenceDecoder, argmax, type ReferenceLora } from '../../kernels/reference/transformer.js';
import type { Engine } from '../../src/engine/engine.js';
import type { LoraAdapterWeights } from '../../src/models/lora.js';
import { loadModelDir } from '../../src/models/load.js';
import { runBatch } from '../../src/scheduler/batch.js';
import { Sequence } from '../../src/scheduler/sequence.js';
import { loadTokenizer, type Tokenizer } from '../../src/tokenizer/index.js';
import type { SamplingParams } from '../../src/sampling/index.js';
import { maxAbsDiff, randomFloats } from '../helpers/ort.js';
import { servedWeights, startTestEngine, STORIES } from '../helpers/engine.js';
import type { LoraModuleInfo } from '../../src/models/graph.js';

const greedy = (maxNewTokens: number): SamplingParams => ({ temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1, maxNewTokens, stopTokenIds: [], stopStrings: [] });
const PROMPTS = ['Once upon a time', 'The cat sat', 'Lily and Tom went to the park to play with a big red ball', 'One day'];

/** A random adapter on every third module, rank 4, as the pool takes it (PEFT layout). */
function randomAdapter(modules: LoraModuleInfo[], seed: number): LoraAdapterWeights {
  return {
    scaling: 2,
    modules: modules.filter((_, i) => (i + seed) % 3 === 0).map((m, i) => ({
      module: m.module,
      r: 4,
      a: randomFloats(4 * m.inFeatures, seed * 1000 + i, 0.5),
      b: randomFloats(m.outFeatures * 4, seed * 2000 + i, 0.5),
    })),
  };
}

async function generate(engine: Engine, tokenizer: Tokenizer, eos: number[], jobs: { prompt: string; slot: number }[]): Promise<number[][]> {
  const seqs = jobs.map((j) => new Sequence(tokenizer.encode(j.prompt), greedy(24), tokenizer, j.slot, eos, 256));
  await runBatch(engine, seqs, { prefillChunk: 4 });
  return seqs.map((s) => s.tokenIds);
}

test('mixed batches are exact: 4 prompts, then 2 adapters + no adapter, together vs alone', async () => {
  const { engine, compiled } = await startTestEngine(STORIES, { kind: 'int4', blockSize: 32, accuracyLevel: 4 }, { maxNumSeqs: 4, maxLoras: 2 });
  const tokenizer = await loadTokenizer(STORIES);
  const eos = compiled.spec.eosTokenIds;
  try {
    await engine.setSlot(1, randomAdapter(compiled.layout.loraModules, 1));
    await engine.setSlot(2, randomAdapter(compiled.layout.loraModules, 2));
    for (const slots of [[0, 0, 0, 0], [1, 0, 2, 1]]) {
      const jobs = PROMPTS.map((prompt, i) => ({ prompt, slot: slots[i]! }));
      const together = await generate(engine, tokenizer, eos, jobs);
      for (let i = 0; i < jobs.length; i++) {
        const [alone] = await generate(engine, tokenizer, eos, [jobs[i]!]);
        assert.deepEqual(together[i], alone, `prompt ${i} (slot ${slots[i]}) alone vs batched`);
      }
      // Sequences of different lengths really ran together and the adapters changed the output.
      assert.ok(new Set(together.map((t) => t.join(','))).size > 1);
    }
    const [base] = await generate(engine, tokenizer, eos, [{ prompt: PROMPTS[0]!, slot: 0 }]);
    const [withAdapter] = await generate(engine, tokenizer, eos, [{ prompt: PROMPTS[0]!, slot: 1 }]);
    assert.notDeepEqual(base, withAdapter);
  } finally {
    await engine.close();
  }
});

test('the LoRA path equals the reference forward with the adapter applied', async () => {
  const quant = { kind: 'int4' as const, blockSize: 32, accuracyLevel: 0 };
  const { engine, compiled } = await startTestEngine(STORIES, quant, { maxLoras: 2, maxLoraRank: 8 });
  try {
    const adapter = randomAdapter(compiled.layout.loraModules, 5);
    await engine.setSlot(2, adapter);
    const { spec, weights } = loadModelDir(STORIES);
    const served = servedWeights(spec, weights, quant);
    const lora: ReferenceLora[] = adapter.modules.map((a) => ({ module: a.module, a: a.a, b: a.b, r: a.r, scale: adapter.scaling }));
    const ref = new ReferenceDecoder(served.spec, served.weights, { lora });
    const prompt = [1, 403, 407, 261, 378];
    let r = await engine.step([{ kvRow: 1, slot: 2, pastLen: 0, tokens: prompt }]);
    let err = maxAbsDiff(r.logits, ref.step(prompt).subarray((prompt.length - 1) * spec.vocabSize));
    for (let past = prompt.length; past < prompt.length + 10; past++) {
      const next = argmax(r.logits);
      r = await engine.step([{ kvRow: 1, slot: 2, pastLen: past, tokens: [next] }]);
      err = Math.max(err, maxAbsDiff(r.logits, ref.step([next])));
    }
    assert.ok(err < 1e-4, `max |logit diff| ${err}`);
    // Clearing the slot gives the base model back exactly.
    await engine.clearSlot(2);
    const a = await engine.step([{ kvRow: 0, slot: 2, pastLen: 0, tokens: prompt }]);
    const b = await engine.step([{ kvRow: 1, slot: 0, pastLen: 0, tokens: prompt }]);
    assert.deepEqual(a.logits, b.logits);
  } finally {
    await engine.close();
  }
});

test('engine rejects malformed steps with clear errors and keeps working', async () => {
  const { engine } = await startTestEngine(STORIES, { kind: 'none' }, { maxNumSeqs: 2, maxModelLen: 16 });
  try {
    await assert.rejects(engine.step([{ kvRow: 5, slot: 0, pastLen: 0, tokens: [1] }]), /kvRow 5: must be a distinct row in 0..1/);
    await assert.rejects(engine.step([{ kvRow: 0, slot: 9, pastLen: 0, tokens: [1] }]), /slot 9/);
    await assert.rejects(engine.step([{ kvRow: 0, slot: 0, pastLen: 15, tokens: [1, 2] }]), /exceed maxModelLen 16/);
    await assert.rejects(engine.step([{ kvRow: 0, slot: 0, pastLen: 0, tokens: [1, 2] }, { kvRow: 1, slot: 0, pastLen: 0, tokens: [1] }]), /same, non-zero number of tokens/);
    const ok = await engine.step([{ kvRow: 0, slot: 0, pastLen: 0, tokens: [1] }]);
    assert.equal(ok.logits.length, 512);
  } finally {
    await engine.close();
  }
});
