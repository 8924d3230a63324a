/**
 * A full disk under a root is RESOURCE_EXHAUSTED naming that root, never INTERNAL, and loses nothing: a
 * training job whose adapter cannot be written keeps its checkpoints, and RetryTrainJob finishes it once there
 * is space. The roots are small tmpfs mounts (root only; skipped with the reason elsewhere).
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { execFileSync } from 'node:child_process';
import { closeSync, mkdirSync, openSync, readdirSync, rmSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import type { TrainEvent } from '../../src/gen/loraplex/v1/train_pb.js';
import { MergeMethod } from '../../src/gen/loraplex/v1/adapters_pb.js';
import { startTestServer, type TestServer } from '../helpers/server.js';
import { tempDir } from '../helpers/engine.js';

function mountTmpfs(dir: string, size: string): string | null {
  try {
    execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${size}`, 'tmpfs', dir], { stdio: 'pipe' });
    return null;
  } catch (err) {
    return `cannot mount a tmpfs here (${(err as Error).message.split('\n')[0]})`;
  }
}
const remount = (dir: string, size: string) => execFileSync('mount', ['-o', `remount,size=${size}`, dir], { stdio: 'pipe' });
const unmount = (dir: string) => execFileSync('umount', ['-l', dir], { stdio: 'pipe' });

const adapterRoot = tempDir('full-adapters');
const exportRoot = tempDir('full-exports');
const skip = mountTmpfs(adapterRoot, '4k') ?? mountTmpfs(exportRoot, '4k');
let s: TestServer;

before(async () => {
  if (skip) return;
  s = await startTestServer({ adapterRoot, exportRoot });
});
after(async () => {
  await s?.close();
  if (!skip) {
    unmount(adapterRoot);
    unmount(exportRoot);
  }
});

const sentences = Array.from({ length: 24 }, (_, i) => ({ example: { case: 'text' as const, value: `Tom found a red ball number ${i} in the garden.` } }));

async function finalEvent(stream: AsyncIterable<{ event?: TrainEvent | undefined }>) {
  let last: NonNullable<TrainEvent['event']> | undefined;
  for await (const m of stream) last = m.event!.event;
  return last!;
}

test('Train into a full adapter root: RESOURCE_EXHAUSTED naming it, checkpoints kept, RetryTrainJob finishes the job', { skip: skip ?? false }, async () => {
  const failed = await finalEvent(s.train.train({ adapterId: 'full', examples: sentences, maxSeqLength: 32, microBatchSize: 4, maxSteps: 6, checkpointEvery: 3 }));
  assert.equal(failed.case, 'failed');
  assert.equal(failed.value.code, grpc.status.RESOURCE_EXHAUSTED);
  assert.match(failed.value.message, /^adapter root: no space left on the device; free space and retry \(writing the trained adapter; its checkpoints are kept: RetryTrainJob resumes it\)$/);
  const [job] = (await s.train.listTrainJobs({})).jobs;
  assert.equal(job!.retryable, true);
  assert.ok(readdirSync(join(s.jobRoot, job!.jobId)).some((n) => /^checkpoint-\d+$/.test(n)), 'the checkpoints are kept');
  // Nothing half-written is visible in the store.
  assert.deepEqual((await s.adapters.listAdapters({})).adapters, []);

  remount(adapterRoot, '16m');
  const retried = await s.train.retryTrainJob({ jobId: job!.jobId });
  assert.equal(retried.job!.retryable, false);
  const done = await finalEvent(s.train.watchTrainJob({ jobId: job!.jobId }));
  assert.equal(done.case, 'completed');
  const out = s.inference.generate({ prompt: { case: 'text', value: 'Tom found' }, adapterId: 'full', sampling: { maxNewTokens: 4 } });
  let tokens = 0;
  for await (const m of out) if (m.event.case === 'delta') tokens += m.event.value.tokenIds.length;
  assert.equal(tokens, 4, 'the retried adapter serves');
  await assert.rejects(s.train.retryTrainJob({ jobId: job!.jobId }), (e: grpc.ServiceError) => e.code === grpc.status.FAILED_PRECONDITION && /only a job that failed writing its adapter/.test(e.details));
});

test('MergeAdapters into a full adapter root and ExportMergedModel into a full export root: RESOURCE_EXHAUSTED naming the root, nothing left behind', { skip: skip ?? false }, async () => {
  // The adapter 'full' of the test above is the source; then fill what is left of the adapter root.
  const filler = join(adapterRoot, '.filler');
  const chunk = Buffer.alloc(64 * 1024, 1);
  const fd = openSync(filler, 'w');
  try {
    for (;;) writeSync(fd, chunk);
  } catch (err) {
    assert.equal((err as NodeJS.ErrnoException).code, 'ENOSPC');
  } finally {
    closeSync(fd);
  }
  const merge = await s.adapters.mergeAdapters({ newAdapterId: 'merged', method: MergeMethod.CAT, sources: [{ adapterId: 'full', weight: 0.5 }] }).catch((e: grpc.ServiceError) => e);
  assert.ok(merge instanceof Error);
  assert.equal(merge.code, grpc.status.RESOURCE_EXHAUSTED);
  assert.equal(merge.details, 'adapter root: no space left on the device; free space and retry');
  assert.deepEqual((await s.adapters.listAdapters({})).adapters.map((a) => a.adapterId), ['full']);
  assert.deepEqual(readdirSync(adapterRoot).sort(), ['.filler', 'full']);
  rmSync(filler);

  const exported = await s.adapters.exportMergedModel({ outputName: 'story-full', adapters: [{ adapterId: 'full' }] }).catch((e: grpc.ServiceError) => e);
  assert.ok(exported instanceof Error);
  assert.equal(exported.code, grpc.status.RESOURCE_EXHAUSTED);
  assert.equal(exported.details, 'export root: no space left on the device; free space and retry');
  assert.deepEqual(readdirSync(exportRoot), [], 'no partial export');
});

test('Train with a full graph folder under the cache: RESOURCE_EXHAUSTED naming the cache dir, not the job root', { skip: skip ?? false }, async () => {
  const cacheDir = tempDir('full-cache');
  const graphs = join(cacheDir, 'train-graphs');
  mkdirSync(graphs);
  const noMount = mountTmpfs(graphs, '4k');
  assert.equal(noMount, null);
  const server = await startTestServer({ cacheDir });
  try {
    // The served file cannot be linked across file systems, and its copy does not fit.
    const failed = await finalEvent(server.train.train({ adapterId: 'graph-full', examples: sentences, maxSeqLength: 32, microBatchSize: 4, maxSteps: 2 }));
    assert.equal(failed.case, 'failed');
    assert.equal(failed.value.code, grpc.status.RESOURCE_EXHAUSTED);
    assert.match(failed.value.message, /^cache dir \(training graphs\): no space left on the device; free space and retry/);
    assert.deepEqual(readdirSync(graphs), [], 'the partial graph is removed');
  } finally {
    await server.close();
    unmount(graphs);
  }
});
