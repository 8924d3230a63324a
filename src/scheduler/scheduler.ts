import { LoraplexError, resourceExhausted } from '../errors.js';
import type { StepRow } from '../engine/runtime.js';
import type { SamplingParams } from '../sampling/index.js';
import type { Tokenizer } from '../tokenizer/index.js';
import { AsyncQueue } from '../util/async-queue.js';
import { NonFiniteLogits, Sequence, type FinishReason, type TokenEvent } from './sequence.js';

/** What the scheduler needs from the engine: one forward step at a time. */
export interface StepRunner {
  step(rows: StepRow[]): Promise<{ logits: Float32Array }>;
  readonly vocabSize: number;
}

/** A request's hold on its adapter's slot; released when the sequence leaves the batch. */
export interface AdapterLease {
  slot: number;
  release(): void;
}

/**
 * Gives a slot for an adapter. The scheduler never awaits it: tryAcquire (load, validation, slot copy) runs in
 * the background while everyone else decodes, and its settling wakes the loop.
 */
export interface AdapterLeaser {
  /** A lease, or null when every slot is busy right now (the request keeps waiting); rejects for a bad adapter. */
  tryAcquire(adapterId: string): Promise<AdapterLease | null>;
  /** A lease at once when the adapter is ready in a slot, else null; never waits. Without it, every lease goes through tryAcquire. */
  leaseReady?(adapterId: string): AdapterLease | null;
}

const BASE_LEASE: AdapterLease = { slot: 0, release: () => undefined };

export interface SchedulerOptions {
  /** KV cache rows: sequences running at once. */
  maxNumSeqs: number;
  /** Requests waiting for a row before new ones get RESOURCE_EXHAUSTED. */
  maxWaiting: number;
  /** Tokens per cache row. */
  maxModelLen: number;
  /**
   * Prompt tokens per prefill step: the token budget that bounds how long one prefill step delays everyone's
   * next token. Deliberately independent of load: a prompt is always cut at the same positions, so a request
   * computes the same numbers alone and in a busy batch (different chunking would change float rounding).
   */
  prefillChunk: number;
  eosTokenIds: number[];
}

export interface GenerationRequest {
  promptIds: number[];
  params: SamplingParams;
  /** null = the base model. */
  adapterId: string | null;
  adapterScale: number;
  /** Fires when the client cancels or its deadline passes; reason is a LoraplexError. */
  signal?: AbortSignal;
  /** Who the request is for, for metrics and logs only (never for scheduling). */
  tenant?: string;
  /**
   * How errors name the adapter to the client, e.g. `adapter_id "x"` (never an internal key). Without it
   * messages show adapterId as is, which is the client's id only when there is no tenancy.
   */
  adapterLabel?: string;
}

export type GenerationEvent =
  | { type: 'token'; tokenIds: number[]; text: string }
  | { type: 'finished'; reason: FinishReason; promptTokens: number; generatedTokens: number; timings: Timings };

export interface Timings {
  queueSeconds: number;
  timeToFirstTokenSeconds: number;
  totalSeconds: number;
}

interface Entry {
  seq: Sequence;
  req: GenerationRequest;
  events: AsyncQueue<GenerationEvent>;
  arrived: number;
  admitted: number | null;
  firstToken: number | null;
  lastToken: number | null;
  lease: AdapterLease | null;
  /** Set when the entry must leave at the next step (cancel, deadline, drain). */
  abort: LoraplexError | null;
}

/**
 * What the scheduler reports for metrics (src/obs/metrics.ts implements it). Called on the loop, so each
 * callback must be quick and must not throw (a throw is passed to onError, never to a request).
 */
