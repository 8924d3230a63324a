import { KV_BLOCK } from '../engine/kv-cache.js';
import { LoraplexError, resourceExhausted } from '../errors.js';
import type { Tokenizer } from '../tokenizer/index.js';
import { AsyncQueue } from '../util/async-queue.js';
import { SchedulerCore } from './core.js';
import { AdapterReadiness } from './leases.js';
import { OutputStage, type TextOutput } from './output.js';
import { PrefixIndex } from './prefix-index.js';
import { stepRows, type Departure, type ScheduledRequest, type StepPlan } from './plan.js';
import { SequenceState, type SampledToken } from './sequence-state.js';
import type { AdapterLeaser, GenerationEvent, GenerationRequest, SchedulerObserver, SchedulerOptions, SchedulerStats, StepRunner } from './types.js';

export type * from './types.js';

/** The field's former name, accepted until every caller passes adapterKey (the rpc layer is renamed on its own). */

/** What the runner keeps with each request: its stream, its text and its timings. */
interface Stream {
  events: AsyncQueue<GenerationEvent>;
  output: TextOutput;
  arrived: number;
  admitted: number | null;
  firstToken: number | null;
  lastToken: number | null;
}

type Request = ScheduledRequest<Stream>;

/**
 * Continuous batching: requests join the running decode batch at the next step; every step decodes all
 * running sequences together (rows carry their own adapter slot), and between decode steps one sequence's
 * prompt is prefilled by a bounded chunk. SchedulerCore decides each step; this runner alone calls
 * engine.step(), applies its logits, and streams the output stage's text to each request.
 */
export class Scheduler {
  private readonly core: SchedulerCore<Stream>;
  private readonly readiness: AdapterReadiness;
  private readonly outputs: OutputStage;
  private wake: (() => void) | null = null;
  private loopDone: Promise<void>;
  private stopped = false;
  private accepting = true;
  private stepCount = 0;
  private lastDecodeBatch = 0;
  private kvBlocksUsed = 0;
  private readonly prefixes: PrefixIndex | null;

  constructor(
    private readonly engine: StepRunner,
    adapters: AdapterLeaser,
    tokenizer: Tokenizer,
    readonly opts: SchedulerOptions,
    private readonly onError: (err: unknown) => void = () => undefined,
    /** Settable after construction, so a server built elsewhere can be instrumented (tests). */
    public observer?: SchedulerObserver,
  ) {
    this.outputs = new OutputStage(tokenizer);
    this.readiness = new AdapterReadiness(adapters, () => this.kick(), (key, err) => {
      for (const d of this.core.failWaiting(key, err)) this.leave(d);
    });
    const prefixes = engine.kvBytesPerToken && opts.prefixCacheBytes ? new PrefixIndex(opts.prefillChunk, engine.kvBytesPerToken, opts.prefixCacheBytes) : undefined;
    this.core = new SchedulerCore(
      {
        maxNumSeqs: opts.maxNumSeqs,
        ...(engine.kvBlocks ? { kvBlocks: engine.kvBlocks, maxModelLen: opts.maxModelLen } : {}),
        prefillChunk: opts.prefillChunk,
        vocabSize: engine.vocabSize,
        ...(prefixes ? { prefixes } : {}),
        ...(engine.slotLoadId ? { slotLoadId: (slot: number) => engine.slotLoadId!(slot) } : {}),
      },
      this.readiness,
      (r, sampled) => this.streamToken(r, sampled),
    );
    this.prefixes = prefixes ?? null;
    this.loopDone = this.loop();
  }

  stats(): SchedulerStats {
    const p = this.prefixes;
    return {
      waiting: this.core.waitingCount,
      running: this.core.runningCount,
      freeRows: this.core.freeRowCount,
      steps: this.stepCount,
      lastDecodeBatch: this.lastDecodeBatch,
      prefixCache: { queries: p?.queries ?? 0, hits: p?.hits ?? 0, hitTokens: p?.hitTokens ?? 0, bytes: p?.bytes ?? 0 },
      kvBlocks: this.kvBlockState(),
    };
  }

  private kvBlockState(): { used: number; reserved: number; total: number } {
    return { used: this.kvBlocksUsed, reserved: this.core.reservedBlocks, total: this.engine.kvBlocks ?? 0 };
  }

