import { mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import type { ModelQuant } from '../models/linear.js';
import { TrainRuntime } from '../engine/train-runtime.js';
import type { LoraLayerWeights } from '../models/lora.js';
import type { ModelSpec } from '../models/spec.js';
import type { PeftAdapter } from '../adapters/peft.js';
import { diskFullAs, LoraplexError } from '../errors.js';
import { buildDataset, microBatchesOfStep, planSteps, type CollateTokenizer, type MicroBatch, type PackedDataset } from './collate.js';
import type { TrainConfig } from './config.js';
import type { TrainData } from './data.js';
import { initLora, loraParams } from './init.js';
import { AdamW, clipGradNorm } from './optimizer.js';
import { lrAt, warmupStepsFor } from './schedule.js';
import { writeTrainingGraphFile } from './graph-file.js';
import type { BaseSource } from './served-base.js';
import { latestCheckpoint, readCheckpoint, writeCheckpoint, type MetricsRecord } from './checkpoint.js';

/**
 * One training run: packed data -> training graph (frozen 4-bit base + LoRA gradients) -> AdamW with schedule,
 * clipping and accumulation -> eval and checkpoints -> the trained PEFT adapter. Resumes from the job
 * directory's latest checkpoint; the data position and the parameters come back exactly.
 */
export interface TrainRunOptions {
  spec: ModelSpec;
  /** The base model's directory (the training graph is built from it in a process of its own). */
  modelDir: string;
  tokenizer: CollateTokenizer;
  quant: ModelQuant;
  config: TrainConfig;
  data: TrainData;
  /** Checkpoints and the compiled training graph go here. */
  jobDir: string;
  threads: number;
  /** Written into adapter_config.json. */
  baseModelNameOrPath: string | null;
  /** The serving graph whose quantized weights the training graph refers to (graph-file.ts); none: quantize here. */
  servedModelPath?: string;
  /**
   * Where the training graph is written [jobDir/graph]. Next to the served graph's file when there is one: the
   * graph hard-links that file, which only works on the same file system. Removed once the session has loaded it.
   */
  graphDir?: string;
  onEvent?: (e: TrainEvent) => void;
  signal?: AbortSignal;
}

export type TrainEvent =
  /** The training graph is written: its frozen weights are the served graph's (linked or copied) or were quantized. */
  | { type: 'graph'; base: BaseSource; prepackedForward: boolean; seconds: number }
  | { type: 'progress'; step: number; totalSteps: number; epoch: number; loss: number; learningRate: number; gradNorm: number; tokensPerSecond: number; etaSeconds: number }
  | { type: 'eval'; step: number; evalLoss: number; perplexity: number }
  | { type: 'checkpoint'; step: number; dir: string };

export interface TrainResult {
  adapter: PeftAdapter;
  steps: number;
  trainLoss: number;
  evalLoss: number | null;
  /** Eval loss before the first step (the base model with B = 0). */
  initialEvalLoss: number | null;
  tokensPerSecond: number;
  metrics: MetricsRecord[];
}

function params(adapter: PeftAdapter): LoraLayerWeights[] {
  return adapter.modules.map((m) => ({ module: m.module, r: m.r, inFeatures: m.inFeatures, outFeatures: m.outFeatures, a: m.a, b: m.b }));
}

async function evalLoss(rt: TrainRuntime, ds: PackedDataset, adapter: PeftAdapter): Promise<number | null> {
  let sum = 0;
  let targets = 0;
  for (const mb of ds.evalBatches()) {
    if (mb.numTargets === 0) continue;
    sum += (await rt.loss(mb, params(adapter))) * mb.numTargets;
    targets += mb.numTargets;
  }
  return targets ? sum / targets : null;
}

export async function runTraining(o: TrainRunOptions): Promise<TrainResult> {
  const { config, spec } = o;
  const ds = buildDataset(o.data, o.tokenizer, config);
  const plan = planSteps(ds.microBatchesPerEpoch, config);
  const warmup = warmupStepsFor(config.warmupSteps, config.warmupRatio, plan.totalSteps);
  mkdirSync(o.jobDir, { recursive: true });

  let adapter = initLora(spec, config.lora, config.seed, { baseModelNameOrPath: o.baseModelNameOrPath });
  let startStep = 0;
  let metrics: MetricsRecord[] = [];
  const resumeFrom = latestCheckpoint(o.jobDir);
  const resumed = resumeFrom ? readCheckpoint(resumeFrom, spec) : null;
  if (resumed) {
    adapter = resumed.adapter;
    startStep = resumed.step;
    metrics = resumed.metrics;
  }
  const optimizer = new AdamW(loraParams(adapter), { lr: config.learningRate, betas: config.betas, eps: config.eps, weightDecay: config.weightDecay });
  if (resumed) optimizer.loadState(resumed.optimizer);

  const graphStart = performance.now();
  const graphJob = (dir: string) => writeTrainingGraphFile({
    modelDir: o.modelDir,
    dir,
    ...(o.servedModelPath ? { servedModelPath: o.servedModelPath } : {}),
    options: {
      quant: o.quant,
      modules: adapter.modules.map((m) => ({ module: m.module, inFeatures: m.inFeatures, outFeatures: m.outFeatures })),
      r: adapter.r,
      scaling: adapter.scaling,
      dropout: config.lora.loraDropout,
      seed: config.seed,
      // Job records written before the setting existed lack it: on.
      checkpointing: config.gradientCheckpointing !== false,
      dequantizedForward: config.prepackedForward !== true,
      maxSeqLength: config.maxSeqLength,
    },
  });
  const jobGraphDir = join(o.jobDir, 'graph');
  let graphDir = o.graphDir ?? jobGraphDir;
  let graph: Awaited<ReturnType<typeof writeTrainingGraphFile>>;
  try {
    graph = await graphJob(graphDir);
  } catch (e) {
    // Whatever the failed build left (a partial copy of the base) goes now.
    rmSync(graphDir, { recursive: true, force: true });
    if (graphDir === jobGraphDir) throw e;
    // The graph root is the server's cache dir: a full disk there is named as such, not as the job root.
    const full = diskFullAs(e, 'cache dir (training graphs)');
    if (full !== e) throw full;
    // A cache the server may read but not write (mounted read-only): the job's own folder, with a copy of the base.
    if (!['EACCES', 'EPERM', 'EROFS'].includes((e as NodeJS.ErrnoException).code ?? '')) throw e;
    graphDir = jobGraphDir;
    graph = await graphJob(graphDir);
  }
  const { modelPath, base } = graph;
  o.onEvent?.({ type: 'graph', base, prepackedForward: config.prepackedForward === true, seconds: (performance.now() - graphStart) / 1000 });
  let rt: TrainRuntime;
  try {
    rt = await TrainRuntime.create(modelPath, o.threads);
  } finally {
    // onnxruntime has read or mapped every initializer; mapped pages outlive the files' names. A run rebuilds it.
    rmSync(graphDir, { recursive: true, force: true });
  }
  try {
    const initialEvalLoss = startStep === 0 ? await evalLoss(rt, ds, adapter) : (metrics.find((m) => m['initialEvalLoss'] !== undefined)?.['initialEvalLoss'] as number | null) ?? null;
    if (startStep === 0 && initialEvalLoss !== null) metrics.push({ step: 0, evalLoss: initialEvalLoss, initialEvalLoss });
    const t0 = performance.now();
    let tokens = 0;
    let lastLoss = NaN;
    let lastEval: number | null = initialEvalLoss;
    const grads = adapter.modules.flatMap((m) => [new Float32Array(m.a.length), new Float32Array(m.b.length)]);
    for (let step = startStep; step < plan.totalSteps; step++) {
      if (o.signal?.aborted) throw new LoraplexError('CANCELLED', 'training cancelled');
      const { epoch, batchIndices } = microBatchesOfStep(step, plan, config.gradientAccumulationSteps);
      const order = ds.epochOrder(epoch);
      const batches: MicroBatch[] = batchIndices.map((i) => ds.microBatch(epoch, i, order)).filter((b) => b.numTargets > 0);
      const totalTargets = batches.reduce((n, b) => n + b.numTargets, 0);
      for (const gbuf of grads) gbuf.fill(0);
      let loss = 0;
      for (const mb of batches) {
        // Each micro-batch's loss is a mean over its targets: weight it by its share of the step's targets.
        const w = mb.numTargets / totalTargets;
        const r = await rt.step(mb, params(adapter));
        loss += r.loss * w;
        r.grads.forEach((gr, i) => {
          const ga = grads[2 * i]!;
          const gb = grads[2 * i + 1]!;
          for (let k = 0; k < ga.length; k++) ga[k]! += gr.a[k]! * w;
          for (let k = 0; k < gb.length; k++) gb[k]! += gr.b[k]! * w;
        });
        tokens += mb.rows * mb.seqLength;
      }
      const gradNorm = clipGradNorm(grads, config.maxGradNorm);
      const lr = lrAt(step, { schedule: config.schedule, baseLr: config.learningRate, warmupSteps: warmup, totalSteps: plan.totalSteps });
      // A non-finite gradient skips the update instead of poisoning the adapter.
      if (Number.isFinite(gradNorm)) optimizer.step(grads, lr);
      lastLoss = loss;
      const seconds = (performance.now() - t0) / 1000;
      const tokensPerSecond = tokens / Math.max(seconds, 1e-9);
      const done = step + 1 - startStep;
      const etaSeconds = (seconds / done) * (plan.totalSteps - step - 1);
      const rec: MetricsRecord = { step: step + 1, loss, learningRate: lr, gradNorm, tokensPerSecond };
      o.onEvent?.({ type: 'progress', step: step + 1, totalSteps: plan.totalSteps, epoch, loss, learningRate: lr, gradNorm, tokensPerSecond, etaSeconds });
      if (config.evalEvery > 0 && (step + 1) % config.evalEvery === 0) {
        lastEval = await evalLoss(rt, ds, adapter);
        if (lastEval !== null) {
          rec['evalLoss'] = lastEval;
          o.onEvent?.({ type: 'eval', step: step + 1, evalLoss: lastEval, perplexity: Math.exp(lastEval) });
        }
      }
      metrics.push(rec);
      if (config.checkpointEvery > 0 && (step + 1) % config.checkpointEvery === 0 && step + 1 < plan.totalSteps) {
        const next = microBatchesOfStep(step + 1, plan, config.gradientAccumulationSteps);
        const dir = writeCheckpoint(o.jobDir, { step: step + 1, epoch: next.epoch, batchIndex: next.batchIndices[0] ?? 0, adapter, optimizer: optimizer.state(), rng: null, config, metrics }, { keep: config.keepCheckpoints });
        o.onEvent?.({ type: 'checkpoint', step: step + 1, dir });
      }
    }
    adapter.config.raw = { ...adapter.config.raw, lora_dropout: config.lora.loraDropout };
    const finalEval = await evalLoss(rt, ds, adapter);
    if (finalEval !== null) lastEval = finalEval;
    const seconds = (performance.now() - t0) / 1000;
    return {
      adapter,
      steps: plan.totalSteps,
      trainLoss: lastLoss,
      evalLoss: lastEval,
      initialEvalLoss,
      tokensPerSecond: tokens / Math.max(seconds, 1e-9),
      metrics,
    };
  } finally {
    await rt.release();
  }
}
