import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { readPeftAdapter } from '../../src/adapters/peft.js';
import { loadModelDir } from '../../src/models/load.js';
import { loadTokenizer } from '../../src/tokenizer/index.js';
import { validateTrainConfig, type TrainConfigInput } from '../../src/train/config.js';
import { loadTrainData } from '../../src/train/data.js';
import { runTraining, type TrainEvent, type TrainRunOptions } from '../../src/train/trainer.js';
import { writePeftAdapter } from '../../src/adapters/peft.js';
import { buildDataset } from '../../src/train/collate.js';
import { TrainRuntime } from '../../src/engine/train-runtime.js';
import { writeTrainingGraphFile } from '../../src/train/graph-file.js';
import { buildTrainingGraph } from '../../src/models/train-graph.js';
import { writeOnnxModel } from '../../kernels/onnx.js';
import { Sequence } from '../../src/scheduler/sequence.js';
import { runBatch } from '../../src/scheduler/batch.js';
import { STORIES, startTestEngine, tempDir } from '../helpers/engine.js';

const SHAKESPEARE = new URL('../../../../shared/datasets/tinyshakespeare.txt', import.meta.url).pathname;
const QUANT = { kind: 'int4' as const, blockSize: 32, accuracyLevel: 0 };
const { spec, weights } = loadModelDir(STORIES);
const tokenizer = await loadTokenizer(STORIES);

function options(extra: TrainConfigInput, jobDir: string, events?: TrainEvent[], signal?: AbortSignal): TrainRunOptions {
  const config = validateTrainConfig({ r: 8, loraAlpha: 16, targetModules: 'all-linear', learningRate: 3e-3, microBatchSize: 8, maxSeqLength: 64, evalFraction: 0.05, seed: 7, ...extra }, { spec, maxLoraRank: 16, maxModelLen: 512 });
  // The first 300 kB of Shakespeare: enough for a clear style change, small enough for CI.
  const data = loadTrainData({ path: 'tinyshakespeare.txt', textSplit: 'paragraph' }, { dataRoot: join(SHAKESPEARE, '..') });
  data.train = data.train.slice(0, 400);
  return { spec, modelDir: STORIES, tokenizer, quant: QUANT, config, data, jobDir, threads: 2, baseModelNameOrPath: 'stories260K', ...(events ? { onEvent: (e) => events.push(e) } : {}), ...(signal ? { signal } : {}) };
}

async function greedy(adapterDir: string | null, prompt: string): Promise<string> {
  const { engine } = await startTestEngine(STORIES, { kind: 'int4', blockSize: 32, accuracyLevel: 4 }, { maxLoraRank: 16 });
  try {
    if (adapterDir) await engine.setSlot(1, readPeftAdapter(adapterDir, spec));
    const seq = new Sequence(tokenizer.encode(prompt), { temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1, maxNewTokens: 60, stopTokenIds: [], stopStrings: [] }, tokenizer, adapterDir ? 1 : 0, spec.eosTokenIds, 256);
    await runBatch(engine, [seq], { prefillChunk: 16 });
    return seq.text;
  } finally {
    await engine.close();
  }
}