  /** Queues a request; its events stream tokens, then 'finished' (or end with an error). */
  submit(req: GenerationRequest): AsyncIterable<GenerationEvent> {
    if (!this.accepting) throw new LoraplexError('UNAVAILABLE', 'server is draining; retry on another replica');
    if (this.core.waitingCount >= this.opts.maxWaiting) {
      throw resourceExhausted(`queue full: ${this.core.waitingCount} requests waiting (maxWaiting ${this.opts.maxWaiting}); retry later`, { retryAfterMs: 1000 });
    }
    const seq = new SequenceState(req.promptIds, req.params, 0, this.opts.eosTokenIds, this.opts.maxModelLen);
    const stream: Stream = { events: new AsyncQueue(), output: this.outputs.open(req.promptIds, req.params.stopStrings), arrived: performance.now(), admitted: null, firstToken: null, lastToken: null };
    const r = this.core.create(seq, req, stream);
    const blocks = this.core.blocksFor(r);
    if (blocks > (this.engine.kvBlocks ?? Infinity)) {
      // Waiting would never help: even an empty cache cannot hold it.
      throw new LoraplexError('INVALID_ARGUMENT', `prompt + sampling.max_new_tokens: ${req.promptIds.length} + ${req.params.maxNewTokens} tokens need ${blocks} KV cache blocks of ${KV_BLOCK} tokens; this server's kvCacheBytes holds ${this.engine.kvBlocks} blocks (${this.engine.kvBlocks! * KV_BLOCK} tokens)`);
    }
    if (req.signal) {
      const onAbort = () => this.abort(r, req.signal!.reason);
      if (req.signal.aborted) onAbort();
      else req.signal.addEventListener('abort', onAbort, { once: true });
    }
    if (!r.abort) {
      this.core.enqueue(r);
      this.kick();
    }
    return stream.events;
  }

