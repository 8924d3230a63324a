import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { parseJsonCapped } from '../files/json.js';
import { readUnderRoot } from '../files/under-root.js';
import type { Logger } from '../obs/logger.js';
import type { PeftAdapter } from '../adapters/peft.js';
import type { AdapterKey } from '../adapter-key.js';
import { displayId, storedAdapterKey, tenantOf } from '../adapters/tenancy.js';
import { LoraplexError, diskFullAs, failedPrecondition, invalidArgument, notFound, resourceExhausted, type ErrorCode } from '../errors.js';
import { fsyncDir } from '../files/fsync.js';
import { writeFileAtomic } from '../models/safetensors.js';
import { AsyncQueue } from '../util/async-queue.js';
import { isCheckpointDir, listCheckpoints } from './checkpoint.js';
import type { TrainConfig } from './config.js';
import type { TrainData } from './data.js';
import type { RunEvent, RunHandle, RunOutcome, TrainRunner } from './runner.js';

/**
 * Training jobs: a queue in front of one running job, persisted so that a restart resumes them.
 *
 *   <jobRoot>/<jobId>/job.json     the record (tenant, adapter id, config, state, timestamps, latest figures)
 *   <jobRoot>/<jobId>/data.json    the validated examples (a copy: the data file may change meanwhile)
 *   <jobRoot>/<jobId>/checkpoint-N the trainer's checkpoints
 *
 * A run's training graph is written under the runner's graph root (<cacheDir>/train-graphs in a server, beside the
 * served graph whose data file it hard-links) and removed as soon as its session has loaded it.
 *
 * Only job.json is kept once a job has ended. Events fan out to any number of watchers; a watcher that
 * goes away changes nothing for the job. Jobs are tenant-scoped: another tenant's job is NOT_FOUND with the
 * message of a missing one.
 */

export const JOB_STATES = ['queued', 'running', 'succeeded', 'failed', 'cancelled'] as const;
export type JobState = (typeof JOB_STATES)[number];
const TERMINAL: ReadonlySet<JobState> = new Set(['succeeded', 'failed', 'cancelled']);
export const isTerminal = (s: JobState): boolean => TERMINAL.has(s);

export interface ProgressFigures {
  step: number;
  totalSteps: number;
  epoch: number;
  loss: number;
  learningRate: number;
  gradNorm: number;
  tokensPerSecond: number;
  etaSeconds: number;
}

export interface EvalFigures {
  step: number;
  evalLoss: number;
  perplexity: number;
}

export interface JobMetrics {
  trainLoss: number;
  evalLoss: number | null;
  initialEvalLoss: number | null;
  steps: number;
  tokensPerSecond: number;
  /** Wall time of the job's runs, queueing excluded. */
  seconds: number;
}

export interface JobError {
  code: ErrorCode;
  message: string;
}

/** Where the examples came from (for people reading job.json). */
export interface DataSummary {
  trainExamples: number;
  evalExamples: number | null;
  path: string | null;
  evalPath: string | null;
}

export const JOB_FORMAT = 1;

export interface JobRecord {
  format: typeof JOB_FORMAT;
  jobId: string;
  /** '' = no tenant (auth disabled). */
  tenant: string;
  /** The client's id, in the tenant's namespace. */
  adapterId: string;
  state: JobState;
  /** Unix ms. */
  createdAt: number;
  startedAt: number | null;
  endedAt: number | null;
  config: TrainConfig;
  data: DataSummary;
  step: number;
  totalSteps: number;
  progress: ProgressFigures | null;
  eval: EvalFigures | null;
  /** 0: no checkpoint yet. */
  checkpointStep: number;
  metrics: JobMetrics | null;
  error: JobError | null;
  /** Times a restart resumed it. */
  resumes: number;
  /** Seconds of the runs that have ended. */
  runSeconds: number;
  /**
   * Set when training finished but writing the adapter failed (disk full, id taken meanwhile): the job's data
   * and checkpoints are kept, so RetryTrainJob can resume it from its latest checkpoint. Absent in older records.
   */
  retryable?: boolean;
}

