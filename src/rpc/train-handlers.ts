import { rmSync } from 'node:fs';
import { timestampFromMs } from '@bufbuild/protobuf/wkt';
import type { MessageInitShape } from '@bufbuild/protobuf';
import type { AdapterKey } from '../adapter-key.js';
import { scopeAdapterId } from '../adapters/tenancy.js';
import { LoraplexError, invalidArgument } from '../errors.js';
import {
  TextSplit,
  TrainJobState,
  type TrainEventSchema,
  type TrainExample,
  type TrainJobSchema,
  type TrainMetricsSchema,
  type TrainRequest,
  type TrainService,
} from '../gen/loraplex/v1/train_pb.js';
import { annotate } from './request-log.js';
import { validateTrainConfig, type TrainConfigInput } from '../train/config.js';
import { type DataSourceInput, type ExampleInput, type TextSplit as DomainTextSplit } from '../train/data.js';
import type { JobEvent, JobInfo, JobMetrics, JobState } from '../train/jobs.js';
import type { ServiceImpl } from './bridge.js';
import type { AppState } from './handlers.js';
import type { App } from './app.js';
import { STATUS_BY_CODE } from './status.js';

/** TrainService: validation in, job events out. The jobs themselves live in src/train/jobs.ts. */

/** proto3 optional numbers arrive undefined when unset: undefined takes the default. */
export function trainConfigInput(req: TrainRequest): TrainConfigInput {
  return {
    r: req.r,
    loraAlpha: req.loraAlpha,
    loraDropout: req.loraDropout,
    targetModules: [...req.targetModules],
    useRslora: req.useRslora,
    learningRate: req.learningRate,
    adamBeta1: req.adamBeta1,
    adamBeta2: req.adamBeta2,
    adamEpsilon: req.adamEpsilon,
    weightDecay: req.weightDecay,
    lrSchedulerType: req.lrSchedulerType,
    warmupSteps: req.warmupSteps,
    warmupRatio: req.warmupRatio,
    maxGradNorm: req.maxGradNorm,
    microBatchSize: req.microBatchSize,
    gradientAccumulationSteps: req.gradientAccumulationSteps,
    numEpochs: req.numEpochs,
    maxSteps: req.maxSteps,
    maxSeqLength: req.maxSeqLength,
    seed: req.seed,
    evalFraction: req.evalFraction,
    evalEvery: req.evalEvery,
    checkpointEvery: req.checkpointEvery,
    keepCheckpoints: req.keepCheckpoints,
    gradientCheckpointing: req.gradientCheckpointing,
    prepackedForward: req.prepackedForward,
  };
}

function exampleInput(e: TrainExample): ExampleInput {
  switch (e.example.case) {
    case 'text':
      return { text: e.example.value };
    case 'completion':
      return { prompt: e.example.value.prompt, completion: e.example.value.completion };
    case 'chat':
      return { messages: e.example.value.messages.map((m) => ({ role: m.role, content: m.content })) };
    default:
      return {}; // parseExample names the example and what it must have
  }
}

const TEXT_SPLITS: Record<TextSplit, DomainTextSplit | ''> = {
  [TextSplit.UNSPECIFIED]: '',
  [TextSplit.PARAGRAPH]: 'paragraph',
  [TextSplit.DOCUMENT]: 'document',
  [TextSplit.LINE]: 'line',
  [TextSplit.STREAM]: 'stream',
};

export function dataSourceInput(req: TrainRequest): DataSourceInput {
  const split = TEXT_SPLITS[req.textSplit];
  if (split === undefined) throw invalidArgument(`text_split ${req.textSplit}: not a TextSplit value`);
  return {
    examples: req.examples.map(exampleInput),
    path: req.path,
    evalExamples: req.evalExamples.map(exampleInput),
    evalPath: req.evalPath,
    textSplit: split,
  };
}

const STATES: Record<JobState, TrainJobState> = {
  queued: TrainJobState.QUEUED,
  running: TrainJobState.RUNNING,
  succeeded: TrainJobState.SUCCEEDED,
  failed: TrainJobState.FAILED,
  cancelled: TrainJobState.CANCELLED,
};

const statusCode = (code: LoraplexError['code']): number => STATUS_BY_CODE[code];

function metrics(m: JobMetrics): MessageInitShape<typeof TrainMetricsSchema> {
  return {
    trainLoss: m.trainLoss,
    ...(m.evalLoss !== null ? { evalLoss: m.evalLoss } : {}),
    ...(m.initialEvalLoss !== null ? { initialEvalLoss: m.initialEvalLoss } : {}),
    steps: m.steps,
    tokensPerSecond: m.tokensPerSecond,
    seconds: m.seconds,
  };
}