  /** Stops admitting; waits for running and waiting requests up to graceMs, then aborts the rest. */
  async drain(graceMs: number): Promise<void> {
    this.accepting = false;
    const deadline = Date.now() + graceMs;
    while (!this.core.idle && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    for (const r of this.core.requests()) this.abort(r, new LoraplexError('UNAVAILABLE', 'server shut down before the request finished'));
    this.kick();
    while (!this.core.idle) await new Promise((r) => setTimeout(r, 5));
  }

  async close(): Promise<void> {
    this.stopped = true;
    this.readiness.close();
    this.kick();
    await this.loopDone;
  }

  private abort(r: Request, reason: unknown): void {
    // A waiting request holds nothing and leaves at once; a running one leaves at the next plan.
    if (this.core.abort(r, reason)) r.payload.events.end(r.abort!);
    this.kick();
  }

  private kick(): void {
    const w = this.wake;
    this.wake = null;
    w?.();
  }

  private async loop(): Promise<void> {
    while (!this.stopped) {
      if (this.core.idle) {
        await this.freeIdleRows();
        // A request or close() may have come during that await (its kick found no waiter).
        if (this.stopped || !this.core.idle) continue;
        this.releaseUnwantedLeases();
        this.reportQueue();
        await new Promise<void>((resolve) => (this.wake = resolve));
        continue;
      }
      try {
        const decode = this.settle(this.core.plan('decode'));
        this.releaseUnwantedLeases();
        await this.run(decode);
        await this.run(this.settle(this.core.plan('prefill')));
      } catch (err) {
        // An engine failure fails the sequences in flight, never the server.
        this.onError(err);
        for (const d of this.core.failRunning(new LoraplexError('INTERNAL', 'internal error', { cause: err }))) this.leave(d);
      }
      this.reportQueue();
      if (this.core.stalled) {
        // Nothing to decode. An adapter load in flight wakes the loop when it settles; a request waiting
        // only for a slot retries soon (yield so releases and cancellations can happen).
        if (this.readiness.busy) await new Promise<void>((resolve) => (this.wake = resolve));
        else await new Promise((r) => setTimeout(r, 1));
      }
    }
  }

  /** Nothing runs: the cache blocks of the rows that ended go back now rather than at the next step. */
  private async freeIdleRows(): Promise<void> {
    const rows = this.core.takeFreedRows();
    if (!rows.length || !this.engine.kvBlocks) return;
    try {
      this.kvBlocksUsed = (await this.engine.step([], undefined, rows)).kvBlocksUsed ?? 0;
    } catch (err) {
      this.onError(err);
    }
  }

  /** Ends the streams of requests that left while planning and starts the queue clock of those admitted. */
  private settle(plan: StepPlan<Stream>): StepPlan<Stream> {
    for (const d of plan.departed) this.leave(d);
    const now = performance.now();
    for (const r of plan.admitted) r.payload.admitted = now;
    return plan;
  }

  /** One engine step for the plan, then its logits applied. */
  private async run(plan: StepPlan<Stream>): Promise<void> {
    const rows = stepRows(plan);
    if (!rows.length) return;
    const kind = plan.prefill ? 'prefill' : 'decode';
    const t0 = performance.now();
    let logits: Float32Array;
    try {
      const out = await this.engine.step(rows, plan.prefix ?? undefined, this.core.takeFreedRows());
      logits = out.logits;
      this.kvBlocksUsed = out.kvBlocksUsed ?? 0;
    } catch (err) {
      this.core.forgetSaves(plan);
      throw err;
    }
    const lookup = plan.prefixLookup;
    const cachedBytes = this.prefixes?.bytes ?? 0;
    if (lookup) this.notify((o) => o.observePrefixLookup?.(lookup.hitTokens, cachedBytes));
    this.notify((o) => o.observeStep(kind, (performance.now() - t0) / 1000, rows.length));
    this.stepCount++;
    if (kind === 'decode') this.lastDecodeBatch = rows.length;
    for (const d of this.core.apply(plan, logits)) this.leave(d);
  }

  /** The core's token sink: text from the output stage, streamed; true when a stop string ended it. */
  private streamToken(r: Request, sampled: SampledToken): boolean {
    const s = r.payload;
    const { text, stopped } = s.output.push(sampled);
    const now = performance.now();
    if (s.firstToken === null) s.firstToken = now;
    if (sampled.tokenId !== null) {
      const last = s.lastToken;
      if (last !== null) this.notify((o) => o.observeInterToken((now - last) / 1000));
      s.lastToken = now;
    }
    if (sampled.tokenId !== null || text) {
      s.events.push({ type: 'token', tokenIds: sampled.tokenId === null ? [] : [sampled.tokenId], text, ...(sampled.logprob ? { logprobs: [sampled.logprob] } : {}) });
    }
    return stopped;
  }

  /** A request left the core: metrics (if it ever ran), then its stream's end. */
  private leave({ request: r, error }: Departure<Stream>): void {
    const s = r.payload;
    const now = performance.now();
    if (r.admitted) {
      this.notify((o) =>
        o.observeRequest({
          adapterKey: r.req.adapterKey,
          tenant: r.req.tenant,
          outcome: error ? 'aborted' : (r.seq.finishReason ?? 'length'),
          promptTokens: r.seq.promptIds.length,
          generatedTokens: r.seq.tokenIds.length,
          queueSeconds: ((s.admitted ?? now) - s.arrived) / 1000,
          timeToFirstTokenSeconds: s.firstToken === null ? null : (s.firstToken - s.arrived) / 1000,
          totalSeconds: (now - s.arrived) / 1000,
        }),
      );
    }
    if (error) {
      s.events.end(error);
      return;
    }
    s.events.push({
      type: 'finished',
      reason: r.seq.finishReason ?? 'length',
      promptTokens: r.seq.promptIds.length,
      generatedTokens: r.seq.tokenIds.length,
      timings: {
        queueSeconds: ((s.admitted ?? now) - s.arrived) / 1000,
        timeToFirstTokenSeconds: ((s.firstToken ?? now) - s.arrived) / 1000,
        totalSeconds: (now - s.arrived) / 1000,
      },
    });
    s.events.end();
  }

  private releaseUnwantedLeases(): void {
    this.readiness.releaseUnwanted((key) => this.core.isWaitingFor(key));
  }

  private reportQueue(): void {
    const rowsFree = this.core.freeRowCount;
    this.notify((o) => o.setQueue({ running: this.core.runningCount, waiting: this.core.waitingCount, rowsUsed: this.opts.maxNumSeqs - rowsFree, rowsFree }));
    if (this.engine.kvBlocks) this.notify((o) => o.setKvBlocks?.(this.kvBlockState()));
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
}