export interface JobInfo extends JobRecord {
  /** Jobs ahead of it in the queue (0 unless queued). */
  queuePosition: number;
}

export type JobEvent =
  | { type: 'accepted'; job: JobInfo }
  | ({ type: 'progress' } & ProgressFigures)
  | ({ type: 'eval' } & EvalFigures)
  | { type: 'checkpoint'; step: number }
  | { type: 'completed'; adapterId: string; metrics: JobMetrics }
  | { type: 'failed'; code: ErrorCode; message: string }
  | { type: 'cancelled'; step: number };

/** The key of a job's adapter; job.json is on disk (it may have been edited), so its parts are validated. */
const recordAdapterKey = (rec: JobRecord): AdapterKey => storedAdapterKey(rec.tenant, rec.adapterId);

export const isFinalEvent = (e: JobEvent): boolean => e.type === 'completed' || e.type === 'failed' || e.type === 'cancelled';

export interface JobManagerOptions {
  jobRoot: string;
  runner: TrainRunner;
  /** Writes the trained adapter under its key (AdapterManager.create): ALREADY_EXISTS if the id was taken meanwhile. */
  writeAdapter(adapterKey: AdapterKey, adapter: PeftAdapter): Promise<unknown>;
  /** Jobs waiting behind the running one before submit says RESOURCE_EXHAUSTED. */
  maxQueued: number;
  log: Logger;
  /** Told about every optimizer step (metrics). */
  onStep?(loss: number, tokensPerSecond: number): void;
  /** Told when a run ends (whatever the outcome). */
  onRunEnd?(): void;
  /** Unix ms. Default Date.now. */
  now?: () => number;
  /** How often progress alone rewrites job.json. Default 2000 ms. */
  persistEveryMs?: number;
}

export interface SubmitInput {
  /** The adapter to train, in its tenant's namespace (the job belongs to that tenant). */
  adapterKey: AdapterKey;
  config: TrainConfig;
  /**
   * The examples, or a data.json already written off the event loop into the job root (`stageTrainData`):
   * submit only renames it into the job's directory.
   */
  data: TrainData | { stagedFile: string };
  dataSummary: DataSummary;
}

/**
 * Writes a Train request's data as a future data.json into the job root (worker pool: it may be tens of MB), so
 * that submit only has to rename it. RESOURCE_EXHAUSTED when the job root is full.
 */
export function stageTrainData(jobRoot: string, data: TrainData): string {
  mkdirSync(jobRoot, { recursive: true });
  const file = join(jobRoot, `${STAGED_DATA_PREFIX}${randomBytes(8).toString('hex')}.json`);
  try {
    writeFileAtomic(file, JSON.stringify(data));
  } catch (err) {
    rmSync(file, { force: true });
    throw diskFullAs(err, 'job root');
  }
  return file;
}

/** Random and url-safe; the prefix keeps a directory name from starting with '-'. */
export function newJobId(): string {
  return `tj-${randomBytes(12).toString('base64url')}`;
}
const JOB_ID_RE = /^[A-Za-z0-9_-]{1,64}$/;
const JOB_FILE = 'job.json';
/** Train data written ahead of its job (`stageTrainData`), in the job root; never a job id (JOB_ID_RE). */
const STAGED_DATA_PREFIX = '.staged-data-';
/** A record is a few KB; anything far larger is not one of ours. */
const MAX_JOB_FILE_BYTES = 16 * 1024 * 1024;
const DATA_FILE = 'data.json';
/** A watcher that does not read keeps at most this many events (older progress is dropped first). */
const MAX_PENDING_EVENTS = 256;

/** One watcher's events, waiting to be read; a watcher that does not read loses old progress first. */
const watcherQueue = () => new AsyncQueue<JobEvent>({ maxPending: MAX_PENDING_EVENTS, droppable: (e) => e.type === 'progress' });

