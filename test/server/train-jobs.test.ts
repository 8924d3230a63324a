/**
 * JobManager's bookkeeping with a scripted runner (no model): failures and their codes, the adapter write
 * racing another writer, slow watchers, cancel of a running job, and recovery of records found on disk.
 * Plus the real worker failing to start (a bad model directory): the job fails INTERNAL, the detail is logged.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import { makeRandomAdapter } from '../../src/adapters/peft.js';
import { LoraplexError } from '../../src/errors.js';
import { readModelSpec } from '../../src/models/config.js';
import { validateTrainConfig } from '../../src/train/config.js';
import { JobManager, type JobEvent, type JobRecord } from '../../src/train/jobs.js';
import { WorkerRunner, type RunHandlers, type RunOutcome, type RunSpec, type TrainRunner } from '../../src/train/runner.js';
import { STORIES, tempDir } from '../helpers/engine.js';
import { scopeAdapterId } from '../../src/adapters/tenancy.js';

const spec = readModelSpec(STORIES);
const config = validateTrainConfig({ maxSeqLength: 32, maxSteps: 5 }, { spec, maxLoraRank: 16 });
const data = { train: [{ kind: 'text' as const, text: 'Tom found a red ball.' }], eval: null };
const summary = { trainExamples: 1, evalExamples: null, path: null, evalPath: null };
const adapter = makeRandomAdapter(spec, { r: 4, alpha: 8, targetModules: ['q_proj'], seed: 1 });

/** A runner whose runs the test drives by hand. */
class ScriptedRunner implements TrainRunner {
  runs: { spec: RunSpec; handlers: RunHandlers; finish: (o: RunOutcome) => void; stops: number }[] = [];
  start(spec: RunSpec, handlers: RunHandlers) {
    let finish!: (o: RunOutcome) => void;
    const done = new Promise<RunOutcome>((resolve) => (finish = resolve));
    const run = { spec, handlers, finish, stops: 0 };
    this.runs.push(run);
    return { done, stop: () => void run.stops++ };
  }
}

function logs(): { log: pino.Logger; lines: Record<string, unknown>[] } {
  const lines: Record<string, unknown>[] = [];
  const stream = new Writable({
    write(chunk, _enc, cb) {
      for (const l of String(chunk).split('\n')) if (l) lines.push(JSON.parse(l));
      cb();
    },
  });
  return { log: pino({ level: 'info' }, stream), lines };
}

function manager(runner: TrainRunner, opts: { writeAdapter?: (key: string) => Promise<unknown>; jobRoot?: string; maxQueued?: number } = {}) {
  const { log, lines } = logs();
  const written: string[] = [];
  const jobs = new JobManager({
    jobRoot: opts.jobRoot ?? tempDir('jobs'),
    runner,
    writeAdapter: opts.writeAdapter ?? (async (key) => written.push(key)),
    maxQueued: opts.maxQueued ?? 8,
    log,
  });
  return { jobs, lines, written };
}

const tick = () => new Promise((r) => setImmediate(r));
const submit = (jobs: JobManager, adapterId: string, tenant = '') =>
  jobs.submit({ adapterKey: scopeAdapterId({ tenant, role: 'user' }, adapterId), config, data, dataSummary: summary });

async function drain(it: AsyncIterable<JobEvent>): Promise<JobEvent[]> {
  const out: JobEvent[] = [];
  for await (const e of it) out.push(e);
  return out;
}

