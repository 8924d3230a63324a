import { test } from 'node:test';
import assert from 'node:assert/strict';
import { AsyncQueue } from '../../src/util/async-queue.js';

async function all<T>(q: AsyncIterable<T>): Promise<T[]> {
  const out: T[] = [];
  for await (const x of q) out.push(x);
  return out;
}

test('items pushed before and after the consumer waits arrive in order; end() finishes the iteration', async () => {
  const q = new AsyncQueue<number>();
  q.push(1);
  const read = all(q);
  await new Promise((r) => setImmediate(r));
  q.push(2);
  q.end();
  q.push(3); // ignored after the end
  assert.deepEqual(await read, [1, 2]);
});

test('end(error) is thrown after the queued items', async () => {
  const q = new AsyncQueue<string>();
  q.push('a');
  q.end(new Error('boom'));
  const it = q[Symbol.asyncIterator]();
  assert.deepEqual(await it.next(), { done: false, value: 'a' });
  await assert.rejects(it.next(), /boom/);
});

test('a bound drops the oldest droppable item first, else the oldest', async () => {
  const q = new AsyncQueue<{ kind: string; n: number }>({ maxPending: 3, droppable: (x) => x.kind === 'progress' });
  q.push({ kind: 'eval', n: 1 });
  q.push({ kind: 'progress', n: 2 });
  q.push({ kind: 'progress', n: 3 });
  q.push({ kind: 'eval', n: 4 }); // drops progress 2
  q.push({ kind: 'eval', n: 5 }); // drops progress 3
  q.push({ kind: 'eval', n: 6 }); // no progress left: drops the oldest (1)
  q.end();
  assert.deepEqual((await all(q)).map((x) => x.n), [4, 5, 6]);
});

test('next(signal) stops waiting when the signal aborts', async () => {
  const q = new AsyncQueue<number>();
  const ac = new AbortController();
  const waiting = q.next(ac.signal);
  ac.abort(new Error('gone'));
  await assert.rejects(waiting, /gone/);
  q.push(7);
  assert.deepEqual(await q.next(), { done: false, value: 7 });
});