interface Job {
  rec: JobRecord;
  watchers: Set<AsyncQueue<JobEvent>>;
  ended: Promise<void>;
  markEnded: () => void;
  cancelRequested: boolean;
  persistedAt: number;
}

export class JobManager {
  private readonly jobs = new Map<string, Job>();
  private readonly queue: Job[] = [];
  private running: { job: Job; handle: RunHandle } | null = null;
  /** Settles when the running job's run has been dealt with. */
  private runDone: Promise<void> = Promise.resolve();
  private closed = false;
  private readonly now: () => number;

  constructor(private readonly opts: JobManagerOptions) {
    this.now = opts.now ?? Date.now;
  }

  /** Loads the records in jobRoot; jobs found running or queued are queued again (running ones first) and resume from their latest checkpoint. */
  recover(): void {
    const root = this.opts.jobRoot;
    if (!existsSync(root)) return;
    const resume: { job: Job; wasRunning: boolean }[] = [];
    for (const name of readdirSync(root)) {
      // Data staged for a Train request that a crash interrupted before submit: nobody will claim it.
      if (name.startsWith(STAGED_DATA_PREFIX)) rmSync(join(root, name), { force: true });
      if (!JOB_ID_RE.test(name)) continue;
      const file = join(root, name, JOB_FILE);
      if (!existsSync(file)) continue;
      let rec: JobRecord;
      try {
        rec = parseJsonCapped(readUnderRoot(root, join(name, JOB_FILE), MAX_JOB_FILE_BYTES), { maxBytes: MAX_JOB_FILE_BYTES, maxDepth: 32, what: JOB_FILE }) as JobRecord;
        if (rec.format !== JOB_FORMAT || rec.jobId !== name || !JOB_STATES.includes(rec.state)) throw new Error(`not a format-${JOB_FORMAT} job record`);
      } catch (err) {
        this.opts.log.warn({ jobId: name, err }, 'training job record unreadable; skipped');
        continue;
      }
      const job = this.track(rec);
      if (isTerminal(rec.state)) {
        job.markEnded();
        this.cleanup(job);
      } else resume.push({ job, wasRunning: rec.state === 'running' });
    }
    resume.sort((a, b) => Number(b.wasRunning) - Number(a.wasRunning) || a.job.rec.createdAt - b.job.rec.createdAt);
    for (const { job, wasRunning } of resume) {
      const { rec } = job;
      if (!existsSync(join(this.jobDir(rec.jobId), DATA_FILE))) {
        this.opts.log.error({ jobId: rec.jobId }, 'training job data.json is missing; the job cannot resume');
        this.end(job, 'failed', { error: { code: 'INTERNAL', message: 'internal error' } });
        continue;
      }
      if (wasRunning) rec.resumes++;
      rec.state = 'queued';
      // Steps after the latest checkpoint are lost and will be done again: the job is back at that step.
      const checkpoint = listCheckpoints(this.jobDir(rec.jobId)).at(-1)?.step ?? 0;
      rec.checkpointStep = checkpoint;
      rec.step = checkpoint;
      if (rec.progress && rec.progress.step > checkpoint) rec.progress = null;
      if (rec.eval && rec.eval.step > checkpoint) rec.eval = null;
      this.opts.log.info({ jobId: rec.jobId, adapterId: rec.adapterId, tenant: rec.tenant || undefined, wasRunning, checkpointStep: checkpoint }, 'resuming training job');
      this.persist(job, true);
      this.queue.push(job);
    }
    this.pump();
  }

