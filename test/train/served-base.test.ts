/**
 * A training graph on the served base (src/train/served-base.ts): the frozen weights are the serving graph's bytes,
 * referred to in its cache entry's data file (hard-linked into the job), not quantized again. The numbers must be
 * exactly those of a graph that quantizes the model itself, for every codec a served graph can hold.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { compileModel } from '../../src/engine/compile.js';
import { TrainRuntime } from '../../src/engine/train-runtime.js';
import { loadModelDir } from '../../src/models/load.js';
import { makeModel } from '../../src/models/make.js';
import type { ModelQuant } from '../../src/models/linear.js';
import { trainingQuant } from '../../src/train/runner.js';
import { writeTrainingGraphFile, type GraphFile } from '../../src/train/graph-file.js';
import { BASE_DATA_FILE } from '../../src/train/served-base.js';
import { initLora } from '../../src/train/init.js';
import { STORIES, tempDir } from '../helpers/engine.js';

const gpt2Dir = tempDir('gpt2');
makeModel({ arch: 'gpt2', size: 'tiny', outDir: gpt2Dir, seed: 3 });

interface Step {
  loss: number;
  grads: Float32Array[];
}

/** One training step with every linear adapted (B non-zero, so every gradient is non-trivial). */
async function step(graph: GraphFile, modelDir: string): Promise<Step> {
  const { spec } = loadModelDir(modelDir);
  const adapter = initLora(spec, { r: 4, loraAlpha: 8, targetModules: ['all-linear'], useRslora: false }, 11);
  let x = 11;
  for (const m of adapter.modules) for (let i = 0; i < m.b.length; i++) m.b[i] = ((x = (x * 1103515245 + 12345) % 2147483648) / 2147483648 - 0.5) * 0.1;
  const seq = 24;
  const ids = BigInt64Array.from({ length: 2 * seq }, (_, i) => BigInt((i * 37 + 5) % spec.vocabSize));
  const labels = BigInt64Array.from(ids, (v, i) => (i % 7 === 3 ? -100n : (v + 1n) % BigInt(spec.vocabSize)));
  const rt = await TrainRuntime.create(graph.modelPath, 1);
  try {
    const r = await rt.step({ batch: 2, seqLength: seq, inputIds: ids, labels }, adapter.modules.map((m) => ({ module: m.module, r: m.r, inFeatures: m.inFeatures, outFeatures: m.outFeatures, a: m.a, b: m.b })));
    assert.ok(Number.isFinite(r.loss));
    return { loss: r.loss, grads: r.grads.flatMap((g) => [g.a, g.b]) };
  } finally {
    await rt.release();
  }
}

function graphOf(modelDir: string, quant: ModelQuant, servedModelPath?: string): Promise<GraphFile> {
  const { spec } = loadModelDir(modelDir);
  const modules = initLora(spec, { r: 4, loraAlpha: 8, targetModules: ['all-linear'], useRslora: false }, 0).modules;
  return writeTrainingGraphFile({
    modelDir,
    dir: tempDir('graph'),
    ...(servedModelPath ? { servedModelPath } : {}),
    options: { quant, modules: modules.map((m) => ({ module: m.module, inFeatures: m.inFeatures, outFeatures: m.outFeatures })), r: 4, scaling: 2, maxSeqLength: 64 },
  });
}

const CASES: { name: string; modelDir: string; served: ModelQuant }[] = [
  { name: 'llama int4 (packed q/k/v and gate/up rows), int8 head', modelDir: STORIES, served: { kind: 'int4', blockSize: 32, accuracyLevel: 4 } },
  { name: 'llama int4 with zero points and a padded last block, int4 head', modelDir: STORIES, served: { kind: 'int4', blockSize: 64, symmetric: false, lmHead: 'int4' } },
  { name: 'llama int8, float head', modelDir: STORIES, served: { kind: 'int8', blockSize: 16, lmHead: 'none' } },
  { name: 'gpt2 int4', modelDir: gpt2Dir, served: { kind: 'int4', blockSize: 32 } },
];

for (const c of CASES) {
  test(`a training graph on the served base gives exactly the numbers of one quantized itself: ${c.name}`, async () => {
    const served = compileModel(c.modelDir, { quant: c.served, cacheDir: tempDir('cache') });
    const quant = trainingQuant(c.served);
    const own = await graphOf(c.modelDir, quant);
    const shared = await graphOf(c.modelDir, quant, served.modelPath);
    assert.equal(own.base, 'quantized');
    assert.equal(shared.base, 'linked');
    // One file on disk: the job's base file IS the entry's (a hard link), and its own data holds no weights.
    const entryData = statSync(`${served.modelPath}.data`);
    const linked = statSync(join(dirname(shared.modelPath), BASE_DATA_FILE));
    assert.equal(linked.ino, entryData.ino);
    const ownData = statSync(`${own.modelPath}.data`).size;
    const sharedData = statSync(`${shared.modelPath}.data`).size;
    // What is left is norms, biases, rotary tables, zero points and gpt2's position table.
    if (c.served.kind !== 'none') assert.ok(sharedData < ownData / 3, `the shared graph's own data ${sharedData} bytes vs ${ownData}`);
    const [a, b] = [await step(own, c.modelDir), await step(shared, c.modelDir)];
    assert.equal(b.loss, a.loss);
    assert.equal(b.grads.length, a.grads.length);
    a.grads.forEach((g, i) => assert.deepEqual(b.grads[i], g, `gradient ${i}`));
  });
}

test('a served graph quantized otherwise, or in nf4 or float, is not used: the job quantizes its own', async () => {
  const cases: [ModelQuant, ModelQuant][] = [
    [{ kind: 'int4', blockSize: 64 }, { kind: 'int4', blockSize: 32 }],
    [{ kind: 'int4', blockSize: 32 }, { kind: 'int4', blockSize: 32, symmetric: false }],
    [{ kind: 'int4', blockSize: 32, lmHead: 'int4' }, { kind: 'int4', blockSize: 32 }],
    [{ kind: 'nf4' }, { kind: 'nf4' }],
    [{ kind: 'none' }, { kind: 'none' }],
  ];
  for (const [servedQuant, trained] of cases) {
    const served = compileModel(STORIES, { quant: servedQuant, cacheDir: tempDir('cache') });
    const graph = await graphOf(STORIES, trainingQuant(trained), served.modelPath);
    assert.equal(graph.base, 'quantized', JSON.stringify(servedQuant));
    assert.equal(existsSync(join(dirname(graph.modelPath), BASE_DATA_FILE)), false);
  }
});
