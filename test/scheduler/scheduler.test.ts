import { test } from 'node:test';
import assert from 'node:assert/strict';
import { AdapterManager } from '../../src/adapters/manager.js';
import { AdapterStore } from '../../src/adapters/store.js';
import { makeRandomAdapter } from '../../src/adapters/peft.js';
import { Scheduler, type GenerationEvent, type GenerationRequest } from '../../src/scheduler/scheduler.js';
import { loadTokenizer } from '../../src/tokenizer/index.js';
import { LoraplexError } from '../../src/errors.js';
import type { SamplingParams } from '../../src/sampling/index.js';
import type { AdapterKey } from '../../src/adapter-key.js';
import { startTestEngine, STORIES, tempDir } from '../helpers/engine.js';
import { key } from '../helpers/adapter-keys.js';

const greedy = (maxNewTokens: number): SamplingParams => ({ temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1, maxNewTokens, stopTokenIds: [], stopStrings: [] });

async function collect(events: AsyncIterable<GenerationEvent>): Promise<{ ids: number[]; text: string; finished: GenerationEvent | null }> {
  const ids: number[] = [];
  let text = '';
  let finished: GenerationEvent | null = null;
  for await (const e of events) {
    if (e.type === 'token') {
      ids.push(...e.tokenIds);
      text += e.text;
    } else finished = e;
  }
  return { ids, text, finished };
}

async function setup(opts: { maxNumSeqs: number; maxWaiting?: number; maxLoras?: number }) {
  const { engine, compiled } = await startTestEngine(STORIES, { kind: 'int4', blockSize: 32, accuracyLevel: 4 }, { maxNumSeqs: opts.maxNumSeqs, maxLoras: opts.maxLoras ?? 3, maxLoraRank: 8 });
  const tokenizer = await loadTokenizer(STORIES);
  const store = new AdapterStore(tempDir('sched-store'));
  for (let i = 1; i <= 3; i++) store.write(key(`a${i}`), makeRandomAdapter(compiled.spec, { r: 4 + i, alpha: 16, targetModules: ['q_proj', 'v_proj', 'down_proj'], seed: i, bStd: 0.3 }));
  const adapters = new AdapterManager({ store, spec: compiled.spec, loraModules: compiled.layout.loraModules, maxLoras: opts.maxLoras ?? 3, maxCpuLoras: 8, maxLoraRank: 8, maxAdapterBytes: 1 << 24, slotWriter: engine });
  const scheduler = new Scheduler(engine, adapters, tokenizer, {
    maxNumSeqs: opts.maxNumSeqs, maxWaiting: opts.maxWaiting ?? 64, maxModelLen: 256, prefillChunk: 3, eosTokenIds: compiled.spec.eosTokenIds,
  });
  // Without tenancy an adapter's key is its id.
  const request = (prompt: string, adapterId: string | null, extra: Partial<GenerationRequest> = {}): GenerationRequest => ({
    promptIds: tokenizer.encode(prompt), params: greedy(20), adapterKey: adapterId as AdapterKey | null, adapterScale: 1, ...extra,
  });
  return { engine, scheduler, adapters, request, close: async () => { await scheduler.close(); await engine.close(); } };
}

const JOBS: [string, string | null][] = [
  ['Once upon a time', 'a1'], ['The cat sat on the mat', null], ['Lily went to the park', 'a2'], ['One day', 'a3'],
  ['Tom had a red ball and he', 'a1'], ['The sun was', null], ['Once upon a time', 'a2'], ['She was very happy because', 'a3'],
];

test('8 concurrent greedy requests over 3 adapters and none give exactly what each gives alone', async () => {
  const s = await setup({ maxNumSeqs: 8 });
  try {
    const together = await Promise.all(JOBS.map(([p, a]) => collect(s.scheduler.submit(s.request(p, a)))));
    for (let i = 0; i < JOBS.length; i++) {
      const [p, a] = JOBS[i]!;
      const alone = await collect(s.scheduler.submit(s.request(p, a)));
      assert.deepEqual(together[i]!.ids, alone.ids, `request ${i} (${a ?? 'base'})`);
      assert.equal(together[i]!.text, alone.text);
      assert.equal(together[i]!.finished?.type, 'finished');
    }
    // Adapters really change the output: the same prompt with a1, a2 differs.
    assert.notDeepEqual(together[0]!.ids, together[6]!.ids);
  } finally {
    await s.close();
  }
});

test('more requests than rows and slots all complete (rows and slots are reused, no adapter starves)', async () => {
  const s = await setup({ maxNumSeqs: 2, maxLoras: 1 });
  try {
    const results = await Promise.all(JOBS.map(([p, a]) => collect(s.scheduler.submit(s.request(p, a, { params: greedy(6) })))));
    for (const r of results) assert.equal(r.finished?.type, 'finished');
    assert.equal(s.scheduler.stats().freeRows, 2);
  } finally {
    await s.close();
  }
});

test('cancel frees the row and the adapter pin; a full queue is RESOURCE_EXHAUSTED; unknown adapter is NOT_FOUND', async () => {
  const s = await setup({ maxNumSeqs: 1, maxWaiting: 1 });
  try {
    const ctl = new AbortController();
    const long = s.scheduler.submit(s.request('Once upon a time', 'a1', { params: greedy(200), signal: ctl.signal }));
    const it = long[Symbol.asyncIterator]();
    await it.next(); // running
    assert.equal((await s.adapters.info(key('a1'))).activeRequests, 1);
    const queued = s.scheduler.submit(s.request('One day', null));
    assert.throws(() => s.scheduler.submit(s.request('The cat', null)), (e: unknown) => e instanceof LoraplexError && e.code === 'RESOURCE_EXHAUSTED' && e.retryAfterMs === 1000 && /maxWaiting 1/.test(e.message));
    ctl.abort(new LoraplexError('CANCELLED', 'client cancelled'));
    await assert.rejects(async () => { for (;;) { const r = await it.next(); if (r.done) break; } }, /client cancelled/);
    const q = await collect(queued);
    assert.equal(q.finished?.type, 'finished');
    assert.equal((await s.adapters.info(key('a1'))).activeRequests, 0);
    assert.equal(s.scheduler.stats().freeRows, 1);
    await assert.rejects(collect(s.scheduler.submit(s.request('x', 'nope'))), (e: unknown) => e instanceof LoraplexError && e.code === 'NOT_FOUND');
  } finally {
    await s.close();
  }
});