  /** Queues a job (it starts at once when none is running). ALREADY_EXISTS when a live job already trains that adapter. */
  submit(input: SubmitInput): JobInfo {
    if (this.closed) throw new LoraplexError('UNAVAILABLE', 'server is shutting down; retry on another replica');
    const key = input.adapterKey;
    for (const j of this.jobs.values()) {
      if (!isTerminal(j.rec.state) && recordAdapterKey(j.rec) === key) {
        throw new LoraplexError('ALREADY_EXISTS', `adapter_id ${JSON.stringify(displayId(key))}: training job ${j.rec.jobId} is already training it`);
      }
    }
    if (this.running && this.queue.length >= this.opts.maxQueued) {
      throw resourceExhausted(`the training queue is full (${this.queue.length} job${this.queue.length === 1 ? '' : 's'} waiting, maxQueuedTrainJobs ${this.opts.maxQueued}); retry later`);
    }
    const jobId = newJobId();
    const rec: JobRecord = {
      format: JOB_FORMAT,
      jobId,
      tenant: tenantOf(key),
      adapterId: displayId(key),
      state: 'queued',
      createdAt: this.now(),
      startedAt: null,
      endedAt: null,
      config: input.config,
      data: input.dataSummary,
      step: 0,
      totalSteps: 0,
      progress: null,
      eval: null,
      checkpointStep: 0,
      metrics: null,
      error: null,
      resumes: 0,
      runSeconds: 0,
    };
    const dir = this.jobDir(jobId);
    mkdirSync(dir, { recursive: true });
    if ('stagedFile' in input.data) {
      renameSync(input.data.stagedFile, join(dir, DATA_FILE));
      fsyncDir(dir);
    } else writeFileAtomic(join(dir, DATA_FILE), JSON.stringify(input.data));
    const job = this.track(rec);
    this.persist(job, true);
    this.queue.push(job);
    this.opts.log.info({ jobId, adapterId: rec.adapterId, tenant: rec.tenant || undefined, queued: this.queue.length - 1 + Number(this.running !== null) }, 'training job queued');
    this.pump();
    return this.info(job);
  }

  /** NOT_FOUND for a missing job and for another tenant's, with the same message. */
  get(tenant: string, jobId: string): JobInfo {
    return this.info(this.find(tenant, jobId));
  }

  /** The tenant's jobs, newest first. */
  list(tenant: string): JobInfo[] {
    return [...this.jobs.values()]
      .filter((j) => j.rec.tenant === tenant)
      .sort((a, b) => b.rec.createdAt - a.rec.createdAt || (a.rec.jobId < b.rec.jobId ? -1 : 1))
      .map((j) => this.info(j));
  }

  /**
   * The job's events from its current state on: `accepted` with the job as it is, the latest progress, eval
   * and checkpoint, then live events until the final one (at once for a job that has ended). Throws
   * NOT_FOUND on the first next(); `signal` ends the wait for the next event.
   */
  async *watch(tenant: string, jobId: string, signal?: AbortSignal): AsyncGenerator<JobEvent> {
    const job = this.find(tenant, jobId);
    // Snapshot and subscription happen together (no await between): nothing is missed or sent twice.
    const replay = this.replay(job);
    if (isTerminal(job.rec.state)) {
      yield* replay;
      return;
    }
    const queue = watcherQueue();
    job.watchers.add(queue);
    try {
      yield* replay;
      for (;;) {
        const r = await queue.next(signal);
        if (r.done) return;
        const e = r.value;
        yield e;
        if (isFinalEvent(e)) return;
      }
    } finally {
      job.watchers.delete(queue);
    }
  }

  /**
   * Stops a job (a queued one at once, a running one at its next step; no adapter is written) and returns it
   * once it has stopped. A cancelled job is returned as is; FAILED_PRECONDITION for one that succeeded or failed.
   */
  async cancel(tenant: string, jobId: string): Promise<JobInfo> {
    const job = this.find(tenant, jobId);
    const { rec } = job;
    if (rec.state === 'succeeded' || rec.state === 'failed') throw failedPrecondition(`job_id ${JSON.stringify(jobId)} has already ${rec.state}; nothing to cancel`);
    if (rec.state === 'queued') {
      this.queue.splice(this.queue.indexOf(job), 1);
      this.end(job, 'cancelled', {});
    } else if (rec.state === 'running') {
      if (this.closed) throw new LoraplexError('UNAVAILABLE', 'server is shutting down; retry on another replica');
      job.cancelRequested = true;
      if (this.running?.job === job) this.running.handle.stop();
      await job.ended;
    }
    return this.info(job);
  }

