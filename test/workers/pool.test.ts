import { test } from 'node:test';
import assert from 'node:assert/strict';
import { WorkerPool } from '../../src/workers/pool.js';
import type { Tasks } from '../../src/workers/tasks.js';
import { makeRandomAdapter } from '../../src/adapters/peft.js';
import { readModelSpec } from '../../src/models/config.js';
import { LoraplexError } from '../../src/errors.js';
import { STORIES } from '../helpers/engine.js';

const script = new URL('../../src/workers/task-worker.js', import.meta.url);

test('pool: results come back with their tensors, LoraplexErrors keep code and message, close rejects the queue', async () => {
  const pool = new WorkerPool<Tasks>(script, { size: 1 });
  const spec = readModelSpec(STORIES);
  const a = makeRandomAdapter(spec, { r: 4, alpha: 8, targetModules: ['q_proj'], seed: 1, bStd: 0.1 });
  const merged = await pool.run('mergeAdapters', { sources: [{ adapterId: 'a', weight: 1, adapter: a }, { adapterId: 'b', weight: 1, adapter: a }], options: { method: 'cat' } });
  assert.equal(merged.r, 8);
  assert.ok(merged.modules[0]!.a instanceof Float32Array);

  await assert.rejects(pool.run('mergeAdapters', { sources: [], options: { method: 'linear' } }), (e: unknown) => e instanceof LoraplexError && e.code === 'INVALID_ARGUMENT');
  await assert.rejects(pool.run('listStored', { root: '\u0000' }), (e: unknown) => e instanceof Error && !(e instanceof LoraplexError));

  // Queued behind a running task: closing rejects both as UNAVAILABLE and leaves nothing running.
  const big = makeRandomAdapter(spec, { r: 64, alpha: 8, targetModules: ['all-linear'], seed: 2, bStd: 0.1 });
  const running = pool.run('mergeAdapters', { sources: [{ adapterId: 'x', weight: 1, adapter: big }, { adapterId: 'y', weight: 1, adapter: big }], options: { method: 'svd' } });
  const queued = pool.run('mergeAdapters', { sources: [{ adapterId: 'x', weight: 1, adapter: a }], options: { method: 'cat' } });
  const settled = Promise.allSettled([running, queued]);
  await pool.close();
  for (const r of await settled) assert.ok(r.status === 'rejected' && r.reason instanceof LoraplexError && r.reason.code === 'UNAVAILABLE');
  await assert.rejects(pool.run('listStored', { root: '/tmp' }), /shutting down/);
  assert.deepEqual(pool.stats(), { threads: 0, busy: 0, queued: 0 });
});

test('pool: close() settles when it stops a worker whose short task is just ending, with nothing else keeping the process alive', async () => {
  // Node 20 let the event loop empty before such a worker's exit event, leaving an awaited close() pending forever
  // (the test runner then cancels this test; it did in 6 of 8 runs before the fix). Many rounds: the window is a race.
  for (let round = 0; round < 24; round++) {
    const pool = new WorkerPool<Tasks>(script, { size: 1 });
    await pool.run('prefault', { bytes: 1 << 20 });
    const running = pool.run('prefault', { bytes: (round % 4) << 16 }).catch((e: unknown) => e);
    await pool.close();
    const outcome = await running;
    assert.ok(outcome instanceof SharedArrayBuffer || (outcome instanceof LoraplexError && outcome.code === 'UNAVAILABLE'), `round ${round}`);
  }
});
