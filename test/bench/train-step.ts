/**
 * One training-step measurement in its own process (so peak RSS is this configuration's alone):
 * node dist/test/bench/train-step.js MODEL_DIR TARGETS(comma) R SEQ STEPS THREADS [CHECKPOINTING on|off] [FORWARD dq|nbits0|nbits4]
 * FORWARD: the frozen linears' forward as DequantizeLinear + sgemm (dq, the default), or MatMulNBits at accuracy
 * level 0 (float compute) or 4 (int8 activations: not exact to the dequantized weights). dX is exact either way.
 * Prints JSON: tokens/s of forward + backward + AdamW on one [1, SEQ] micro-batch, setup seconds, peak RSS (and that of
 * the short-lived process that builds the graph, which exits before the session loads).
 */
import { join } from 'node:path';
import { TrainRuntime } from '../../src/engine/train-runtime.js';
import { writeTrainingGraphFile } from '../../src/train/graph-file.js';
import { loadModelDir } from '../../src/models/load.js';
import { initLora, loraParams } from '../../src/train/init.js';
import { AdamW } from '../../src/train/optimizer.js';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';

const [modelDir, targets, rArg, seqArg, stepsArg, threadsArg, checkpointingArg, forwardArg] = process.argv.slice(2);
const checkpointing = checkpointingArg !== 'off';
const forward = forwardArg ?? 'dq';
const accuracyLevel = forward === 'nbits4' ? 4 : 0;
const r = Number(rArg);
const seq = Number(seqArg);
const steps = Number(stepsArg);
const t0 = performance.now();
const { spec } = loadModelDir(modelDir!);
const adapter = initLora(spec, { r, loraAlpha: 2 * r, targetModules: targets!.split(','), useRslora: false }, 1);
// B = 0 at init makes dA zero; give B values so the step does the full work.
for (const m of adapter.modules) m.b.fill(0.001);
const dir = mkdtempSync(join(tmpdir(), 'loraplex-train-bench-'));
// Built in a process of its own, as the trainer does: its JS copy of the weights is gone before onnxruntime loads.
const { modelPath, peakRssBytes: graphPeakRss } = await writeTrainingGraphFile({ modelDir: modelDir!, dir, options: { quant: { kind: 'int4', blockSize: 32, accuracyLevel }, dequantizedForward: forward === 'dq', modules: adapter.modules.map((m) => ({ module: m.module, inFeatures: m.inFeatures, outFeatures: m.outFeatures })), r, scaling: adapter.scaling, maxSeqLength: seq, checkpointing } });
const rt = await TrainRuntime.create(modelPath, Number(threadsArg ?? 2));
const setupSeconds = (performance.now() - t0) / 1000;
const optimizer = new AdamW(loraParams(adapter), { lr: 1e-4, betas: [0.9, 0.999], eps: 1e-8, weightDecay: 0 });
const ids = BigInt64Array.from({ length: seq }, (_, i) => BigInt(10 + ((i * 37) % (spec.vocabSize - 20))));
const labels = BigInt64Array.from({ length: seq }, (_, i) => BigInt(10 + (((i + 1) * 37) % (spec.vocabSize - 20))));
const params = adapter.modules.map((m) => ({ module: m.module, r: m.r, inFeatures: m.inFeatures, outFeatures: m.outFeatures, a: m.a, b: m.b }));
const step = async () => {
  const { grads } = await rt.step({ batch: 1, seqLength: seq, inputIds: ids, labels }, params);
  optimizer.step(grads.flatMap((g) => [g.a, g.b]), 1e-4);
};
await step(); // warm-up
const t1 = performance.now();
for (let i = 0; i < steps; i++) await step();
const stepSeconds = (performance.now() - t1) / 1000 / steps;
await rt.release();
rmSync(dir, { recursive: true, force: true });
process.stdout.write(`${JSON.stringify({ targets, checkpointing, forward, r, seq, stepSeconds: +stepSeconds.toFixed(3), tokensPerSecond: +(seq / stepSeconds).toFixed(1), setupSeconds: +setupSeconds.toFixed(1), peakRssMiB: Math.round(process.resourceUsage().maxRSS / 1024), graphBuildPeakRssMiB: Math.round(graphPeakRss / 2 ** 20), loraParams: adapter.modules.reduce((n, m) => n + m.a.length + m.b.length, 0) })}\n`);