test('a run that fails: the job fails with the code; INTERNAL details go to the log only', async () => {
  const runner = new ScriptedRunner();
  const { jobs, lines } = manager(runner);
  const a = submit(jobs, 'a');
  const b = submit(jobs, 'b');
  assert.equal(jobs.get('', a.jobId).state, 'running');
  assert.equal(jobs.get('', b.jobId).queuePosition, 1);
  const watched = drain(jobs.watch('', a.jobId));
  await tick();
  runner.runs[0]!.finish({ type: 'failed', code: 'INTERNAL', message: 'internal error', detail: 'Error: boom\n    at secret/path.js' });
  const evs = await watched;
  assert.deepEqual(evs.at(-1), { type: 'failed', code: 'INTERNAL', message: 'internal error' });
  assert.equal(jobs.get('', a.jobId).state, 'failed');
  assert.ok(lines.some((l) => l['msg'] === 'training worker failed' && String(l['detail']).includes('boom')));
  // The next job starts once the failed one is done; a request problem keeps its code and message.
  await tick();
  assert.equal(jobs.get('', b.jobId).state, 'running');
  runner.runs[1]!.finish({ type: 'failed', code: 'INVALID_ARGUMENT', message: 'examples: the data holds fewer than 2 tokens' });
  await tick();
  assert.deepEqual(jobs.get('', b.jobId).error, { code: 'INVALID_ARGUMENT', message: 'examples: the data holds fewer than 2 tokens' });
  assert.deepEqual(jobs.counts(), { queued: 0, running: 0, succeeded: 0, failed: 2, cancelled: 0 });
});

test('the adapter id taken while training: the job fails ALREADY_EXISTS and stays retryable; success writes under the tenant key', async () => {
  const runner = new ScriptedRunner();
  const { jobs, written } = manager(runner, {
    writeAdapter: async (key) => {
      if (key.endsWith('taken')) throw new LoraplexError('ALREADY_EXISTS', 'adapter_id "taken" already exists');
      written.push(key);
    },
  });
  const a = submit(jobs, 'taken', 'acme');
  await tick();
  runner.runs[0]!.finish({ type: 'completed', result: { adapter, steps: 5, trainLoss: 1, evalLoss: null, initialEvalLoss: null, tokensPerSecond: 10 } });
  await tick();
  assert.deepEqual(jobs.get('acme', a.jobId).error, {
    code: 'ALREADY_EXISTS',
    message: 'adapter_id "taken" already exists (writing the trained adapter; its checkpoints are kept: RetryTrainJob resumes it)',
  });
  assert.equal(jobs.get('acme', a.jobId).retryable, true);
  const b = submit(jobs, 'fresh', 'acme');
  await tick();
  runner.runs[1]!.finish({ type: 'completed', result: { adapter, steps: 5, trainLoss: 1, evalLoss: 2, initialEvalLoss: 3, tokensPerSecond: 10 } });
  await tick();
  assert.equal(jobs.get('acme', b.jobId).state, 'succeeded');
  assert.deepEqual(written, ['acme~fresh']);
  assert.throws(() => jobs.get('globex', b.jobId), (e: unknown) => e instanceof LoraplexError && e.code === 'NOT_FOUND');
});

test('a slow watcher keeps the latest events and the final one; cancel of a running job stops its run', async () => {
  const runner = new ScriptedRunner();
  const { jobs } = manager(runner);
  const a = submit(jobs, 'a');
  const it = jobs.watch('', a.jobId)[Symbol.asyncIterator]();
  assert.equal((await it.next()).value!.type, 'accepted');
  const run = runner.runs[0]!;
  for (let step = 1; step <= 1000; step++) run.handlers.onEvent({ type: 'progress', step, totalSteps: 1000, epoch: 0, loss: 1, learningRate: 1e-3, gradNorm: 1, tokensPerSecond: 1, etaSeconds: 1 });
  run.handlers.onEvent({ type: 'checkpoint', step: 1000 });
  const cancelled = jobs.cancel('', a.jobId);
  await tick();
  assert.equal(run.stops, 1);
  run.finish({ type: 'stopped' });
  assert.equal((await cancelled).state, 'cancelled');
  const rest: JobEvent[] = [];
  for (let r = await it.next(); !r.done; r = await it.next()) rest.push(r.value);
  assert.ok(rest.length <= 256, `${rest.length} events were held for one watcher`);
  assert.deepEqual(rest.slice(-2), [{ type: 'checkpoint', step: 1000 }, { type: 'cancelled', step: 1000 }]);
  const steps = rest.filter((e) => e.type === 'progress').map((e) => (e as { step: number }).step);
  assert.equal(steps.at(-1), 1000, 'the newest progress is kept');
});