export interface SchedulerObserver {
  /** One engine step; `batch` = rows in it (1 for a prefill). */
  observeStep(kind: 'prefill' | 'decode', seconds: number, batch: number): void;
  /** After each loop turn, and when the loop goes idle. */
  setQueue(state: { running: number; waiting: number; rowsUsed: number; rowsFree: number }): void;
  /** A request leaves after having been admitted: finished, or aborted / failed ('aborted'). */
  observeRequest(done: {
    adapterId: string | null;
    tenant?: string | undefined;
    outcome: FinishReason | 'aborted';
    promptTokens: number;
    generatedTokens: number;
    queueSeconds: number;
    timeToFirstTokenSeconds: number | null;
    totalSeconds: number;
  }): void;
  /** The gap between two consecutive sampled tokens of one sequence. */
  observeInterToken(seconds: number): void;
}

export interface SchedulerStats {
  waiting: number;
  running: number;
  freeRows: number;
  steps: number;
  lastDecodeBatch: number;
}

/**
 * Continuous batching: requests join the running decode batch at the next step; every step decodes all
 * running sequences together (rows carry their own adapter slot), and between decode steps one sequence's
 * prompt is prefilled by a bounded chunk. This loop alone calls engine.step().
 */
export class Scheduler {
  private readonly waiting: Entry[] = [];
  private readonly running: Entry[] = [];
  private readonly freeRows: number[];
  private wake: (() => void) | null = null;
  private loopDone: Promise<void>;
  private stopped = false;
  private accepting = true;
  /** Round-robin start for admission across adapters, so no adapter's queue starves. */
  private lastAdmittedAdapter: string | null = null;
  private stepCount = 0;
  private lastDecodeBatch = 0;
  /** Adapters being made ready in the background (tryAcquire in flight). */
  private readonly preparing = new Set<string>();
  /** Leases a background tryAcquire got, kept for the next request of that adapter. */
  private readonly prepared = new Map<string, AdapterLease>();

  constructor(
    private readonly engine: StepRunner,
    private readonly adapters: AdapterLeaser,
    private readonly tokenizer: Tokenizer,
    readonly opts: SchedulerOptions,
    private readonly onError: (err: unknown) => void = () => undefined,
    /** Settable after construction, so a server built elsewhere can be instrumented (tests). */
    public observer?: SchedulerObserver,
  ) {
    this.freeRows = Array.from({ length: opts.maxNumSeqs }, (_, i) => opts.maxNumSeqs - 1 - i);
    this.loopDone = this.loop();
  }

  stats(): SchedulerStats {
    return { waiting: this.waiting.length, running: this.running.length, freeRows: this.freeRows.length, steps: this.stepCount, lastDecodeBatch: this.lastDecodeBatch };
  }

  /** Queues a request; its events stream tokens, then 'finished' (or end with an error). */
  submit(req: GenerationRequest): AsyncIterable<GenerationEvent> {
    if (!this.accepting) throw new LoraplexError('UNAVAILABLE', 'server is draining; retry on another replica');
    if (this.waiting.length >= this.opts.maxWaiting) {
      throw resourceExhausted(`queue full: ${this.waiting.length} requests waiting (maxWaiting ${this.opts.maxWaiting}); retry later`, { retryAfterMs: 1000 });
    }
    const seq = new Sequence(req.promptIds, req.params, this.tokenizer, 0, this.opts.eosTokenIds, this.opts.maxModelLen);
    const entry: Entry = { seq, req, events: new AsyncQueue<GenerationEvent>(), arrived: performance.now(), admitted: null, firstToken: null, lastToken: null, lease: null, abort: null };
    if (req.signal) {
      const onAbort = () => this.abortEntry(entry, req.signal!.reason);
      if (req.signal.aborted) onAbort();
      else req.signal.addEventListener('abort', onAbort, { once: true });
    }
    if (!entry.abort) {
      this.waiting.push(entry);
      this.kick();
    }
    return entry.events;
  }

