import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { ReferenceDecoder, argmax } from '../../kernels/reference/transformer.js';
import type { QuantOptions } from '../../kernels/quant/index.js';
import type { ModelQuant } from '../../src/models/linear.js';
import type { Engine } from '../../src/engine/engine.js';
import { loadModelDir } from '../../src/models/load.js';
import { makeModel } from '../../src/models/make.js';
import { maxAbsDiff } from '../helpers/ort.js';
import { servedWeights, startTestEngine, STORIES, tempDir } from '../helpers/engine.js';

const reference = JSON.parse(readFileSync(`${STORIES}/reference.json`, 'utf8')).cases[0] as {
  prompt_ids_with_bos: number[];
  greedy_new_ids: number[];
  logits_pos0: number[];
  logits_last_prompt_pos: number[];
};

test('stories260K float32: logits match llama2.c within 1e-4, greedy tokens match exactly', async () => {
  const { engine } = await startTestEngine(STORIES, { kind: 'none' });
  try {
    const prompt = reference.prompt_ids_with_bos;
    const first = await engine.step([{ kvRow: 1, slot: 0, pastLen: 0, tokens: [prompt[0]!] }]);
    assert.ok(maxAbsDiff(first.logits, reference.logits_pos0) < 1e-4);
    // Chunked prefill: 2 tokens, then 3, on row 0; the last chunk's logits are the last prompt position's.
    await engine.step([{ kvRow: 0, slot: 0, pastLen: 0, tokens: prompt.slice(0, 2) }]);
    let r = await engine.step([{ kvRow: 0, slot: 0, pastLen: 2, tokens: prompt.slice(2) }]);
    const err = maxAbsDiff(r.logits, reference.logits_last_prompt_pos);
    assert.ok(err < 1e-4, `last prompt position max |diff| ${err}`);
    const out: number[] = [];
    for (let past = prompt.length; out.length < reference.greedy_new_ids.length; past++) {
      out.push(argmax(r.logits));
      r = await engine.step([{ kvRow: 0, slot: 0, pastLen: past, tokens: [out[out.length - 1]!] }]);
    }
    assert.deepEqual(out, reference.greedy_new_ids);
  } finally {
    await engine.close();
  }
});

/**
 * Drives the engine greedily and checks every position's logits against the plain-TS reference decoder.
 * Returns the greedy tokens and the largest logit difference seen.
 */
async function compareWithReference(engine: Engine, ref: ReferenceDecoder, prompt: number[], steps: number, vocab: number): Promise<{ tokens: number[]; maxErr: number }> {
  let r = await engine.step([{ kvRow: 0, slot: 0, pastLen: 0, tokens: prompt }]);
  const refPrompt = ref.step(prompt);
  let maxErr = maxAbsDiff(r.logits, refPrompt.subarray((prompt.length - 1) * vocab));
  const tokens: number[] = [];
  for (let past = prompt.length; tokens.length < steps; past++) {
    const next = argmax(r.logits);
    tokens.push(next);
    r = await engine.step([{ kvRow: 0, slot: 0, pastLen: past, tokens: [next] }]);
    maxErr = Math.max(maxErr, maxAbsDiff(r.logits, ref.step([next])));
  }
  return { tokens, maxErr };
}

