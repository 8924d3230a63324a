import { Worker } from 'node:worker_threads';
import { LoraplexError, type ErrorCode } from '../errors.js';

/**
 * A small pool of worker threads that run named tasks (a registry the worker script exports), so that heavy
 * CPU or disk work (tokenizing, reading and validating adapters, merges, exports, training data) never blocks
 * the event loop that streams everyone's tokens. Work beyond `size` waits in a FIFO queue. Idle workers are
 * unref'd and close() terminates them, so the pool never keeps the process alive.
 *
 * Leaf module: knows neither the tasks nor the layers above (the worker script brings the registry).
 */

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export type TaskFn = (input: any) => unknown;
export type TaskRegistry = Record<string, TaskFn>;

/**
 * Inputs and results are cloned; large tensors cross without a copy by living in SharedArrayBuffers (the adapter
 * tasks return them so), which postMessage shares.
 */
export type TaskResult<F extends TaskFn> = Awaited<ReturnType<F>>;

/** Messages between the pool and a task worker. */
export interface TaskRequest {
  id: number;
  task: string;
  input: unknown;
}
export type TaskReply =
  | { id: number; ok: true; result: unknown }
  | { id: number; ok: false; error: { message: string; code: ErrorCode | null; stack?: string } };

/** What a worker sends for a thrown error: a LoraplexError keeps its code and message, anything else is INTERNAL. */
export function replyError(id: number, err: unknown): TaskReply {
  const e = err instanceof Error ? err : new Error(String(err));
  return { id, ok: false, error: { message: e.message, code: err instanceof LoraplexError ? err.code : null, ...(e.stack ? { stack: e.stack } : {}) } };
}

function errorFromReply(task: string, error: Extract<TaskReply, { ok: false }>['error']): Error {
  if (error.code) return new LoraplexError(error.code, error.message);
  const err = new Error(`worker task ${task} failed: ${error.message}`);
  if (error.stack) err.stack = error.stack;
  return err;
}

interface Job {
  id: number;
  task: string;
  input: unknown;
  resolve(v: unknown): void;
  reject(e: Error): void;
}

interface Slot {
  worker: Worker;
  job: Job | null;
}

export interface WorkerPoolOptions {
  /** Threads at most; keep it small beside the engine worker's onnxruntime threads. */
  size: number;
  /** Handed to every worker (its context, e.g. where the model lives). */
  workerData?: unknown;
}

export class WorkerPool<Tasks extends TaskRegistry> {
  private readonly slots: Slot[] = [];
  private readonly queue: Job[] = [];
  private nextId = 1;
  private closed = false;

  constructor(
    private readonly script: URL,
    private readonly opts: WorkerPoolOptions,
  ) {
    if (!Number.isSafeInteger(opts.size) || opts.size < 1) throw new RangeError(`pool size must be a positive integer, got ${opts.size}`);
  }

  /** Runs a task on a free worker (after the queued ones). */
  run<K extends keyof Tasks & string>(task: K, input: Parameters<Tasks[K]>[0]): Promise<TaskResult<Tasks[K]>> {
    if (this.closed) return Promise.reject(new LoraplexError('UNAVAILABLE', 'server is shutting down'));
    return new Promise((resolve, reject) => {
      this.queue.push({ id: this.nextId++, task, input, resolve: resolve as (v: unknown) => void, reject });
      this.dispatch();
    });
  }

  stats(): { threads: number; busy: number; queued: number } {
    return { threads: this.slots.length, busy: this.slots.filter((s) => s.job).length, queued: this.queue.length };
  }

  /** Rejects queued and running tasks (UNAVAILABLE) and terminates the workers. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const gone = new LoraplexError('UNAVAILABLE', 'server is shutting down');
    for (const job of this.queue.splice(0)) job.reject(gone);
    const slots = this.slots.splice(0);
    for (const s of slots) s.job?.reject(gone);
    // Node 20 does not always count a worker being stopped as a live handle (measured: stopping a ref'd worker whose
    // short task was ending let the loop empty before its exit event), so an awaited close() could be left pending
    // by an empty event loop. A timer keeps the loop until every exit has settled terminate().
    const keepAlive = setInterval(() => {}, 1 << 30);
    try {
      await Promise.all(slots.map((s) => s.worker.terminate()));
    } finally {
      clearInterval(keepAlive);
    }
  }

  private dispatch(): void {
    while (this.queue.length) {
      const slot = this.slots.find((s) => !s.job) ?? (this.slots.length < this.opts.size ? this.spawn() : null);
      if (!slot) return;
      const job = this.queue.shift()!;
      slot.job = job;
      slot.worker.ref();
      const msg: TaskRequest = { id: job.id, task: job.task, input: job.input };
      try {
        slot.worker.postMessage(msg);
      } catch (err) {
        // e.g. an input that cannot be cloned: that task fails, the worker is fine.
        slot.job = null;
        slot.worker.unref();
        job.reject(err instanceof Error ? err : new Error(String(err)));
      }
    }
  }

  private spawn(): Slot {
    const worker = new Worker(this.script, { workerData: this.opts.workerData });
    const slot: Slot = { worker, job: null };
    worker.unref();
    worker.on('message', (reply: TaskReply) => {
      const job = slot.job;
      if (!job || job.id !== reply.id) return;
      slot.job = null;
      worker.unref();
      if (reply.ok) job.resolve(reply.result);
      else job.reject(errorFromReply(job.task, reply.error));
      this.dispatch();
    });
    const lost = (err: Error) => {
      // A crashed worker fails only its own task; the next task gets a fresh worker.
      const i = this.slots.indexOf(slot);
      if (i < 0) return;
      this.slots.splice(i, 1);
      slot.job?.reject(err);
      slot.job = null;
      if (!this.closed) this.dispatch();
    };
    worker.on('error', (err) => lost(err));
    worker.on('exit', (code) => lost(new Error(`task worker exited with code ${code}`)));
    this.slots.push(slot);
    return slot;
  }
}