test('recover: running and queued jobs resume (back at their checkpoint), broken records are skipped, close leaves a job running', async () => {
  const jobRoot = tempDir('jobs-recover');
  const runner = new ScriptedRunner();
  const first = manager(runner, { jobRoot });
  const a = submit(first.jobs, 'a');
  const b = submit(first.jobs, 'b');
  const run = runner.runs[0]!;
  for (let step = 1; step <= 7; step++) run.handlers.onEvent({ type: 'progress', step, totalSteps: 20, epoch: 0, loss: 1, learningRate: 1e-3, gradNorm: 1, tokensPerSecond: 1, etaSeconds: 1 });
  // A checkpoint on disk at step 5, as the trainer writes it.
  mkdirSync(join(jobRoot, a.jobId, 'checkpoint-5'));
  writeFileSync(join(jobRoot, a.jobId, 'checkpoint-5', 'trainer_state.json'), '{}');
  run.handlers.onEvent({ type: 'checkpoint', step: 5 });
  const closing = first.jobs.close();
  assert.equal(run.stops, 1);
  run.finish({ type: 'stopped' });
  await closing;
  const onDisk = JSON.parse(readFileSync(join(jobRoot, a.jobId, 'job.json'), 'utf8')) as JobRecord;
  assert.equal(onDisk.state, 'running');
  assert.equal(onDisk.step, 7);
  // Noise in the root: a broken record, a stray file, a job without its data.
  mkdirSync(join(jobRoot, 'tj-broken'));
  writeFileSync(join(jobRoot, 'tj-broken', 'job.json'), '{not json');
  writeFileSync(join(jobRoot, 'README'), 'hello');

  const runner2 = new ScriptedRunner();
  const second = manager(runner2, { jobRoot });
  second.jobs.recover();
  const ra = second.jobs.get('', a.jobId);
  assert.equal(ra.state, 'running');
  assert.equal(ra.resumes, 1);
  assert.equal(ra.step, 5, 'back at its checkpoint');
  assert.equal(ra.progress, null);
  assert.equal(second.jobs.get('', b.jobId).state, 'queued');
  assert.equal(runner2.runs[0]!.spec.jobId, a.jobId, 'the job that was running goes first');
  assert.ok(second.lines.some((l) => l['msg'] === 'resuming training job' && l['jobId'] === a.jobId && l['checkpointStep'] === 5));
  assert.ok(second.lines.some((l) => l['msg'] === 'training job record unreadable; skipped' && l['jobId'] === 'tj-broken'));
  assert.deepEqual(second.jobs.list('').map((j) => j.jobId).sort(), [a.jobId, b.jobId].sort());
  runner2.runs[0]!.finish({ type: 'completed', result: { adapter, steps: 20, trainLoss: 1, evalLoss: null, initialEvalLoss: null, tokensPerSecond: 1 } });
  await tick();
  assert.equal(second.jobs.get('', a.jobId).state, 'succeeded');
  assert.ok(!existsSync(join(jobRoot, a.jobId, 'checkpoint-5')), 'an ended job keeps only its record');
  assert.equal(second.jobs.get('', b.jobId).state, 'running');
  const cancelled = second.jobs.cancel('', b.jobId);
  await tick();
  runner2.runs[1]!.finish({ type: 'stopped' });
  assert.equal((await cancelled).state, 'cancelled');
});

test('the real worker: a model directory it cannot load fails the job INTERNAL, the detail in the log', async () => {
  const runner = new WorkerRunner({ modelDir: tempDir('not-a-model'), quant: { kind: 'int4', blockSize: 32 }, threads: 1, baseModelNameOrPath: null });
  const { jobs, lines } = manager(runner);
  const a = submit(jobs, 'a');
  const evs = await drain(jobs.watch('', a.jobId));
  assert.deepEqual(evs.at(-1), { type: 'failed', code: 'INTERNAL', message: 'internal error' });
  assert.ok(lines.some((l) => l['msg'] === 'training worker failed' && String(l['detail']).includes('config.json')), JSON.stringify(lines));
});