test('QLoRA on stories260K (int4) with tinyshakespeare: eval loss drops clearly and the style shifts', async () => {
  const events: TrainEvent[] = [];
  const result = await runTraining(options({ maxSteps: 200, evalEvery: 100 }, tempDir('job'), events));
  console.log(`eval loss ${result.initialEvalLoss!.toFixed(3)} -> ${result.evalLoss!.toFixed(3)} in ${result.steps} steps, ${result.tokensPerSecond.toFixed(0)} tokens/s`);
  assert.ok(result.evalLoss! < result.initialEvalLoss! - 1.5, `eval loss ${result.initialEvalLoss} -> ${result.evalLoss}`);
  assert.equal(events.filter((e) => e.type === 'progress').length, 200);
  assert.equal(events.filter((e) => e.type === 'eval').length, 2);
  const dir = join(tempDir('adapter'), 'shakespeare');
  writePeftAdapter(dir, result.adapter);
  const before = await greedy(null, 'Once upon a time');
  const after = await greedy(dir, 'Once upon a time');
  console.log(`base: ${JSON.stringify(before)}\nadapter: ${JSON.stringify(after)}`);
  // Children's stories (prose, no line breaks) -> a play: short lines, often a speaker's name and a colon. Which
  // of the two greedy decoding lands on depends on the last digits of the weights (the head's codec decides it).
  assert.doesNotMatch(before, /^[A-Z]{3,}[A-Za-z ]*:$/m);
  assert.ok(before.split('\n').length < 4, `base text ${JSON.stringify(before)}`);
  assert.ok(/[A-Z][A-Za-z]*:\s*\n/.test(after) || after.split('\n').length >= 4, `adapter text ${JSON.stringify(after)}`);
  assert.notEqual(after, before);

  // The saved adapter, loaded back and served by the engine, gives the training graph's numbers: the serving
  // graph's cross-entropy over an eval sequence equals the training graph's loss for it.
  const reloaded = readPeftAdapter(dir, spec);
  const seqOf = buildDataset(options({}, tempDir('x')).data, tokenizer, { maxSeqLength: 64, microBatchSize: 8, seed: 7, evalFraction: 0.05 }).evalSet[0]!;
  const { graph } = buildTrainingGraph(spec, weights, { quant: QUANT, modules: reloaded.modules.map((m) => ({ module: m.module, inFeatures: m.inFeatures, outFeatures: m.outFeatures })), r: reloaded.r, scaling: reloaded.scaling });
  const { modelPath } = writeOnnxModel(graph.toOnnx(), tempDir('graph'), 'train');
  const rt = await TrainRuntime.create(modelPath, 1);
  const params = reloaded.modules.map((m) => ({ module: m.module, r: m.r, inFeatures: m.inFeatures, outFeatures: m.outFeatures, a: m.a, b: m.b }));
  const trainLoss = await rt.loss({ batch: 1, seqLength: 64, inputIds: BigInt64Array.from(seqOf.inputIds, BigInt), labels: BigInt64Array.from(seqOf.labels, BigInt) }, params);
  await rt.release();
  const { engine } = await startTestEngine(STORIES, QUANT, { maxLoraRank: 16 });
  let served = 0;
  let count = 0;
  try {
    await engine.setSlot(1, reloaded);
    for (let t = 0; t < seqOf.length; t++) {
      const { logits } = await engine.step([{ kvRow: 0, slot: 1, pastLen: t, tokens: [seqOf.inputIds[t]!] }]);
      const label = seqOf.labels[t]!;
      if (label < 0) continue;
      let max = -Infinity;
      for (const v of logits) max = Math.max(max, v);
      let z = 0;
      for (const v of logits) z += Math.exp(v - max);
      served += -(logits[label]! - max - Math.log(z));
      count++;
    }
  } finally {
    await engine.close();
  }
  assert.ok(Math.abs(served / count - trainLoss) < 1e-4, `served ${served / count} vs trained ${trainLoss}`);
});

test('the same seed gives the same loss curve; a resumed run ends with the same adapter', async () => {
  const curve = async (jobDir: string, signal?: AbortSignal) => {
    const events: TrainEvent[] = [];
    try {
      const r = await runTraining(options({ maxSteps: 10, checkpointEvery: 3 }, jobDir, events, signal));
      return { losses: events.filter((e) => e.type === 'progress').map((e) => (e as { loss: number }).loss), adapter: r.adapter };
    } catch (e) {
      return { losses: events.filter((e) => e.type === 'progress').map((e) => (e as { loss: number }).loss), adapter: null, error: e };
    }
  };
  const a = await curve(tempDir('seed-a'));
  const b = await curve(tempDir('seed-b'));
  assert.deepEqual(a.losses, b.losses);
  // Interrupt after step 7 (checkpoints at 3 and 6), then run again on the same job dir: it resumes at 6.
  const jobDir = tempDir('resume');
  const ctl = new AbortController();
  const events: TrainEvent[] = [];
  await assert.rejects(runTraining({ ...options({ maxSteps: 10, checkpointEvery: 3 }, jobDir), onEvent: (e) => { events.push(e); if (e.type === 'progress' && e.step === 7) ctl.abort(); }, signal: ctl.signal }), /cancelled/);
  const resumedEvents: TrainEvent[] = [];
  const resumed = await runTraining(options({ maxSteps: 10, checkpointEvery: 3 }, jobDir, resumedEvents));
  const firstStep = resumedEvents.find((e) => e.type === 'progress') as { step: number };
  assert.equal(firstStep.step, 7);
  for (let i = 0; i < a.adapter!.modules.length; i++) {
    assert.deepEqual(resumed.adapter.modules[i]!.a, a.adapter!.modules[i]!.a);
    assert.deepEqual(resumed.adapter.modules[i]!.b, a.adapter!.modules[i]!.b);
  }
});