  /** Stops admitting; waits for running and waiting requests up to graceMs, then aborts the rest. */
  async drain(graceMs: number): Promise<void> {
    this.accepting = false;
    const deadline = Date.now() + graceMs;
    while ((this.running.length || this.waiting.length) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    for (const e of [...this.waiting, ...this.running]) this.abortEntry(e, new LoraplexError('UNAVAILABLE', 'server shut down before the request finished'));
    this.kick();
    while (this.running.length || this.waiting.length) await new Promise((r) => setTimeout(r, 5));
  }

  async close(): Promise<void> {
    this.stopped = true;
    this.kick();
    await this.loopDone;
    this.releaseUnclaimed();
  }

  private abortEntry(e: Entry, reason: unknown): void {
    if (e.abort || e.seq.done) return;
    e.abort = reason instanceof LoraplexError ? reason : new LoraplexError('CANCELLED', 'request cancelled');
    const i = this.waiting.indexOf(e);
    if (i >= 0) {
      // Not admitted yet: nothing to free, leave at once.
      this.waiting.splice(i, 1);
      e.events.end(e.abort);
    }
    this.kick();
  }

  private kick(): void {
    const w = this.wake;
    this.wake = null;
    w?.();
  }

  private async loop(): Promise<void> {
    while (!this.stopped) {
      if (!this.waiting.length && !this.running.length) {
        this.releaseUnclaimed();
        this.reportQueue();
        await new Promise<void>((resolve) => (this.wake = resolve));
        continue;
      }
      try {
        this.reapAborted();
        this.admit();
        this.releaseUnclaimed();
        await this.decodeStep();
        this.reapAborted();
        await this.prefillStep();
      } catch (err) {
        // An engine failure fails the sequences in flight, never the server.
        this.onError(err);
        for (const e of [...this.running]) this.finishEntry(e, new LoraplexError('INTERNAL', 'internal error', { cause: err }));
      }
      this.reportQueue();
      if (!this.running.some((e) => !e.seq.done) && this.waiting.length) {
        // Nothing to decode. An adapter load in flight wakes the loop when it settles; a request waiting
        // only for a slot retries soon (yield so releases and cancellations can happen).
        if (this.preparing.size) await new Promise<void>((resolve) => (this.wake = resolve));
        else await new Promise((r) => setTimeout(r, 1));
      }
    }
  }

  /** Frees the rows and leases of aborted sequences before the next step is built. */
  private reapAborted(): void {
    for (const e of [...this.running]) if (e.abort) this.finishEntry(e, e.abort);
  }

  /**
   * Admits waiting requests while rows are free, round-robin across adapters. Never waits: a request whose
   * adapter is not ready stays queued while its adapter is prepared in the background.
   */
  private admit(): void {
    if (!this.waiting.length || !this.freeRows.length) return;
    const order = this.admissionOrder();
    const blocked = new Set<string>();
    for (const e of order) {
      if (!this.freeRows.length) break;
      const id = e.req.adapterId;
      if (id !== null && blocked.has(id)) continue;
      const lease = id === null ? BASE_LEASE : this.readyLease(id);
      if (!lease) {
        blocked.add(id!);
        continue;
      }
      if (e.abort || !this.waiting.includes(e)) {
        lease.release();
        continue;
      }
      this.waiting.splice(this.waiting.indexOf(e), 1);
      e.lease = lease;
      e.seq.slot = lease.slot;
      e.seq.kvRow = this.freeRows.pop()!;
      e.admitted = performance.now();
      this.running.push(e);
      this.lastAdmittedAdapter = id ?? '';
    }
  }

  /** The lease a background preparation left, or one at once when the adapter is ready; else starts preparing it. */
  private readyLease(id: string): AdapterLease | null {
    const held = this.prepared.get(id);
    if (held) {
      this.prepared.delete(id);
      return held;
    }
    try {
      const now = this.adapters.leaseReady?.(id) ?? null;
      if (now) return now;
    } catch (err) {
      this.failWaiting(id, err);
      return null;
    }
    this.prepare(id);
    return null;
  }

  /**
   * Loads the adapter and puts it into a slot in the background (LoRAX's loader: the batch only admits ready
   * adapters). When it settles the loop wakes: with a lease to hand out, with nothing (no slot free yet; the
   * next turn tries again), or with an error that ends every request waiting for that adapter.
   */
  private prepare(id: string): void {
    if (this.preparing.has(id)) return;
    this.preparing.add(id);
    this.adapters.tryAcquire(id).then(
      (lease) => {
        this.preparing.delete(id);
        if (lease && this.stopped) lease.release();
        else if (lease) this.prepared.set(id, lease);
        // No slot yet: retry after a timer, not at once. A refusal settles without I/O, and retrying in
        // microtasks would starve the engine's replies that free the slot.
        if (lease) this.kick();
        else setTimeout(() => this.kick(), 1);
      },
      (err: unknown) => {
        this.preparing.delete(id);
        this.failWaiting(id, err);
        this.kick();
      },
    );
  }

  private failWaiting(id: string, err: unknown): void {
    const error = err instanceof Error ? err : new Error(String(err));
    for (const e of this.waiting.filter((x) => x.req.adapterId === id)) {
      this.waiting.splice(this.waiting.indexOf(e), 1);
      e.events.end(error);
    }
  }

  /** Prepared leases nobody waits for any more (their requests were cancelled) go back. */
  private releaseUnclaimed(): void {
    for (const [id, lease] of this.prepared) {
      if (this.stopped || !this.waiting.some((e) => e.req.adapterId === id)) {
        this.prepared.delete(id);
        lease.release();
      }
    }
  }

  /** Waiting entries ordered FIFO within each adapter, adapters taken in turn after the last admitted one. */
  private admissionOrder(): Entry[] {
    const byAdapter = new Map<string, Entry[]>();
    for (const e of this.waiting) {
      const k = e.req.adapterId ?? '';
      const list = byAdapter.get(k) ?? [];
      list.push(e);
      byAdapter.set(k, list);
    }
    const keys = [...byAdapter.keys()];
    const start = this.lastAdmittedAdapter === null ? 0 : (keys.indexOf(this.lastAdmittedAdapter) + 1) % keys.length;
    const rotated = [...keys.slice(start), ...keys.slice(0, start)];
    const out: Entry[] = [];
    for (let round = 0; out.length < this.waiting.length; round++) {
      for (const k of rotated) {
        const e = byAdapter.get(k)![round];
        if (e) out.push(e);
      }
    }
    return out;
  }

  private async decodeStep(): Promise<void> {
    const decoding = this.running.filter((e) => !e.seq.prefilling && !e.seq.done && !e.abort);
    if (!decoding.length) return;
    const rows: StepRow[] = decoding.map((e) => ({ kvRow: e.seq.kvRow, slot: e.seq.slot, pastLen: e.seq.pastLen, tokens: e.seq.nextInput(1), loraScale: e.req.adapterScale }));
    const t0 = performance.now();
    const { logits } = await this.engine.step(rows);
    this.notify((o) => o.observeStep('decode', (performance.now() - t0) / 1000, rows.length));
    this.stepCount++;
    this.lastDecodeBatch = rows.length;
    const V = this.engine.vocabSize;
    decoding.forEach((e, b) => {
      e.seq.advance(1);
      this.deliver(e, logits.subarray(b * V, (b + 1) * V));
    });
  }

  private async prefillStep(): Promise<void> {
    const e = this.running.find((x) => x.seq.prefilling && !x.abort);
    if (!e) return;
    const tokens = e.seq.nextInput(this.opts.prefillChunk);
    const t0 = performance.now();
    const { logits } = await this.engine.step([{ kvRow: e.seq.kvRow, slot: e.seq.slot, pastLen: e.seq.pastLen, tokens, loraScale: e.req.adapterScale }]);
    this.notify((o) => o.observeStep('prefill', (performance.now() - t0) / 1000, 1));
    this.stepCount++;
    e.seq.advance(tokens.length);
    if (!e.seq.prefilling) this.deliver(e, logits);
  }

  private deliver(e: Entry, logits: Float32Array): void {
    if (e.abort) return;
    let ev: TokenEvent | null;
    try {
      ev = e.seq.accept(logits);
    } catch (err) {
      if (!(err instanceof NonFiniteLogits)) throw err;
      // Only this row ends: rows of a batch never mix, and its cache row is zeroed before its next use.
      this.finishEntry(e, nonFiniteLogitsError(e.req, err.generatedToken));
      return;
    }
    if (!ev) return;
    const now = performance.now();
    if (e.firstToken === null) e.firstToken = now;
    if (ev.tokenId !== null) {
      const last = e.lastToken;
      if (last !== null) this.notify((o) => o.observeInterToken((now - last) / 1000));
      e.lastToken = now;
    }
    if (ev.tokenId !== null || ev.text) e.events.push({ type: 'token', tokenIds: ev.tokenId === null ? [] : [ev.tokenId], text: ev.text });
    if (e.seq.done) this.finishEntry(e, null);
  }

  private reportQueue(): void {
    const rowsFree = this.freeRows.length;
    this.notify((o) => o.setQueue({ running: this.running.length, waiting: this.waiting.length, rowsUsed: this.opts.maxNumSeqs - rowsFree, rowsFree }));
  }

  /** Observer failures go to onError: metrics must never fail a request. */
  private notify(fn: (o: SchedulerObserver) => void): void {
    const o = this.observer;
    if (!o) return;
    try {
      fn(o);
    } catch (err) {
      this.onError(new Error('scheduler observer failed', { cause: err }));
    }
  }

  private finishEntry(e: Entry, error: LoraplexError | null): void {
    const i = this.running.indexOf(e);
    if (i < 0) return;
    this.running.splice(i, 1);
    this.freeRows.push(e.seq.kvRow);
    e.seq.kvRow = -1;
    e.lease?.release();
    e.lease = null;
    const now = performance.now();
    this.notify((o) =>
      o.observeRequest({
        adapterId: e.req.adapterId,
        tenant: e.req.tenant,
        outcome: error ? 'aborted' : (e.seq.finishReason ?? 'length'),
        promptTokens: e.seq.promptIds.length,
        generatedTokens: e.seq.tokenIds.length,
        queueSeconds: ((e.admitted ?? now) - e.arrived) / 1000,
        timeToFirstTokenSeconds: e.firstToken === null ? null : (e.firstToken - e.arrived) / 1000,
        totalSeconds: (now - e.arrived) / 1000,
      }),
    );
    if (error) {
      e.events.end(error);
      return;
    }
    e.events.push({
      type: 'finished',
      reason: e.seq.finishReason ?? 'length',
      promptTokens: e.seq.promptIds.length,
      generatedTokens: e.seq.tokenIds.length,
      timings: {
        queueSeconds: ((e.admitted ?? now) - e.arrived) / 1000,
        timeToFirstTokenSeconds: ((e.firstToken ?? now) - e.arrived) / 1000,
        totalSeconds: (now - e.arrived) / 1000,
      },
    });
    e.events.end();
  }
}

/**
 * INVALID_ARGUMENT rather than FAILED_PRECONDITION: no change of the server's state makes a retry succeed; the
 * request's own choices (its adapter, adapter_scale or mix weights) are what must change.
 */
function nonFiniteLogitsError(req: GenerationRequest, generatedToken: number): LoraplexError {
  const who = req.adapterLabel ?? (req.adapterId === null ? 'the base model' : `adapter_id ${JSON.stringify(req.adapterId)}`);
  return new LoraplexError('INVALID_ARGUMENT', `${who}: logits became non-finite at generated token ${generatedToken}; the adapter's weights are unusable`);
}
