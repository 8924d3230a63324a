import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, cpSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { makeRandomAdapter, writePeftAdapter } from '../../src/adapters/peft.js';
import { readModelSpec } from '../../src/models/config.js';
import { AdapterState } from '../../src/gen/loraplex/v1/adapters_pb.js';
import { FinishReason } from '../../src/gen/loraplex/v1/inference_pb.js';
import { collect, startTestServer, type TestServer } from '../helpers/server.js';
import { STORIES, tempDir } from '../helpers/engine.js';
import { key } from '../helpers/adapter-keys.js';

const spec = readModelSpec(STORIES);
const reference = JSON.parse(readFileSync(`${STORIES}/reference.json`, 'utf8')).cases[0];
const text = (value: string) => ({ case: 'text' as const, value });
const greedy = (maxNewTokens: number) => ({ temperature: 0, maxNewTokens });

function writeAdapter(root: string, id: string, seed: number, r = 8): void {
  writePeftAdapter(join(root, id), makeRandomAdapter(spec, { r, alpha: 16, targetModules: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'], seed, bStd: 0.3 }));
}

function code(e: unknown): number {
  return (e as grpc.ServiceError).code;
}

let s: TestServer;
before(async () => {
  s = await startTestServer();
  for (let i = 1; i <= 3; i++) writeAdapter(s.adapterRoot, `tenant-${i}`, i);
});
after(async () => {
  await s.close();
});

test('Generate streams text deltas, then counts and timings', async () => {
  const r = await collect(s.inference.generate({ prompt: text('Once upon a time'), sampling: greedy(20) }));
  assert.equal(r.tokenIds.length, 20);
  assert.ok(r.messages >= 2);
  assert.ok(r.text.startsWith(', there was'), r.text);
  assert.equal(r.finished?.finishReason, FinishReason.LENGTH);
  assert.equal(r.finished?.promptTokens, 5);
  assert.equal(r.finished?.generatedTokens, 20);
  const t = r.finished!.timings!;
  assert.ok(t.queueSeconds >= 0 && t.timeToFirstTokenSeconds >= t.queueSeconds && t.totalSeconds >= t.timeToFirstTokenSeconds);
});

test('8 concurrent greedy requests over 3 adapters and none equal each alone, token for token', async () => {
  const jobs: [string, string][] = [
    ['Once upon a time', 'tenant-1'], ['The cat sat on the mat', ''], ['Lily went to the park', 'tenant-2'], ['One day', 'tenant-3'],
    ['Tom had a red ball and he', 'tenant-1'], ['The sun was', ''], ['Once upon a time', 'tenant-2'], ['She was very happy because', 'tenant-3'],
  ];
  const run = (p: string, a: string) => collect(s.inference.generate({ prompt: text(p), adapterId: a, sampling: greedy(24) }));
  const together = await Promise.all(jobs.map(([p, a]) => run(p, a)));
  for (let i = 0; i < jobs.length; i++) {
    const alone = await run(...jobs[i]!);
    assert.deepEqual(together[i]!.tokenIds, alone.tokenIds, `request ${i} ${jobs[i]![1] || 'base'}`);
  }
  assert.notDeepEqual(together[0]!.tokenIds, together[6]!.tokenIds, 'adapters change the output');
  // adapter_scale 0 is the base model exactly.
  const scaled0 = await collect(s.inference.generate({ prompt: text('Once upon a time'), adapterId: 'tenant-1', adapterScale: 0, sampling: greedy(24) }));
  const base = await collect(s.inference.generate({ prompt: text('Once upon a time'), sampling: greedy(24) }));
  assert.deepEqual(scaled0.tokenIds, base.tokenIds);
});

test('LoadAdapter, ListAdapters, UnloadAdapter; an adapter copied into the store works without a restart', async () => {
  const loaded = await s.adapters.loadAdapter({ adapterId: 'tenant-2', pin: true });
  assert.equal(loaded.adapter?.adapterId, 'tenant-2');
  assert.equal(loaded.adapter?.rank, 8);
  assert.ok(loaded.adapter?.pinned);
  assert.deepEqual(new Set(loaded.adapter?.targetModules), new Set(['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']));
  const list = await s.adapters.listAdapters({});
  const byId = new Map(list.adapters.map((a) => [a.adapterId, a]));
  assert.ok(byId.has('tenant-1') && byId.has('tenant-3'));
  assert.notEqual(byId.get('tenant-2')!.state, AdapterState.STORED);
  assert.ok(byId.get('tenant-2')!.bytes > 0n);

  // Copied into the store after start: the very next Generate can name it.
  const fresh = tempDir('fresh');
  writeAdapter(fresh, 'late', 9);
  cpSync(join(fresh, 'late'), join(s.adapterRoot, 'late'), { recursive: true });
  const r = await collect(s.inference.generate({ prompt: text('One day'), adapterId: 'late', sampling: greedy(8) }));
  assert.equal(r.tokenIds.length, 8);

  const unloaded = await s.adapters.unloadAdapter({ adapterId: 'late', deleteFromStore: true });
  assert.equal(unloaded.adapter?.adapterId, 'late');
  await assert.rejects(collect(s.inference.generate({ prompt: text('One day'), adapterId: 'late' })), (e) => code(e) === grpc.status.NOT_FOUND);
  const after = await s.adapters.unloadAdapter({ adapterId: 'tenant-2' });
  assert.equal(after.adapter?.state, AdapterState.STORED);
});

test('Unload of an adapter in use is FAILED_PRECONDITION; cancel frees the row and the pin within a step', async () => {
  const ctl = new AbortController();
  const stream = s.inference.generate({ prompt: text('Once upon a time'), adapterId: 'tenant-3', sampling: greedy(200) }, { signal: ctl.signal });
  const it = stream[Symbol.asyncIterator]();
  await it.next();
  await assert.rejects(s.adapters.unloadAdapter({ adapterId: 'tenant-3' }), (e) => code(e) === grpc.status.FAILED_PRECONDITION && /running request/.test((e as grpc.ServiceError).details));
  ctl.abort();
  await assert.rejects(async () => { for (;;) if ((await it.next()).done) break; }, (e) => code(e) === grpc.status.CANCELLED);
  for (let i = 0; i < 100 && s.server.app.scheduler.stats().running > 0; i++) await new Promise((r) => setTimeout(r, 10));
  assert.equal(s.server.app.scheduler.stats().running, 0);
  assert.equal((await s.server.app.adapters.info(key('tenant-3'))).activeRequests, 0);
  await s.adapters.unloadAdapter({ adapterId: 'tenant-3' });
});

test('an expired deadline ends the stream with DEADLINE_EXCEEDED and frees its row', async () => {
  await assert.rejects(collect(s.inference.generate({ prompt: text('Once upon a time'), sampling: greedy(220) }, { timeoutMs: 30 })), (e) => code(e) === grpc.status.DEADLINE_EXCEEDED);
  for (let i = 0; i < 100 && s.server.app.scheduler.stats().running > 0; i++) await new Promise((r) => setTimeout(r, 10));
  assert.equal(s.server.app.scheduler.stats().running, 0);
});

test('bad requests get INVALID_ARGUMENT / NOT_FOUND naming the field and the limit; the server survives them', async () => {
  const cases: [object, number, RegExp][] = [
    [{ prompt: text('') }, grpc.status.INVALID_ARGUMENT, /text: the prompt must not be empty/],
    [{}, grpc.status.INVALID_ARGUMENT, /prompt: set text, chat or token_ids.ids/],
    [{ prompt: text('Once'), sampling: { maxNewTokens: 10_000 } }, grpc.status.INVALID_ARGUMENT, /sampling\.max_new_tokens 10000: exceeds the \d+ tokens left in the context \(maxModelLen 256/],
    [{ prompt: text('Once'), sampling: { topP: 1.5 } }, grpc.status.INVALID_ARGUMENT, /sampling\.top_p 1\.5: must be in \(0, 1\]/],
    [{ prompt: text('Once'), sampling: { temperature: -1 } }, grpc.status.INVALID_ARGUMENT, /sampling\.temperature -1/],
    [{ prompt: text('Once'), sampling: { stopTokenIds: [99999] } }, grpc.status.INVALID_ARGUMENT, /stop_token_ids/],
    [{ prompt: text('Once'), adapterId: 'no-such-adapter' }, grpc.status.NOT_FOUND, /no-such-adapter/],
    [{ prompt: text('Once'), adapterId: '../etc' }, grpc.status.INVALID_ARGUMENT, /adapter_id/],
    [{ prompt: text('Once'), adapterId: 'tenant-1', adapterScale: 100 }, grpc.status.INVALID_ARGUMENT, /adapter_scale 100: must be in \[-8, 8\]/],
    [{ prompt: { case: 'chat', value: { messages: [{ role: 'user', content: 'hi' }] } } }, grpc.status.INVALID_ARGUMENT, /no chat template/],
    [{ prompt: text('word '.repeat(400)) }, grpc.status.INVALID_ARGUMENT, /leave no room to generate within maxModelLen 256/],
  ];
  for (const [req, status, message] of cases) {
    await assert.rejects(collect(s.inference.generate(req)), (e) => code(e) === status && message.test((e as grpc.ServiceError).details), JSON.stringify(req));
  }
  await assert.rejects(s.adapters.loadAdapter({ adapterId: 'a/b' }), (e) => code(e) === grpc.status.INVALID_ARGUMENT);
  await assert.rejects(s.adapters.loadAdapter({ adapterId: 'missing' }), (e) => code(e) === grpc.status.NOT_FOUND);
  await assert.rejects(s.adapters.unloadAdapter({ adapterId: 'missing' }), (e) => code(e) === grpc.status.NOT_FOUND);
  // A rank over maxLoraRank and a non-PEFT directory are refused by name.
  writeAdapter(s.adapterRoot, 'too-big', 1, 32);
  await assert.rejects(s.adapters.loadAdapter({ adapterId: 'too-big' }), (e) => code(e) === grpc.status.INVALID_ARGUMENT && /maxLoraRank 16/.test((e as grpc.ServiceError).details));
  rmSync(join(s.adapterRoot, 'too-big'), { recursive: true });
  const ok = await collect(s.inference.generate({ prompt: text('Once upon a time'), sampling: greedy(5) }));
  assert.equal(ok.tokenIds.length, 5);
});

test('Tokenize and GetModelInfo', async () => {
  const t = await s.inference.tokenize({ prompt: text('Once upon a time') });
  assert.deepEqual(t.tokenIds, reference.prompt_ids_with_bos);
  const info = await s.inference.getModelInfo({});
  assert.equal(info.model?.modelType, 'llama');
  assert.equal(info.model?.maxModelLen, 256);
  assert.deepEqual(info.model?.eosTokenIds, [2, 1]);
  assert.equal(info.limits?.maxLoras, 4);
});

test('a full queue answers RESOURCE_EXHAUSTED with a retry hint', async () => {
  const small = await startTestServer({ maxNumSeqs: 1, maxWaiting: 1 });
  try {
    // The first request is running (it has streamed a token) and holds the only row; the second waits.
    const firstStream = small.inference.generate({ prompt: text('Once upon a time'), sampling: greedy(200) })[Symbol.asyncIterator]();
    assert.equal((await firstStream.next()).done, false);
    const second = collect(small.inference.generate({ prompt: text('One day'), sampling: greedy(4) }));
    for (let i = 0; i < 200 && small.server.app.scheduler.stats().waiting < 1; i++) await new Promise((r) => setTimeout(r, 1));
    await assert.rejects(collect(small.inference.generate({ prompt: text('The cat'), sampling: greedy(4) })), (e) => {
      const err = e as grpc.ServiceError;
      return err.code === grpc.status.RESOURCE_EXHAUSTED && /maxWaiting 1/.test(err.details) && err.metadata.get('retry-after-ms').length === 1;
    });
    const first = collect({ [Symbol.asyncIterator]: () => firstStream });
    assert.equal((await first).tokenIds.length, 199); // the first token was read above
    assert.equal((await second).tokenIds.length, 4);
  } finally {
    await small.close();
  }
});