test('the prepacked forward (MatMulNBits) follows the dequantized forward\'s loss curve: only summation order differs', async () => {
  const curve = async (prepackedForward: boolean) => {
    const events: TrainEvent[] = [];
    await runTraining(options({ maxSteps: 5, prepackedForward }, tempDir('prepacked'), events));
    return events.filter((e) => e.type === 'progress').map((e) => (e as { loss: number }).loss);
  };
  const [dequantized, prepacked] = [await curve(false), await curve(true)];
  assert.equal(prepacked.length, 5);
  prepacked.forEach((l, i) => assert.ok(Math.abs(l - dequantized[i]!) < 1e-4, `step ${i + 1}: ${l} vs ${dequantized[i]}`));
});

/** A folder this process may not create (sysfs refuses it), or null where the system allows it. */
function unwritableDir(): string | null {
  const dir = '/sys/loraplex-unwritable/graph';
  try {
    mkdirSync(dir, { recursive: true });
  } catch (e) {
    return ['EACCES', 'EPERM', 'EROFS'].includes((e as NodeJS.ErrnoException).code ?? '') ? dir : null;
  }
  return null;
}

test('a graph folder that cannot be written (a read-only cache) falls back to the job\'s own folder', { skip: unwritableDir() === null && 'this system lets the test write under /sys' }, async () => {
  const events: TrainEvent[] = [];
  const jobDir = tempDir('readonly-cache');
  const result = await runTraining({ ...options({ maxSteps: 2 }, jobDir, events), graphDir: unwritableDir()! });
  assert.equal(result.steps, 2);
  assert.deepEqual(events.filter((e) => e.type === 'graph').map((e) => (e as { base: string }).base), ['quantized']);
  assert.equal(existsSync(join(jobDir, 'graph')), false, 'removed once loaded');
});

test('loraplex train --json prints the final metrics; the adapter names the model as PEFT does', async () => {
  const dataDir = tempDir('cli-data');
  mkdirSync(dataDir, { recursive: true });
  writeFileSync(join(dataDir, 'tiny.txt'), 'First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n'.repeat(40));
  const cli = new URL('../../src/cli/main.js', import.meta.url).pathname;
  const out = join(tempDir('cli-out'), 'adapter');
  const { stdout } = await promisify(execFile)(process.execPath, [cli, 'train', '--model', STORIES, '--data', join(dataDir, 'tiny.txt'), '--out', out, '--max-steps', '5', '--max-seq-length', '32', '--micro-batch-size', '2', '--eval-fraction', '0.2', '--json',
    '--lora-dropout', '0.1', '--text-split', 'paragraph', '--asymmetric', '--block-size', '16', '--threads', '1']);
  const m = JSON.parse(stdout);
  for (const k of ['trainLoss', 'evalLoss', 'steps', 'tokensPerSecond']) assert.ok(typeof m[k] === 'number', k);
  assert.equal(m.steps, 5);
  assert.equal(readPeftAdapter(out, spec).r, 8);
  const config = JSON.parse(readFileSync(join(out, 'adapter_config.json'), 'utf8'));
  // The model's name (its directory's, as it has no _name_or_path), not the path it was given.
  assert.equal(config.base_model_name_or_path, 'stories260K');
  assert.equal(config.lora_dropout, 0.1);
});

test('the training graph is built in a process of its own; its errors come back with their message', async () => {
  const missing = join(tempDir('no-model'), 'absent');
  await assert.rejects(writeTrainingGraphFile({ modelDir: missing, dir: tempDir('graph'), options: { quant: QUANT, modules: [], r: 2, scaling: 1 } }), (e: Error) => e.message.includes(missing));
});
