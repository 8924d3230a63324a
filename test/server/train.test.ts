/**
 * TrainService against a real server (stories260K, int4): a job streams accepted -> progress -> eval ->
 * checkpoint -> completed and its adapter is servable by the very next Generate; Watch / Get / List /
 * Cancel; a job outlives its client; a restarted server resumes a job from its checkpoint; bad requests;
 * serving goes on while a job trains.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { existsSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { makeRandomAdapter, writePeftAdapter } from '../../src/adapters/peft.js';
import { readModelSpec } from '../../src/models/config.js';
import { TrainJobState, type TrainEvent, type TrainRequest } from '../../src/gen/loraplex/v1/train_pb.js';
import type { MessageInitShape } from '@bufbuild/protobuf';
import type { TrainRequestSchema } from '../../src/gen/loraplex/v1/train_pb.js';
import { collect, failure, startTestServer, type TestServer } from '../helpers/server.js';
import { STORIES, tempDir } from '../helpers/engine.js';

const spec = readModelSpec(STORIES);
const text = (value: string) => ({ case: 'text' as const, value });
const greedy = { temperature: 0, maxNewTokens: 24 };
const PROMPT = 'Once upon a time';

// A small, regular corpus: easy to learn, and unlike the stories the base model tells.
const NAMES = ['Tom', 'Anna', 'Ben', 'Mia', 'Sam', 'Lucy'];
const THINGS = ['red ball', 'blue boat', 'green kite', 'big dog', 'small cat'];
const sentence = (i: number) => `${NAMES[i % 6]} found a ${THINGS[i % 5]} in the garden. ${NAMES[(i + 1) % 6]} said: "The ${THINGS[i % 5]} is mine!"`;
const example = (t: string) => ({ example: { case: 'text' as const, value: t } });
const TRAIN = Array.from({ length: 48 }, (_, i) => example(sentence(i)));
const EVAL = Array.from({ length: 8 }, (_, i) => example(sentence(100 + i)));

type Req = Exclude<MessageInitShape<typeof TrainRequestSchema>, TrainRequest>;
/** Short sequences keep a step at a few tens of milliseconds. */
const job = (adapterId: string, extra: Partial<Req> = {}): Req => ({
  adapterId,
  examples: TRAIN,
  evalExamples: EVAL,
  maxSeqLength: 64,
  microBatchSize: 4,
  maxSteps: 30,
  learningRate: 1e-2,
  ...extra,
});

type Ev = NonNullable<TrainEvent['event']>;
async function events(stream: AsyncIterable<{ event?: TrainEvent | undefined }>, until?: (e: Ev) => boolean): Promise<Ev[]> {
  const out: Ev[] = [];
  for await (const m of stream) {
    const e = m.event!.event;
    out.push(e);
    if (until?.(e)) break; // leaving the loop cancels the call
  }
  return out;
}


