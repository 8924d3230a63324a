import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { readFileSync } from 'node:fs';
import { makeRandomAdapter, writePeftAdapter } from '../../src/adapters/peft.js';
import { readModelSpec } from '../../src/models/config.js';
import type { LmHeadQuant, ModelQuant } from '../../src/models/linear.js';
import { ExportDtype } from '../../src/gen/loraplex/v1/adapters_pb.js';
import { collect, startTestServer, type TestServer } from '../helpers/server.js';
import { STORIES, tempDir } from '../helpers/engine.js';

const spec = readModelSpec(STORIES);
const PROMPT = { case: 'text' as const, value: 'Once upon a time' };

async function greedy(s: TestServer, adapterId = ''): Promise<number[]> {
  return (await collect(s.inference.generate({ prompt: PROMPT, adapterId, sampling: { temperature: 0, maxNewTokens: 48 } }))).tokenIds;
}

async function servedTokens(modelDir: string, quant: ModelQuant): Promise<number[]> {
  const s = await startTestServer({ modelDir, source: modelDir }, quant);
  try {
    return await greedy(s);
  } finally {
    await s.close();
  }
}

// Accuracy level 0: the 4-bit and 8-bit kernels compute in float32 on the dequantized weights, so a float32
// model holding those weights computes the same logits up to float32 rounding.
for (const lmHead of ['int8', 'int4', 'none'] as LmHeadQuant[]) {
  test(`lmHeadQuant ${lmHead}: an export reproduces what the int4 server served, served as float32 and served again as it was`, async () => {
    const quant: ModelQuant = { kind: 'int4', blockSize: 32, accuracyLevel: 0, lmHead };
    const exportRoot = tempDir('lm-head-exports');
    const s = await startTestServer({ exportRoot }, quant);
    let tuned: number[];
    let base: number[];
    try {
      writePeftAdapter(join(s.adapterRoot, 'style'), makeRandomAdapter(spec, { r: 8, alpha: 16, targetModules: ['q_proj', 'v_proj', 'down_proj'], seed: 5, bStd: 0.3 }));
      tuned = await greedy(s, 'style');
      base = await greedy(s);
      assert.notDeepEqual(tuned, base, 'the adapter changes the output');
      await s.adapters.exportMergedModel({ adapters: [{ adapterId: 'style' }], outputName: 'merged', dtype: ExportDtype.FLOAT32 });
      // Weight 0: the served base alone.
      await s.adapters.exportMergedModel({ adapters: [{ adapterId: 'style', weight: 0 }], outputName: 'base', dtype: ExportDtype.FLOAT32 });
    } finally {
      await s.close();
    }
    const merged = join(exportRoot, 'merged');
    const config = JSON.parse(readFileSync(join(merged, 'config.json'), 'utf8'));
    // stories260K ties its head to the embedding; as served (float16 table, head in its own codec) they differ.
    assert.equal(config.tie_word_embeddings, false);
    assert.equal(JSON.parse(readFileSync(join(merged, 'loraplex_export.json'), 'utf8')).baseQuantization.lmHead, lmHead);
    assert.deepEqual(await servedTokens(merged, { kind: 'none' }), tuned);
    // Quantizing the served weights again gives back the same codes: the same server, the same tokens.
    assert.deepEqual(await servedTokens(join(exportRoot, 'base'), quant), base);
  });
}
