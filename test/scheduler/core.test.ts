/** The scheduler core alone: plans and applied logits, no engine, no tokenizer, no awaits. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { AdapterKey } from '../../src/adapter-key.js';
import { LoraplexError } from '../../src/errors.js';
import { SchedulerCore, type LeaseSource } from '../../src/scheduler/core.js';
import { stepRows, type StepPlan } from '../../src/scheduler/plan.js';
import { SequenceState, type SampledToken } from '../../src/scheduler/sequence-state.js';
import type { SamplingParams } from '../../src/sampling/index.js';

const V = 8;
const EOS = 1;
const key = (s: string) => s as AdapterKey;
const greedy = (maxNewTokens: number): SamplingParams => ({ temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1, maxNewTokens, stopTokenIds: [], stopStrings: [] });

/** Logits whose argmax is `token` for each of `rows` rows. */
function logitsFor(tokens: number[]): Float32Array {
  const out = new Float32Array(tokens.length * V);
  tokens.forEach((t, b) => (out[b * V + t] = 5));
  return out;
}

function setup(opts: { maxNumSeqs?: number; prefillChunk?: number; leases?: LeaseSource; stopAt?: number; kvBlocks?: number } = {}) {
  const sampled: { id: number; token: SampledToken }[] = [];
  const released: string[] = [];
  const leases: LeaseSource = opts.leases ?? { take: (k) => ({ slot: Number(k.slice(1)), release: () => released.push(k) }) };
  const core = new SchedulerCore<{ id: number }>({ maxNumSeqs: opts.maxNumSeqs ?? 4, prefillChunk: opts.prefillChunk ?? 3, vocabSize: V, ...(opts.kvBlocks ? { kvBlocks: opts.kvBlocks, maxModelLen: 64 } : {}) }, leases, (r, token) => {
    sampled.push({ id: r.payload.id, token });
    return token.tokenId === opts.stopAt; // the output stage's stop string
  });
  let next = 0;
  const add = (promptLen: number, adapter: string | null, maxNewTokens = 4) => {
    const seq = new SequenceState(Array.from({ length: promptLen }, (_, i) => 2 + (i % 5)), greedy(maxNewTokens), 0, [EOS], 64);
    const r = core.create(seq, { promptIds: seq.promptIds, params: seq.params, adapterKey: adapter === null ? null : key(adapter), adapterScale: 0.5 }, { id: next++ });
    core.enqueue(r);
    return r;
  };
  return { core, add, sampled, released };
}

const ids = (plan: StepPlan<{ id: number }>) => ({ decode: plan.decode.map((r) => r.request.payload.id), prefill: plan.prefill?.request.payload.id ?? null });

test('a decode plan admits round-robin across adapters; prefill chunks sit at fixed positions', () => {
  const s = setup({ maxNumSeqs: 3 });
  s.add(4, 'a1');
  s.add(4, 'a1');
  s.add(2, null);
  s.add(2, 'a2');
  const first = s.core.plan('decode');
  // One of each adapter before a second of a1; the fourth waits for a row.
  assert.deepEqual(first.admitted.map((r) => r.payload.id), [0, 2, 3]);
  assert.deepEqual(first.admitted.map((r) => r.seq.slot), [1, 0, 2]);
  assert.deepEqual(ids(first), { decode: [], prefill: null });
  assert.equal(s.core.waitingCount, 1);

  const p1 = s.core.plan('prefill');
  assert.deepEqual(ids(p1), { decode: [], prefill: 0 });
  assert.deepEqual(stepRows(p1), [{ kvRow: first.admitted[0]!.seq.kvRow, slot: 1, pastLen: 0, tokens: [2, 3, 4], loraScale: 0.5 }]);
  assert.deepEqual(s.core.apply(p1, logitsFor([5])), []);
  assert.equal(s.sampled.length, 0, 'no token before the prompt is cached');
  const p2 = s.core.plan('prefill');
  assert.equal(p2.prefill!.row.pastLen, 3);
  assert.deepEqual(p2.prefill!.row.tokens, [5]);
  s.core.apply(p2, logitsFor([6]));
  assert.deepEqual(s.sampled.map((x) => [x.id, x.token.tokenId]), [[0, 6]]);

  const d = s.core.plan('decode');
  assert.deepEqual(ids(d), { decode: [0], prefill: null });
  assert.deepEqual(d.decode[0]!.row.tokens, [6]);
});

