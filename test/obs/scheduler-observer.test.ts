/** The scheduler's observer callbacks, on a fake engine (fast; the real engine is covered by prometheus.test). */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { StepRow } from '../../src/engine/runtime.js';
import { Scheduler, type GenerationEvent, type SchedulerObserver } from '../../src/scheduler/scheduler.js';
import { loadTokenizer } from '../../src/tokenizer/index.js';
import type { SamplingParams } from '../../src/sampling/index.js';
import { STORIES } from '../helpers/engine.js';
import type { AdapterKey } from '../../src/adapter-key.js';

const greedy = (maxNewTokens: number): SamplingParams => ({ temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1, maxNewTokens, stopTokenIds: [], stopStrings: [] });
const TOKEN = 300; // every row's argmax: never EOS

/** Greedy picks TOKEN for every row; a short sleep so the timings are not zero. */
function fakeEngine(vocabSize: number, stepMs = 2) {
  return {
    vocabSize,
    async step(rows: StepRow[]) {
      await new Promise((r) => setTimeout(r, stepMs));
      const logits = new Float32Array(rows.length * vocabSize);
      rows.forEach((_, b) => (logits[b * vocabSize + TOKEN] = 10));
      return { logits };
    },
  };
}

function recorder() {
  const steps: { kind: string; seconds: number; batch: number }[] = [];
  const queues: { running: number; waiting: number; rowsUsed: number; rowsFree: number }[] = [];
  const requests: Parameters<SchedulerObserver['observeRequest']>[0][] = [];
  const gaps: number[] = [];
  const observer: SchedulerObserver = {
    observeStep: (kind, seconds, batch) => steps.push({ kind, seconds, batch }),
    setQueue: (s) => queues.push({ ...s }),
    observeRequest: (d) => requests.push(d),
    observeInterToken: (s) => gaps.push(s),
  };
  return { observer, steps, queues, requests, gaps };
}

async function drain(events: AsyncIterable<GenerationEvent>): Promise<number> {
  let tokens = 0;
  for await (const e of events) if (e.type === 'token') tokens += e.tokenIds.length;
  return tokens;
}

const leaser = { tryAcquire: async () => ({ slot: 1, release: () => undefined }) };

test('steps, tokens, requests and queue state reach the observer', async () => {
  const tokenizer = await loadTokenizer(STORIES);
  const rec = recorder();
  const scheduler = new Scheduler(fakeEngine(tokenizer.vocabSize), leaser, tokenizer, { maxNumSeqs: 4, maxWaiting: 8, maxModelLen: 128, prefillChunk: 4, eosTokenIds: [2] }, undefined, rec.observer);
  try {
    const prompt = tokenizer.encode('Once upon a time there was a cat');
    const got = await Promise.all([
      drain(scheduler.submit({ promptIds: prompt, params: greedy(5), adapterKey: null, adapterScale: 1, tenant: 'acme' })),
      drain(scheduler.submit({ promptIds: prompt, params: greedy(3), adapterKey: 'a1' as AdapterKey, adapterScale: 1 })),
    ]);
    assert.deepEqual(got, [5, 3]);
    await new Promise((r) => setTimeout(r, 20)); // the loop reports the idle state after the last step
    assert.equal(rec.requests.length, 2);
    const byTenant = rec.requests.find((d) => d.tenant === 'acme')!;
    assert.equal(byTenant.adapterKey, null);
    assert.equal(byTenant.outcome, 'length');
    assert.equal(byTenant.promptTokens, prompt.length);
    assert.equal(byTenant.generatedTokens, 5);
    assert.ok(byTenant.queueSeconds >= 0 && byTenant.timeToFirstTokenSeconds! >= byTenant.queueSeconds && byTenant.totalSeconds >= byTenant.timeToFirstTokenSeconds!);
    const other = rec.requests.find((d) => d.adapterKey === 'a1')!;
    assert.equal(other.generatedTokens, 3);
    assert.equal(other.tenant, undefined);
    // One gap per token after the first of each sequence.
    assert.equal(rec.gaps.length, 4 + 2);
    assert.ok(rec.gaps.every((g) => g > 0));
    const prefills = rec.steps.filter((s) => s.kind === 'prefill');
    assert.equal(prefills.length, 2 * Math.ceil(prompt.length / 4));
    assert.ok(prefills.every((s) => s.batch === 1 && s.seconds > 0));
    const decodes = rec.steps.filter((s) => s.kind === 'decode');
    assert.ok(decodes.some((s) => s.batch === 2), 'the two sequences decoded together');
    // Both first tokens come from the last prefill chunk, the rest from decode steps.
    assert.equal(decodes.reduce((n, s) => n + s.batch, 0), 4 + 2);
    assert.ok(rec.queues.some((q) => q.running === 2 && q.rowsUsed === 2 && q.rowsFree === 2));
    assert.deepEqual(rec.queues.at(-1), { running: 0, waiting: 0, rowsUsed: 0, rowsFree: 4 });
  } finally {
    await scheduler.close();
  }
});

test('a cancelled request is reported as aborted; a throwing observer fails no request', async () => {
  const tokenizer = await loadTokenizer(STORIES);
  const rec = recorder();
  const errors: unknown[] = [];
  const scheduler = new Scheduler(fakeEngine(tokenizer.vocabSize, 5), leaser, tokenizer, { maxNumSeqs: 2, maxWaiting: 8, maxModelLen: 128, prefillChunk: 16, eosTokenIds: [2] }, (e) => errors.push(e));
  scheduler.observer = rec.observer; // attached after construction, as a test server does
  try {
    const ac = new AbortController();
    const events = scheduler.submit({ promptIds: tokenizer.encode('Hello'), params: greedy(100), adapterKey: null, adapterScale: 1, signal: ac.signal });
    let seen = 0;
    await assert.rejects(async () => {
      for await (const e of events) if (e.type === 'token' && ++seen === 3) ac.abort();
    });
    await new Promise((r) => setTimeout(r, 30));
    assert.equal(rec.requests.length, 1);
    assert.equal(rec.requests[0]!.outcome, 'aborted');
    assert.ok(rec.requests[0]!.generatedTokens >= 3);

    scheduler.observer = { ...rec.observer, observeInterToken: () => { throw new Error('observer bug'); } };
    assert.equal(await drain(scheduler.submit({ promptIds: tokenizer.encode('Hello'), params: greedy(4), adapterKey: null, adapterScale: 1 })), 4);
    assert.equal(errors.length, 3);
    assert.match(String(errors[0]), /scheduler observer failed/);
    assert.match(String((errors[0] as Error).cause), /observer bug/);
  } finally {
    await scheduler.close();
  }
});