// With accuracy_level 0 the 4-bit kernels dequantize exactly and accumulate in float32, so the graph equals the
// reference over the dequantized weights up to float32 rounding: 1e-4 on logits of magnitude ~10.
for (const quant of [
  { kind: 'int4', blockSize: 32, accuracyLevel: 0 },
  { kind: 'int4', blockSize: 64, symmetric: false, accuracyLevel: 0 },
  { kind: 'nf4', blockSize: 64 },
  { kind: 'int8', blockSize: 32, accuracyLevel: 0 },
  // The output head's own codec (lmHeadQuant; the ones above take the default, int8).
  { kind: 'int4', blockSize: 32, accuracyLevel: 0, lmHead: 'int4' },
  { kind: 'int4', blockSize: 32, accuracyLevel: 0, lmHead: 'none' },
  { kind: 'nf4', blockSize: 64, lmHead: 'int4' },
] as ModelQuant[]) {
  test(`stories260K ${JSON.stringify(quant)}: ORT forward equals the reference over the dequantized weights`, async () => {
    const { spec, weights } = loadModelDir(STORIES);
    const served = servedWeights(spec, weights, quant);
    const { engine } = await startTestEngine(STORIES, quant);
    try {
      const { tokens, maxErr } = await compareWithReference(engine, new ReferenceDecoder(served.spec, served.weights), reference.prompt_ids_with_bos, 32, spec.vocabSize);
      assert.ok(maxErr < 1e-4, `max |logit diff| ${maxErr}`);
      const firstDiff = tokens.findIndex((t, i) => t !== reference.greedy_new_ids[i]);
      // Reported for the README: where 4-bit greedy output first leaves the float32 tokens.
      console.log(`${quant.kind} (lm_head ${quant.lmHead ?? 'int8'}): max |logit diff| vs reference ${maxErr.toExponential(2)}; first token differing from float32 at ${firstDiff < 0 ? 'none of 32' : firstDiff}`);
    } finally {
      await engine.close();
    }
  });
}

test('stories260K int4 accuracy_level 4 (int8 activations): close to the reference, coherent greedy text', async () => {
  const quant: QuantOptions = { kind: 'int4', blockSize: 32, accuracyLevel: 4 };
  const { spec, weights } = loadModelDir(STORIES);
  const served = servedWeights(spec, weights, quant);
  const { engine } = await startTestEngine(STORIES, quant);
  try {
    // Activations are quantized to int8 per block inside the kernel, an error the reference does not model:
    // logits move by up to a few hundredths relative to their spread. Compare on the prompt only (no divergence).
    const r = await engine.step([{ kvRow: 0, slot: 0, pastLen: 0, tokens: reference.prompt_ids_with_bos }]);
    const ref = new ReferenceDecoder(served.spec, served.weights).step(reference.prompt_ids_with_bos).subarray((reference.prompt_ids_with_bos.length - 1) * spec.vocabSize);
    const err = maxAbsDiff(r.logits, ref);
    const spread = Math.max(...ref) - Math.min(...ref);
    console.log(`int4 acc4: max |logit diff| ${err.toFixed(4)} (logit spread ${spread.toFixed(2)})`);
    assert.ok(err < 0.05 * spread, `max |logit diff| ${err} vs spread ${spread}`);
    assert.equal(argmax(r.logits), argmax(ref));
  } finally {
    await engine.close();
  }
});

for (const quant of [{ kind: 'none' }, { kind: 'int4', blockSize: 32, accuracyLevel: 0 }] as QuantOptions[]) {
  test(`random gpt2 ${quant.kind}: ORT forward equals the reference forward`, async () => {
    const dir = tempDir('gpt2');
    await makeModel({ arch: 'gpt2', size: 'tiny', outDir: dir, seed: 7 });
    const { spec, weights } = loadModelDir(dir);
    const served = servedWeights(spec, weights, quant);
    const { engine } = await startTestEngine(dir, quant);
    try {
      const { maxErr } = await compareWithReference(engine, new ReferenceDecoder(served.spec, served.weights), [5, 17, 42, 99, 3, 250], 20, spec.vocabSize);
      assert.ok(maxErr < 1e-4, `max |logit diff| ${maxErr}`);
    } finally {
      await engine.close();
    }
  });
}

test('random llama (GQA, partial quant block) int4: ORT forward equals the reference forward', async () => {
  const dir = tempDir('llama');
  await makeModel({ arch: 'llama', size: 'tiny', outDir: dir, seed: 3 });
  const quant: QuantOptions = { kind: 'int4', blockSize: 32, accuracyLevel: 0 };
  const { spec, weights } = loadModelDir(dir);
  const served = servedWeights(spec, weights, quant);
  const { engine } = await startTestEngine(dir, quant);
  try {
    const { maxErr } = await compareWithReference(engine, new ReferenceDecoder(served.spec, served.weights), [1, 30, 31, 32, 100], 20, spec.vocabSize);
    assert.ok(maxErr < 1e-4, `max |logit diff| ${maxErr}`);
  } finally {
    await engine.close();
  }
});