test('apply ends a row on its stop token, its length, a stop string, or non-finite logits; rows and leases go back', () => {
  const s = setup({ maxNumSeqs: 4, prefillChunk: 8, stopAt: 7 });
  s.add(2, 'a1', 2); // length after 2 tokens
  s.add(2, null); // stop token
  s.add(2, 'a2'); // stop string on token 7
  s.add(2, 'a3'); // NaN
  const admitted = s.core.plan('decode').admitted;
  for (let i = 0; i < 4; i++) s.core.apply(s.core.plan('prefill'), logitsFor([3]));
  const d = s.core.plan('decode');
  assert.deepEqual(ids(d).decode, [0, 1, 2, 3]);
  const logits = logitsFor([4, EOS, 7, 0]);
  logits[3 * V] = NaN;
  const left = s.core.apply(d, logits);
  assert.deepEqual(left.map((l) => [l.request.payload.id, l.error === null ? l.request.seq.finishReason : (l.error as LoraplexError).code]), [
    [0, 'length'], [1, 'stop'], [2, 'stop'], [3, 'INVALID_ARGUMENT'],
  ]);
  assert.match(left[3]!.error!.message, /adapter_id "a3": logits became non-finite at generated token 2/);
  assert.deepEqual(s.sampled.filter((x) => x.id === 1).map((x) => x.token), [{ tokenId: 3, finish: null }, { tokenId: null, finish: 'stop' }]);
  assert.equal(s.core.freeRowCount, 4);
  assert.deepEqual(s.released.sort(), ['a1', 'a2', 'a3']);
  assert.ok(admitted.every((r) => r.seq.kvRow === -1 && r.lease === null));
  assert.ok(s.core.idle);
});

test('an abort leaves at once while waiting, at the next plan while running', () => {
  const s = setup({ maxNumSeqs: 1 });
  const running = s.add(2, null);
  const waiting = s.add(2, null);
  s.core.plan('decode');
  assert.equal(s.core.abort(waiting, new LoraplexError('CANCELLED', 'client cancelled')), true);
  assert.equal(s.core.abort(running, new LoraplexError('DEADLINE_EXCEEDED', 'deadline')), false);
  assert.equal(s.core.runningCount, 1, 'the row is held until the next plan');
  const next = s.core.plan('prefill');
  assert.equal(next.prefill, null);
  assert.deepEqual(next.departed.map((d) => [d.request.payload.id, (d.error as LoraplexError).code]), [[0, 'DEADLINE_EXCEEDED']]);
  assert.equal(s.core.freeRowCount, 1);
  assert.ok(s.core.idle);
});

test('KV blocks: admission reserves prompt + max_new_tokens (within maxModelLen) in 64-token blocks; a request that does not fit waits, and those behind it too', () => {
  const s = setup({ maxNumSeqs: 4, kvBlocks: 2 });
  const capped = s.add(30, null, 100); // 130 tokens, but a row holds 64: one block
  s.add(4, null);
  const third = s.add(4, null);
  const first = s.core.plan('decode');
  assert.deepEqual(first.admitted.map((r) => r.payload.id), [0, 1]);
  assert.equal(s.core.reservedBlocks, 2);
  assert.equal(s.core.freeRowCount, 2, 'rows are free, blocks are not');
  assert.equal(s.core.waitingCount, 1);
  assert.deepEqual(s.core.takeFreedRows(), []);
  const row = capped.seq.kvRow;
  s.core.abort(capped, new LoraplexError('CANCELLED', 'client cancelled'));
  const next = s.core.plan('decode');
  assert.deepEqual(next.admitted.map((r) => r.payload.id), [2]);
  assert.equal(s.core.reservedBlocks, 2);
  // The engine gives the departed row's blocks back at the next step, before the new request takes any.
  assert.deepEqual(s.core.takeFreedRows(), [row]);
  assert.equal(third.seq.kvRow, row, 'the freed row is reused at once');
});

test('admission never waits: an adapter without a lease stays queued, one whose lease throws leaves with the error', () => {
  const taken: string[] = [];
  const s = setup({
    leases: {
      take: (k) => {
        taken.push(k);
        if (k === 'bad') throw new LoraplexError('NOT_FOUND', 'adapter_id "bad": not found');
        return k === 'loading' ? null : { slot: 1, release: () => undefined };
      },
    },
  });
  s.add(2, 'loading');
  s.add(2, 'loading');
  s.add(2, 'bad');
  s.add(2, 'bad');
  s.add(2, 'ok');
  const plan = s.core.plan('decode');
  assert.deepEqual(plan.admitted.map((r) => r.payload.id), [4]);
  assert.deepEqual(plan.departed.map((d) => [d.request.payload.id, (d.error as LoraplexError).code]), [[2, 'NOT_FOUND'], [3, 'NOT_FOUND']]);
  assert.deepEqual(taken, ['loading', 'bad', 'ok'], 'one try per adapter and plan');
  assert.ok(s.core.isWaitingFor(key('loading')));
  assert.equal(s.core.stalled, false);
  assert.deepEqual(s.core.failWaiting(key('loading'), new Error('load failed')).map((d) => d.request.payload.id), [0, 1]);
});
