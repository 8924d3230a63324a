import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ReferenceDecoder, argmax } from '../../kernels/reference/transformer.js';
import { makeRandomAdapter } from '../../src/adapters/peft.js';
import { denseDelta, mergeAdapters } from '../../src/adapters/merge.js';
import { loadModelDir } from '../../src/models/load.js';
import type { HostTensor } from '../../src/models/spec.js';
import { maxAbsDiff } from '../helpers/ort.js';
import { startTestEngine, STORIES } from '../helpers/engine.js';

test('a cat merge of A (w1) and B (w2) served by the engine gives the logits of W + w1 dA + w2 dB (plain-TS reference)', async () => {
  const { spec, weights } = loadModelDir(STORIES);
  const A = makeRandomAdapter(spec, { r: 4, alpha: 8, targetModules: ['q_proj', 'v_proj', 'gate_proj'], seed: 21, bStd: 0.2 });
  const B = makeRandomAdapter(spec, { r: 6, alpha: 24, targetModules: ['q_proj', 'o_proj', 'down_proj'], seed: 22, bStd: 0.2 });
  const [w1, w2] = [0.8, -0.6];
  const merged = mergeAdapters([{ adapterId: 'A', adapter: A, weight: w1 }, { adapterId: 'B', adapter: B, weight: w2 }], { method: 'cat' });
  // Dense reference weights: W + w1 * sA * BA + w2 * sB * BB, module by module.
  const overrides = new Map<string, HostTensor>();
  for (const [ad, w] of [[A, w1], [B, w2]] as const) {
    for (const m of ad.modules) {
      const name = `${m.module}.weight`;
      const base = overrides.get(name) ?? { shape: weights.shape(name), data: weights.get(name).data.slice() };
      const d = denseDelta(m, w * ad.scaling).data;
      for (let i = 0; i < d.length; i++) base.data[i]! += d[i]!;
      overrides.set(name, base);
    }
  }
  const ref = new ReferenceDecoder(spec, (name) => overrides.get(name) ?? (weights.has(name) ? weights.get(name) : undefined));
  const { engine } = await startTestEngine(STORIES, { kind: 'none' }, { maxLoras: 2, maxLoraRank: 16 });
  try {
    await engine.setSlot(1, merged);
    const prompt = [1, 403, 407, 261, 378];
    let r = await engine.step([{ kvRow: 0, slot: 1, pastLen: 0, tokens: prompt }]);
    let err = maxAbsDiff(r.logits, ref.step(prompt).subarray((prompt.length - 1) * spec.vocabSize));
    for (let past = prompt.length; past < prompt.length + 12; past++) {
      const next = argmax(r.logits);
      r = await engine.step([{ kvRow: 0, slot: 1, pastLen: past, tokens: [next] }]);
      err = Math.max(err, maxAbsDiff(r.logits, ref.step([next])));
    }
    // float32 graph vs float64-accumulating reference, the LoRA path vs a dense merge: rounding only.
    assert.ok(err < 1e-4, `max |logit diff| ${err}`);
  } finally {
    await engine.close();
  }
});