  /**
   * Queues a job again whose training finished but whose adapter could not be written; it resumes from its
   * latest checkpoint. FAILED_PRECONDITION for any other job (nothing was kept to resume from).
   */
  retry(tenant: string, jobId: string): JobInfo {
    const job = this.find(tenant, jobId);
    const { rec } = job;
    if (this.closed) throw new LoraplexError('UNAVAILABLE', 'server is shutting down; retry on another replica');
    if (rec.state !== 'failed' || rec.retryable !== true) {
      throw failedPrecondition(`job_id ${JSON.stringify(jobId)} is ${rec.state}; only a job that failed writing its adapter can be retried (submit a new Train)`);
    }
    const key = recordAdapterKey(rec);
    const rival = [...this.jobs.values()].find((j) => j !== job && !isTerminal(j.rec.state) && recordAdapterKey(j.rec) === key);
    if (rival) throw new LoraplexError('ALREADY_EXISTS', `adapter_id ${JSON.stringify(rec.adapterId)}: training job ${rival.rec.jobId} is already training it`);
    let markEnded!: () => void;
    job.ended = new Promise<void>((resolve) => (markEnded = resolve));
    job.markEnded = markEnded;
    job.cancelRequested = false;
    const checkpoint = listCheckpoints(this.jobDir(rec.jobId)).at(-1)?.step ?? 0;
    Object.assign(rec, { state: 'queued', endedAt: null, error: null, retryable: false, checkpointStep: checkpoint, step: checkpoint, metrics: null });
    if (rec.progress && rec.progress.step > checkpoint) rec.progress = null;
    if (rec.eval && rec.eval.step > checkpoint) rec.eval = null;
    this.persist(job, true);
    this.queue.push(job);
    this.opts.log.info({ jobId, adapterId: rec.adapterId, tenant: rec.tenant || undefined, checkpointStep: checkpoint }, 'training job retried');
    this.pump();
    return this.info(job);
  }

  /** Jobs by state, for metrics. */
  counts(): Record<JobState, number> {
    const out = Object.fromEntries(JOB_STATES.map((s) => [s, 0])) as Record<JobState, number>;
    for (const j of this.jobs.values()) out[j.rec.state]++;
    return out;
  }