export function trainJob(j: JobInfo): MessageInitShape<typeof TrainJobSchema> {
  return {
    jobId: j.jobId,
    adapterId: j.adapterId,
    state: STATES[j.state],
    createTime: timestampFromMs(j.createdAt),
    ...(j.startedAt !== null ? { startTime: timestampFromMs(j.startedAt) } : {}),
    ...(j.endedAt !== null ? { endTime: timestampFromMs(j.endedAt) } : {}),
    step: j.step,
    totalSteps: j.totalSteps,
    ...(j.progress ? { progress: j.progress } : {}),
    ...(j.eval ? { eval: j.eval } : {}),
    checkpointStep: j.checkpointStep,
    ...(j.metrics ? { metrics: metrics(j.metrics) } : {}),
    ...(j.error ? { error: { code: statusCode(j.error.code), message: j.error.message } } : {}),
    queuePosition: j.queuePosition,
    resumes: j.resumes,
    retryable: j.retryable === true,
  };
}

export function trainEvent(e: JobEvent): MessageInitShape<typeof TrainEventSchema> {
  switch (e.type) {
    case 'accepted':
      return { event: { case: 'accepted', value: { jobId: e.job.jobId, job: trainJob(e.job) } } };
    case 'progress': {
      const { type: _type, ...value } = e;
      return { event: { case: 'progress', value } };
    }
    case 'eval':
      return { event: { case: 'eval', value: { step: e.step, evalLoss: e.evalLoss, perplexity: e.perplexity } } };
    case 'checkpoint':
      return { event: { case: 'checkpoint', value: { step: e.step } } };
    case 'completed':
      return { event: { case: 'completed', value: { adapterId: e.adapterId, metrics: metrics(e.metrics) } } };
    case 'failed':
      return { event: { case: 'failed', value: { code: statusCode(e.code), message: e.message } } };
    case 'cancelled':
      return { event: { case: 'cancelled', value: { step: e.step } } };
  }
}

/** True when the caller's namespace holds the adapter (stored or in memory). */
async function adapterExists(app: App, adapterKey: AdapterKey): Promise<boolean> {
  try {
    await app.adapters.info(adapterKey);
    return true;
  } catch (err) {
    if (err instanceof LoraplexError && err.code === 'NOT_FOUND') return false;
    throw err;
  }
}

export function trainHandlers(state: AppState): ServiceImpl<(typeof TrainService)['method']> {
  return {
    async *train(req, ctx) {
      const app = state.ready();
      annotate(ctx, { adapterId: req.adapterId });
      const adapterKey = scopeAdapterId(ctx.principal, req.adapterId);
      const config = validateTrainConfig(trainConfigInput(req), { spec: app.compiled.spec, maxLoraRank: app.cfg.maxLoraRank, maxModelLen: app.maxModelLen });
      // Reading, parsing and serializing a data file of many MB is pool work.
      const data = await app.pool.run('loadTrainData', { source: dataSourceInput(req), limits: { dataRoot: app.cfg.dataRoot }, jobRoot: app.cfg.jobRoot });
      let job;
      try {
        if (config.evalFraction > 0 && data.evalExamples !== null) throw invalidArgument(`eval_fraction ${config.evalFraction}: set eval_fraction or a separate eval set, not both`);
        if (await adapterExists(app, adapterKey)) throw new LoraplexError('ALREADY_EXISTS', `adapter_id ${JSON.stringify(req.adapterId)} already exists`);
        job = app.jobs.submit({
          adapterKey,
          config,
          data: { stagedFile: data.stagedFile },
          dataSummary: { trainExamples: data.trainExamples, evalExamples: data.evalExamples, path: req.path || null, evalPath: req.evalPath || null },
        });
      } catch (err) {
        rmSync(data.stagedFile, { force: true });
        throw err;
      }
      annotate(ctx, { jobId: job.jobId });
      // The job is the server's now: leaving this stream (client gone) only unsubscribes.
      for await (const e of app.jobs.watch(ctx.principal.tenant, job.jobId, ctx.signal)) yield { event: trainEvent(e) };
    },

    getTrainJob(req, ctx) {
      const app = state.ready();
      annotate(ctx, { jobId: req.jobId });
      return { job: trainJob(app.jobs.get(ctx.principal.tenant, req.jobId)) };
    },

    async *watchTrainJob(req, ctx) {
      const app = state.ready();
      annotate(ctx, { jobId: req.jobId });
      for await (const e of app.jobs.watch(ctx.principal.tenant, req.jobId, ctx.signal)) yield { event: trainEvent(e) };
    },

    listTrainJobs(_req, ctx) {
      const app = state.ready();
      return { jobs: app.jobs.list(ctx.principal.tenant).map(trainJob) };
    },

    async cancelTrainJob(req, ctx) {
      const app = state.ready();
      annotate(ctx, { jobId: req.jobId });
      return { job: trainJob(await app.jobs.cancel(ctx.principal.tenant, req.jobId)) };
    },
    retryTrainJob(req, ctx) {
      const app = state.ready();
      annotate(ctx, { jobId: req.jobId });
      return { job: trainJob(app.jobs.retry(ctx.principal.tenant, req.jobId)) };
    },
  };
}
