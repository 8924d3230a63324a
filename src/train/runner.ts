import { Worker } from 'node:worker_threads';
import { hostname } from 'node:os';
import { join } from 'node:path';
import type { ModelQuant } from '../models/linear.js';
import type { PeftAdapter } from '../adapters/peft.js';
import type { ErrorCode } from '../errors.js';
import type { TrainConfig } from './config.js';
import type { TrainEvent, TrainResult } from './trainer.js';

/**
 * Runs one job's training somewhere else than the event loop. JobManager only sees this interface; the real
 * one (WorkerRunner) starts src/train/worker.ts in a worker thread per run.
 */

/** A trainer event as it leaves the worker: a checkpoint carries its step, not its server path. */
export type RunEvent = Exclude<TrainEvent, { type: 'checkpoint' }> | { type: 'checkpoint'; step: number };

/** What the worker posts back: the trainer's result without the metrics history. */
export type RunResult = Omit<TrainResult, 'metrics'>;

export type RunOutcome =
  | { type: 'completed'; result: RunResult }
  /** code/message go to the client; detail (INTERNAL only) to the log. */
  | { type: 'failed'; code: ErrorCode; message: string; detail?: string }
  /** Stopped on request (cancel or shutdown), at the next step. */
  | { type: 'stopped' };

export interface RunSpec {
  jobId: string;
  /** Holds data.json; checkpoints and the compiled training graph go here. */
  jobDir: string;
  config: TrainConfig;
}

export interface RunHandlers {
  onEvent(e: RunEvent): void;
  /** The run resumes from the checkpoint of this step. */
  onResume(step: number): void;
}

export interface RunHandle {
  /** Settles once the run has ended and its thread is gone. */
  readonly done: Promise<RunOutcome>;
  /** Asks the run to stop at its next step (never kills the thread mid-step). */
  stop(): void;
}

export interface TrainRunner {
  start(spec: RunSpec, handlers: RunHandlers): RunHandle;
}

// --- the worker protocol ------------------------------------------------------------------------------

export interface WorkerInput {
  modelDir: string;
  servedModelPath?: string;
  graphDir?: string;
  quant: ModelQuant;
  config: TrainConfig;
  jobDir: string;
  threads: number;
  baseModelNameOrPath: string | null;
}

/** Stop at the next step (a cancel and a shutdown look the same to the worker). */
export type WorkerRequest = { type: 'stop' };

export type WorkerReply =
  | { type: 'resuming'; step: number }
  | { type: 'event'; event: RunEvent }
  | { type: 'done'; result: RunResult }
  | { type: 'error'; code: ErrorCode; message: string; detail?: string }
  | { type: 'stopped' };

export interface WorkerRunnerOptions {
  modelDir: string;
  /** The serving graph (compile.ts's cache entry) whose quantized weights jobs train on instead of their own. */
  servedModelPath?: string;
  /**
   * Where runs write their training graphs (one folder per run, gone once its session has loaded): on the served
   * graph's file system, so that its data file can be hard-linked rather than copied. Default: the job's folder.
   */
  graphRoot?: string;
  /** The served quantization; training computes the 4-bit matmuls in float32 (accuracy level 0). */
  quant: ModelQuant;
  /** onnxruntime intra-op threads of the training session. */
  threads: number;
  /** adapter_config.json's base_model_name_or_path. */
  baseModelNameOrPath: string | null;
}

/** Training computes in float32 activations: accuracy level 0 keeps the 4-bit matmuls exact to the dequantized weights. */
export function trainingQuant(q: ModelQuant): ModelQuant {
  return q.kind === 'int4' || q.kind === 'int8' ? { ...q, accuracyLevel: 0 } : { ...q };
}

export class WorkerRunner implements TrainRunner {
  constructor(private readonly opts: WorkerRunnerOptions) {}

  start(spec: RunSpec, handlers: RunHandlers): RunHandle {
    const input: WorkerInput = {
      modelDir: this.opts.modelDir,
      ...(this.opts.servedModelPath ? { servedModelPath: this.opts.servedModelPath } : {}),
      // The job id and this process: replicas sharing one cache never write the same folder.
      ...(this.opts.graphRoot ? { graphDir: join(this.opts.graphRoot, `${spec.jobId}-${hostname().replace(/[^A-Za-z0-9.-]/g, '_')}-${process.pid}`) } : {}),
      quant: trainingQuant(this.opts.quant),
      config: spec.config,
      jobDir: spec.jobDir,
      threads: this.opts.threads,
      baseModelNameOrPath: this.opts.baseModelNameOrPath,
    };
    const worker = new Worker(new URL('./worker.js', import.meta.url), { workerData: input });
    let outcome: RunOutcome | null = null;
    let stopping = false;
    let resolveDone!: (o: RunOutcome) => void;
    const done = new Promise<RunOutcome>((resolve) => (resolveDone = resolve));
    // The first outcome wins; the thread is always gone before `done` settles.
    const finish = (o: RunOutcome) => {
      if (outcome) return;
      outcome = o;
      void worker.terminate().finally(() => resolveDone(o));
    };
    worker.on('message', (m: WorkerReply) => {
      if (outcome) return;
      switch (m.type) {
        case 'resuming':
          handlers.onResume(m.step);
          break;
        case 'event':
          handlers.onEvent(m.event);
          break;
        case 'done':
          finish({ type: 'completed', result: m.result });
          break;
        case 'error':
          finish({ type: 'failed', code: m.code, message: m.message, ...(m.detail !== undefined ? { detail: m.detail } : {}) });
          break;
        case 'stopped':
          finish({ type: 'stopped' });
          break;
      }
    });
    worker.on('error', (err) => finish({ type: 'failed', code: 'INTERNAL', message: 'internal error', detail: err.stack ?? err.message }));
    worker.on('exit', (code) => finish(stopping ? { type: 'stopped' } : { type: 'failed', code: 'INTERNAL', message: 'internal error', detail: `training worker exited with code ${code}` }));
    return {
      done,
      stop: () => {
        if (stopping || outcome) return;
        stopping = true;
        // No kill timer: terminating the thread while onnxruntime runs a step (or builds the session) aborts
        // the whole process (a native Napi::Error). The run stops at its next step, however long that takes;
        // a shutdown that cannot wait is the orchestrator's SIGKILL, and the job resumes from its checkpoint.
        worker.postMessage({ type: 'stop' } satisfies WorkerRequest);
      },
    };
  }
}