async function until<T>(what: string, get: () => Promise<T>, ok: (v: T) => boolean, timeoutMs = 120_000): Promise<T> {
  const t0 = Date.now();
  for (;;) {
    const v = await get();
    if (ok(v)) return v;
    if (Date.now() - t0 > timeoutMs) assert.fail(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

let s: TestServer;
const logLines: Record<string, unknown>[] = [];
before(async () => {
  s = await startTestServer({}, undefined, { logLines });
});
after(async () => {
  await s.close();
});

test('Train streams accepted -> progress -> eval -> checkpoint -> completed; the next Generate uses the adapter', async () => {
  const t0 = performance.now();
  const evs = await events(s.train.train(job('story', { evalEvery: 10, checkpointEvery: 10 })));
  const seconds = (performance.now() - t0) / 1000;
  const kinds = evs.map((e) => e.case);
  assert.equal(kinds[0], 'accepted');
  assert.equal(kinds.at(-1), 'completed');
  const accepted = evs[0]!.value as Extract<Ev, { case: 'accepted' }>['value'];
  assert.match(accepted.jobId, /^[A-Za-z0-9_-]+$/);
  assert.ok([TrainJobState.QUEUED, TrainJobState.RUNNING].includes(accepted.job!.state));
  const progress = evs.filter((e) => e.case === 'progress').map((e) => e.value);
  assert.deepEqual(progress.map((p) => p.step), Array.from({ length: 30 }, (_, i) => i + 1));
  assert.ok(progress.every((p) => p.totalSteps === 30 && Number.isFinite(p.loss) && p.learningRate > 0 && p.tokensPerSecond > 0));
  assert.deepEqual(evs.filter((e) => e.case === 'eval').map((e) => e.value.step), [10, 20, 30]);
  // The last step writes no checkpoint: the adapter itself follows.
  assert.deepEqual(evs.filter((e) => e.case === 'checkpoint').map((e) => e.value.step), [10, 20]);
  assert.ok(kinds.indexOf('eval') > kinds.indexOf('progress') && kinds.indexOf('checkpoint') > kinds.indexOf('eval'));
  const done = evs.at(-1)!.value as Extract<Ev, { case: 'completed' }>['value'];
  assert.equal(done.adapterId, 'story');
  const m = done.metrics!;
  assert.equal(m.steps, 30);
  assert.ok(m.initialEvalLoss !== undefined && m.evalLoss !== undefined);
  assert.ok(m.evalLoss! < m.initialEvalLoss!, `eval loss ${m.evalLoss} should drop below ${m.initialEvalLoss}`);
  // The job trained on the served graph's weights (its data file hard-linked), not on a base it quantized again.
  const graphLine = logLines.find((l) => l['msg'] === 'training graph ready' && l['jobId'] === accepted.jobId);
  assert.deepEqual([graphLine?.['base'], graphLine?.['prepackedForward']], ['linked', false]);
  // Its graph was written beside the cache (hard links need one file system) and removed once loaded.
  assert.deepEqual(readdirSync(join(s.cacheDir, 'train-graphs')), []);
  console.log(`# train: 30 steps in ${seconds.toFixed(2)} s (${(30 / m.seconds).toFixed(1)} steps/s in the worker, ${m.tokensPerSecond.toFixed(0)} tokens/s); eval loss ${m.initialEvalLoss!.toFixed(3)} -> ${m.evalLoss!.toFixed(3)}`);

  // Servable at once, and different from the base.
  const base = await collect(s.inference.generate({ prompt: text(PROMPT), sampling: greedy }));
  const tuned = await collect(s.inference.generate({ prompt: text(PROMPT), adapterId: 'story', sampling: greedy }));
  assert.equal(tuned.finished?.generatedTokens, greedy.maxNewTokens);
  assert.notDeepEqual(tuned.tokenIds, base.tokenIds);
  const listed = (await s.adapters.listAdapters({})).adapters.find((a) => a.adapterId === 'story');
  assert.equal(listed?.rank, 8);
  assert.deepEqual(listed?.targetModules, ['q_proj', 'v_proj']);

  // Get, after the fact; the job directory keeps only its record.
  const got = (await s.train.getTrainJob({ jobId: accepted.jobId })).job!;
  assert.equal(got.state, TrainJobState.SUCCEEDED);
  assert.equal(got.step, 30);
  assert.equal(got.metrics?.evalLoss, m.evalLoss);
  assert.ok(got.endTime && got.startTime && got.createTime);
  assert.deepEqual(readdirSync(join(s.jobRoot, accepted.jobId)), ['job.json']);
  const record = JSON.parse(readFileSync(join(s.jobRoot, accepted.jobId, 'job.json'), 'utf8'));
  assert.equal(record.state, 'succeeded');
  assert.equal(record.config.learningRate, 1e-2);

  // Watch of an ended job replays its state and ends with the final event.
  const watched = await events(s.train.watchTrainJob({ jobId: accepted.jobId }));
  assert.deepEqual(watched.map((e) => e.case), ['accepted', 'progress', 'eval', 'checkpoint', 'completed']);

  const text_ = await s.server.metrics.registry.metrics();
  assert.match(text_, /^loraplex_train_steps_total 30$/m);
  assert.match(text_, /^loraplex_train_jobs\{state="succeeded"\} 1$/m);
  assert.match(text_, /^loraplex_train_last_loss \d/m);
});

test('a data file under the data root; prompt/completion examples', async () => {
  const lines = Array.from({ length: 24 }, (_, i) => JSON.stringify({ prompt: `Q: what did ${NAMES[i % 6]} find?\nA:`, completion: ` a ${THINGS[i % 5]}.` }));
  writeFileSync(join(s.dataRoot, 'qa.jsonl'), `${lines.join('\n')}\n`);
  // With the prepacked forward (MatMulNBits), on the served base all the same.
  const evs = await events(s.train.train({ adapterId: 'qa', path: 'qa.jsonl', maxSeqLength: 32, microBatchSize: 4, maxSteps: 5, targetModules: ['all-linear'], prepackedForward: true }));
  assert.equal(evs.at(-1)?.case, 'completed', JSON.stringify(evs.at(-1)));
  const jobId = (evs[0]!.value as Extract<Ev, { case: 'accepted' }>['value']).jobId;
  const graphLine = logLines.find((l) => l['msg'] === 'training graph ready' && l['jobId'] === jobId);
  assert.deepEqual([graphLine?.['base'], graphLine?.['prepackedForward']], ['linked', true]);
  const info = (await s.adapters.listAdapters({})).adapters.find((a) => a.adapterId === 'qa');
  assert.deepEqual(info?.targetModules, ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']);
});

test('bad requests: INVALID_ARGUMENT naming the field, ALREADY_EXISTS for a taken adapter id', async () => {
  const train = (req: Req) => events(s.train.train(req));
  const bad = async (req: Req, code: grpc.status, details: string | RegExp) => {
    const f = await failure(train(req));
    assert.equal(f.code, code, `${grpc.status[f.code]}: ${f.details}`);
    if (typeof details === 'string') assert.equal(f.details, details);
    else assert.match(f.details, details);
  };
  await bad(job('x', { targetModules: ['q_proj', 'attn_q'] }), grpc.status.INVALID_ARGUMENT,
    'target_modules: "attn_q" is not a linear of this llama model; valid: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, all-linear');
  await bad({ ...job('x'), examples: [], path: '../x.txt' }, grpc.status.INVALID_ARGUMENT, `path "../x.txt": must not contain '..'`);
  await bad({ ...job('x'), examples: [], path: '/etc/passwd.txt' }, grpc.status.INVALID_ARGUMENT, 'path "/etc/passwd.txt": must be relative to the data root');
  await bad({ ...job('x'), examples: [], path: 'missing.txt' }, grpc.status.NOT_FOUND, 'path "missing.txt": no such file under the data root');
  await bad(job('x', { learningRate: 2 }), grpc.status.INVALID_ARGUMENT, 'learning_rate 2: must be in (0, 1]');
  await bad(job('x', { learningRate: 0 }), grpc.status.INVALID_ARGUMENT, 'learning_rate 0: must be in (0, 1]');
  await bad(job('x', { r: 64 }), grpc.status.INVALID_ARGUMENT, 'r 64: exceeds maxLoraRank 16');
  await bad(job('x', { maxSeqLength: 100_000 }), grpc.status.INVALID_ARGUMENT, /^max_seq_length 100000: must be an integer in \[2, 256\]$/);
  await bad({ ...job('x'), examples: [] }, grpc.status.INVALID_ARGUMENT, 'examples: no training data; send examples or a path under the data root');
  await bad({ ...job('x'), examples: [{ example: { case: undefined } }] }, grpc.status.INVALID_ARGUMENT, 'examples[0]: must have exactly one of text, prompt + completion, or messages');
  await bad(job('x', { evalFraction: 0.2 }), grpc.status.INVALID_ARGUMENT, 'eval_fraction 0.2: set eval_fraction or a separate eval set, not both');
  await bad(job('../evil'), grpc.status.INVALID_ARGUMENT, /^adapter_id/);
  writePeftAdapter(join(s.adapterRoot, 'taken'), makeRandomAdapter(spec, { r: 4, alpha: 8, targetModules: ['q_proj'], seed: 1 }));
  await bad(job('taken'), grpc.status.ALREADY_EXISTS, 'adapter_id "taken" already exists');
  await bad(job('story'), grpc.status.ALREADY_EXISTS, 'adapter_id "story" already exists'); // trained above
  // None of them made a job.
  assert.ok((await s.train.listTrainJobs({})).jobs.every((j) => j.adapterId === 'story' || j.adapterId === 'qa'));

  assert.deepEqual(await failure(s.train.getTrainJob({ jobId: 'tj-nope' })), { code: grpc.status.NOT_FOUND, details: 'job_id "tj-nope" not found' });
  assert.equal((await failure(s.train.getTrainJob({ jobId: '' }))).code, grpc.status.INVALID_ARGUMENT);
  assert.equal((await failure(s.train.getTrainJob({ jobId: '../../etc' }))).code, grpc.status.INVALID_ARGUMENT);
  assert.equal((await failure(events(s.train.watchTrainJob({ jobId: 'tj-nope' })))).code, grpc.status.NOT_FOUND);
  assert.equal((await failure(s.train.cancelTrainJob({ jobId: 'tj-nope' }))).code, grpc.status.NOT_FOUND);
});

test('a job goes on when its client leaves; Watch from another client sees the same events', async () => {
  const first = await events(s.train.train(job('leaver', { maxSteps: 40, evalEvery: 20 })), (e) => e.case === 'progress');
  const jobId = (first[0]!.value as { jobId: string }).jobId;
  // The Train stream is gone; a watcher joins mid-way and follows to the end.
  const watched = await events(s.train.watchTrainJob({ jobId }));
  assert.equal(watched[0]!.case, 'accepted');
  assert.equal(watched.at(-1)!.case, 'completed');
  const steps = watched.filter((e) => e.case === 'progress').map((e) => e.value.step);
  assert.ok(steps.length > 0 && steps.at(-1) === 40);
  for (let i = 1; i < steps.length; i++) assert.equal(steps[i], steps[i - 1]! + 1, 'no progress is lost or repeated');
  const got = await until('the job to end', () => s.train.getTrainJob({ jobId }), (r) => r.job!.state !== TrainJobState.RUNNING);
  assert.equal(got.job!.state, TrainJobState.SUCCEEDED);
  assert.ok(existsSync(join(s.adapterRoot, 'leaver', 'adapter_model.safetensors')));
});

test('serving goes on while a job trains; a second job queues; CancelTrainJob stops both, no adapter written', async () => {
  const long = s.train.train(job('long', { maxSteps: 5000 }))[Symbol.asyncIterator]();
  const accepted = (await long.next()).value!.event!.event;
  assert.equal(accepted.case, 'accepted');
  const jobId = (accepted.value as { jobId: string }).jobId;
  await until('the first step', () => s.train.getTrainJob({ jobId }), (r) => r.job!.step > 0);

  // Generate while it trains: a full stream, and the job advanced meanwhile.
  const before = (await s.train.getTrainJob({ jobId })).job!.step;
  const t0 = performance.now();
  const out = await collect(s.inference.generate({ prompt: text(PROMPT), sampling: { temperature: 0, maxNewTokens: 64 } }));
  const genSeconds = (performance.now() - t0) / 1000;
  const afterGen = (await s.train.getTrainJob({ jobId })).job!;
  assert.equal(out.finished?.generatedTokens, 64);
  assert.equal(afterGen.state, TrainJobState.RUNNING);
  console.log(`# Generate of 64 tokens during training: ${genSeconds.toFixed(2)} s; the job went from step ${before} to ${afterGen.step}`);
  assert.ok(genSeconds < 10, `Generate took ${genSeconds} s while training`);

  // A second job waits behind it.
  const queued = s.train.train(job('waiting'))[Symbol.asyncIterator]();
  const qa = (await queued.next()).value!.event!.event.value as { jobId: string; job: { state: TrainJobState; queuePosition: number } };
  assert.equal(qa.job.state, TrainJobState.QUEUED);
  assert.equal(qa.job.queuePosition, 1);
  const list = (await s.train.listTrainJobs({})).jobs;
  assert.deepEqual(list.slice(0, 2).map((j) => j.jobId), [qa.jobId, jobId], 'newest first');

  const cq = (await s.train.cancelTrainJob({ jobId: qa.jobId })).job!;
  assert.equal(cq.state, TrainJobState.CANCELLED);
  const qRest: Ev[] = [];
  for (let r = await queued.next(); !r.done; r = await queued.next()) qRest.push(r.value.event!.event);
  assert.deepEqual(qRest.map((e) => e.case), ['cancelled']);

  const c = (await s.train.cancelTrainJob({ jobId })).job!;
  assert.equal(c.state, TrainJobState.CANCELLED);
  assert.ok(c.step > 0 && c.step < 5000);
  const rest: Ev[] = [];
  for (let r = await long.next(); !r.done; r = await long.next()) rest.push(r.value.event!.event);
  assert.equal(rest.at(-1)?.case, 'cancelled');
  assert.ok(!existsSync(join(s.adapterRoot, 'long')), 'a cancelled job writes no adapter');
  assert.deepEqual(readdirSync(join(s.jobRoot, jobId)), ['job.json']);
  // Cancelling again answers the same; a succeeded job cannot be cancelled.
  assert.equal((await s.train.cancelTrainJob({ jobId })).job!.state, TrainJobState.CANCELLED);
  const story = (await s.train.listTrainJobs({})).jobs.find((j) => j.adapterId === 'story')!;
  assert.equal((await failure(s.train.cancelTrainJob({ jobId: story.jobId }))).code, grpc.status.FAILED_PRECONDITION);
  // The id is free again.
  assert.equal((await s.train.listTrainJobs({})).jobs.filter((j) => j.state === TrainJobState.RUNNING || j.state === TrainJobState.QUEUED).length, 0);
});

test('a restarted server resumes a running job from its latest checkpoint', async () => {
  const roots = { adapterRoot: tempDir('resume-adapters'), jobRoot: tempDir('resume-jobs'), dataRoot: tempDir('resume-data'), cacheDir: tempDir('resume-cache') };
  const first = await startTestServer({ ...roots, maxQueuedTrainJobs: 0 });
  let jobId: string;
  let checkpoint: number;
  try {
    const evs = await events(first.train.train(job('resumed', { maxSteps: 80, checkpointEvery: 10, evalEvery: 40 })), (e) => e.case === 'checkpoint');
    jobId = (evs[0]!.value as { jobId: string }).jobId;
    checkpoint = (evs.at(-1)!.value as { step: number }).step;
    assert.equal(checkpoint, 10);
    // maxQueuedTrainJobs 0: nothing may wait behind the running job.
    const full = await failure(events(first.train.train(job('another'))));
    assert.equal(full.code, grpc.status.RESOURCE_EXHAUSTED, full.details);
  } finally {
    await first.close();
  }
  const record = JSON.parse(readFileSync(join(roots.jobRoot, jobId, 'job.json'), 'utf8'));
  assert.equal(record.state, 'running', 'a shutdown leaves the job running on disk');
  assert.ok(record.step >= checkpoint && record.step < 80, `stopped at step ${record.step}`);
  assert.ok(!existsSync(join(roots.adapterRoot, 'resumed')));

  const second = await startTestServer(roots);
  try {
    const evs = await events(second.train.watchTrainJob({ jobId }));
    const accepted = evs[0]!.value as { job: { resumes: number } };
    assert.equal(accepted.job.resumes, 1);
    const steps = evs.filter((e) => e.case === 'progress').map((e) => e.value.step);
    assert.ok(steps.length > 0 && steps.every((st) => st > checkpoint), `progress steps after the restart: ${steps.join(',')}`);
    assert.equal(steps.at(-1), 80);
    assert.equal(evs.at(-1)!.case, 'completed');
    const tuned = await collect(second.inference.generate({ prompt: text(PROMPT), adapterId: 'resumed', sampling: greedy }));
    assert.equal(tuned.finished?.generatedTokens, greedy.maxNewTokens);
  } finally {
    await second.close();
  }
});