  /**
   * Shutdown: the running job stops at its next step but stays `running` on disk, so the next start resumes
   * it from its latest checkpoint; queued jobs stay queued. Open watch streams end with UNAVAILABLE.
   */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.running?.handle.stop();
    await this.runDone;
    const err = new LoraplexError('UNAVAILABLE', 'server is shutting down; the job resumes when it starts again');
    for (const j of this.jobs.values()) for (const w of j.watchers) w.end(err);
  }

  // --- internals ---------------------------------------------------------------------------------------

  private jobDir(jobId: string): string {
    return join(this.opts.jobRoot, jobId);
  }

  private track(rec: JobRecord): Job {
    let markEnded!: () => void;
    const ended = new Promise<void>((resolve) => (markEnded = resolve));
    const job: Job = { rec, watchers: new Set(), ended, markEnded, cancelRequested: false, persistedAt: 0 };
    this.jobs.set(rec.jobId, job);
    return job;
  }

  private find(tenant: string, jobId: string): Job {
    if (typeof jobId !== 'string' || jobId === '') throw invalidArgument('job_id: must be set');
    if (!JOB_ID_RE.test(jobId)) throw invalidArgument(`job_id ${JSON.stringify(jobId.length > 80 ? `${jobId.slice(0, 80)}...` : jobId)}: not a job id`);
    const job = this.jobs.get(jobId);
    if (!job || job.rec.tenant !== tenant) throw notFound(`job_id ${JSON.stringify(jobId)} not found`);
    return job;
  }

  private info(job: Job): JobInfo {
    const i = this.queue.indexOf(job);
    // A copy: callers (and watchers) must not see it change under them.
    return structuredClone({ ...job.rec, queuePosition: job.rec.state === 'queued' && i >= 0 ? i + Number(this.running !== null) : 0 });
  }

  private replay(job: Job): JobEvent[] {
    const { rec } = job;
    const out: JobEvent[] = [{ type: 'accepted', job: this.info(job) }];
    if (rec.progress) out.push({ type: 'progress', ...rec.progress });
    if (rec.eval) out.push({ type: 'eval', ...rec.eval });
    if (rec.checkpointStep > 0) out.push({ type: 'checkpoint', step: rec.checkpointStep });
    if (rec.state === 'succeeded' && rec.metrics) out.push({ type: 'completed', adapterId: rec.adapterId, metrics: rec.metrics });
    else if (rec.state === 'failed') out.push({ type: 'failed', ...(rec.error ?? { code: 'INTERNAL', message: 'internal error' }) });
    else if (rec.state === 'cancelled') out.push({ type: 'cancelled', step: rec.step });
    return out;
  }

  private emit(job: Job, e: JobEvent): void {
    for (const w of job.watchers) w.push(e);
  }

  /** Writes job.json atomically; progress alone at most every persistEveryMs. */
  private persist(job: Job, force: boolean): void {
    const t = this.now();
    if (!force && t - job.persistedAt < (this.opts.persistEveryMs ?? 2000)) return;
    job.persistedAt = t;
    try {
      writeFileAtomic(join(this.jobDir(job.rec.jobId), JOB_FILE), `${JSON.stringify(job.rec, null, 2)}\n`);
    } catch (err) {
      // The job goes on; a restart would find an older record (and resume from its checkpoint).
      this.opts.log.error({ jobId: job.rec.jobId, err }, 'writing the training job record failed');
    }
  }

  /**
   * Everything but job.json: checkpoints hold copies of the adapter.
   * A retryable job keeps what a resume needs (its data and checkpoints).
   */
  private cleanup(job: Job): void {
    const dir = this.jobDir(job.rec.jobId);
    const keep = (name: string) => name === JOB_FILE || (job.rec.retryable === true && (name === DATA_FILE || isCheckpointDir(name)));
    try {
      for (const name of readdirSync(dir)) if (!keep(name)) rmSync(join(dir, name), { recursive: true, force: true });
    } catch (err) {
      this.opts.log.warn({ jobId: job.rec.jobId, err }, 'cleaning up a training job directory failed');
    }
  }

  private end(job: Job, state: 'succeeded' | 'failed' | 'cancelled', extra: { metrics?: JobMetrics; error?: JobError }): void {
    const { rec } = job;
    rec.state = state;
    rec.endedAt = this.now();
    if (extra.metrics) rec.metrics = extra.metrics;
    if (extra.error) rec.error = extra.error;
    this.persist(job, true);
    this.cleanup(job);
    const log = { jobId: rec.jobId, adapterId: rec.adapterId, tenant: rec.tenant || undefined, step: rec.step };
    if (state === 'succeeded') this.opts.log.info({ ...log, metrics: rec.metrics }, 'training job succeeded');
    else if (state === 'failed') this.opts.log.warn({ ...log, error: rec.error }, 'training job failed');
    else this.opts.log.info(log, 'training job cancelled');
    const last = this.replay(job).at(-1)!;
    this.emit(job, last);
    job.markEnded();
  }

  /** Starts the next queued job when none runs. */
  private pump(): void {
    if (this.closed || this.running) return;
    const job = this.queue.shift();
    if (!job) return;
    this.runDone = this.run(job).catch((err: unknown) => this.opts.log.error({ err, jobId: job.rec.jobId }, 'training job bookkeeping failed'));
  }

  private async run(job: Job): Promise<void> {
    const { rec } = job;
    rec.state = 'running';
    rec.startedAt ??= this.now();
    this.persist(job, true);
    this.opts.log.info({ jobId: rec.jobId, adapterId: rec.adapterId, tenant: rec.tenant || undefined }, 'training job started');
    const t0 = performance.now();
    let outcome: RunOutcome;
    try {
      const handle = this.opts.runner.start(
        { jobId: rec.jobId, jobDir: this.jobDir(rec.jobId), config: rec.config },
        {
          onEvent: (e) => this.onRunEvent(job, e),
          onResume: (step) => this.opts.log.info({ jobId: rec.jobId, step }, 'training job resumes from its checkpoint'),
        },
      );
      this.running = { job, handle };
      outcome = await handle.done;
    } catch (err) {
      outcome = { type: 'failed', code: 'INTERNAL', message: 'internal error', detail: err instanceof Error ? (err.stack ?? err.message) : String(err) };
    }
    rec.runSeconds += (performance.now() - t0) / 1000;
    this.running = null;
    this.opts.onRunEnd?.();
    if (job.cancelRequested) this.end(job, 'cancelled', {});
    else if (outcome.type === 'stopped') {
      // Shutdown: left `running` on disk, with the latest figures, for the next start to resume.
      this.persist(job, true);
      this.opts.log.info({ jobId: rec.jobId, step: rec.step, checkpointStep: rec.checkpointStep }, 'training job stopped for shutdown; it resumes on the next start');
      return;
    } else if (outcome.type === 'failed') {
      if (outcome.detail) this.opts.log.error({ jobId: rec.jobId, detail: outcome.detail }, 'training worker failed');
      this.end(job, 'failed', { error: { code: outcome.code, message: outcome.message } });
    } else await this.complete(job, outcome.result);
    this.pump();
  }

  private async complete(job: Job, result: Extract<RunOutcome, { type: 'completed' }>['result']): Promise<void> {
    const { rec } = job;
    try {
      await this.opts.writeAdapter(recordAdapterKey(rec), result.adapter);
    } catch (caught) {
      const err = diskFullAs(caught, 'adapter root');
      rec.retryable = true;
      const kept = 'its checkpoints are kept: RetryTrainJob resumes it';
      if (err instanceof LoraplexError && err.code !== 'INTERNAL') this.end(job, 'failed', { error: { code: err.code, message: `${err.message} (writing the trained adapter; ${kept})` } });
      else {
        this.opts.log.error({ jobId: rec.jobId, err }, 'writing the trained adapter failed');
        this.end(job, 'failed', { error: { code: 'INTERNAL', message: 'internal error' } });
      }
      return;
    }
    rec.step = result.steps;
    this.end(job, 'succeeded', {
      metrics: {
        trainLoss: result.trainLoss,
        evalLoss: result.evalLoss,
        initialEvalLoss: result.initialEvalLoss,
        steps: result.steps,
        tokensPerSecond: result.tokensPerSecond,
        seconds: rec.runSeconds,
      },
    });
  }

  private onRunEvent(job: Job, e: RunEvent): void {
    const { rec } = job;
    if (e.type === 'progress') {
      const { type: _type, ...p } = e;
      rec.step = p.step;
      rec.totalSteps = p.totalSteps;
      rec.progress = p;
      this.opts.onStep?.(p.loss, p.tokensPerSecond);
      this.persist(job, false);
      this.emit(job, { type: 'progress', ...p });
    } else if (e.type === 'graph') {
      this.opts.log.info({ jobId: rec.jobId, base: e.base, prepackedForward: e.prepackedForward, seconds: +e.seconds.toFixed(2) }, 'training graph ready');
    } else if (e.type === 'eval') {
      rec.eval = { step: e.step, evalLoss: e.evalLoss, perplexity: e.perplexity };
      this.persist(job, true);
      this.emit(job, { type: 'eval', ...rec.eval });
    } else {
      rec.checkpointStep = e.step;
      this.persist(job, true);
      this.emit(job, { type: 'checkpoint', step: e.step });
    }
  }
}
