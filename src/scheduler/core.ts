import type { AdapterKey } from '../adapter-key.js';
import { LoraplexError } from '../errors.js';
import type { PrefixOps } from '../engine/prefix-cache.js';
import { KV_BLOCK } from '../engine/kv-cache.js';
import type { Departure, PlannedRow, ScheduledRequest, StepPhase, StepPlan } from './plan.js';
import type { PrefixIndex } from './prefix-index.js';
import { NonFiniteLogits, type SampledToken, type SequenceState } from './sequence-state.js';
import type { AdapterLease, GenerationRequest } from './types.js';

/** Where admission gets adapter leases; never waits (see AdapterReadiness). Throws for an unusable adapter. */
export interface LeaseSource {
  take(adapterKey: AdapterKey): AdapterLease | null;
}

/** Hands a sampled token to the output stage; returns true when a stop string ended the text. */
export type TokenSink<P> = (request: ScheduledRequest<P>, sampled: SampledToken) => boolean;

export interface CoreOptions {
  /** KV cache rows. */
  maxNumSeqs: number;
  /** KV cache blocks rows can hold at once; absent = rows are the only limit. */
  kvBlocks?: number;
  /** Tokens per row: a sequence never caches more (absent: no cap). */
  maxModelLen?: number;
  /** Prompt tokens per prefill step (fixed positions: see SchedulerOptions.prefillChunk). */
  prefillChunk: number;
  vocabSize: number;
  /** Cached prompt prefixes; absent or disabled = every prompt is prefilled from position 0. */
  prefixes?: PrefixIndex;
  /** Which load of its adapter a slot holds (Engine.slotLoadId); part of a prefix's identity. */
  slotLoadId?: (slot: number) => number;
}

const BASE_LEASE: AdapterLease = { slot: 0, release: () => undefined };

/**
 * The scheduler's decisions, with no I/O, no awaits and no tokenizer (vLLM v1: schedule() -> SchedulerOutput,
 * then update_from_output()). plan() says what the next engine step computes; apply() samples its logits and
 * advances the sequences. Policy: a decode step of every running row that has its prompt cached, then one
 * prefill chunk of `prefillChunk` tokens; admission round-robin across adapters, only with a ready lease.
 */
export class SchedulerCore<P> {
  private readonly waiting: ScheduledRequest<P>[] = [];
  private readonly running: ScheduledRequest<P>[] = [];
  private readonly freeRows: number[];
  /** Rows given back since the last step, whose cache blocks the engine frees at the next one. */
  private freedRows: number[] = [];
  /** Blocks reserved by running requests: each holds its worst case, prompt + max_new_tokens. */
  private reserved = 0;
  /** Round-robin start for admission across adapters, so no adapter's queue starves. */
  private lastAdmittedAdapter: string | null = null;

  constructor(
    private readonly opts: CoreOptions,
    private readonly leases: LeaseSource,
    private readonly sink: TokenSink<P>,
  ) {
    this.freeRows = Array.from({ length: opts.maxNumSeqs }, (_, i) => opts.maxNumSeqs - 1 - i);
  }

  get waitingCount(): number {
    return this.waiting.length;
  }

  get runningCount(): number {
    return this.running.length;
  }

  get freeRowCount(): number {
    return this.freeRows.length;
  }

  get reservedBlocks(): number {
    return this.reserved;
  }

  /** The rows freed since the last call: the next engine step gives their cache blocks back first. */
  takeFreedRows(): number[] {
    const rows = this.freedRows;
    this.freedRows = [];
    return rows;
  }

  get idle(): boolean {
    return !this.waiting.length && !this.running.length;
  }

  /** Requests wait but no running row can decode: the next step must wait for a slot or a load. */
  get stalled(): boolean {
    return this.waiting.length > 0 && !this.running.some((r) => !r.seq.done);
  }

  isWaitingFor(key: AdapterKey): boolean {
    return this.waiting.some((r) => r.req.adapterKey === key);
  }

  requests(): ScheduledRequest<P>[] {
    return [...this.waiting, ...this.running];
  }

  /** A request the core can track (abort it, enqueue it); not yet waiting. */
  create(seq: SequenceState, req: GenerationRequest, payload: P): ScheduledRequest<P> {
    return { seq, req, payload, lease: null, abort: null, admitted: false, prefixChain: null, reservedBlocks: 0 };
  }

  enqueue(r: ScheduledRequest<P>): void {
    this.waiting.push(r);
  }

  /**
   * Marks a request to leave at the next plan. Returns true when it was still waiting: it left at once (it
   * holds nothing), and the caller ends its stream with `r.abort`.
   */
  abort(r: ScheduledRequest<P>, reason: unknown): boolean {
    if (r.abort || r.seq.done) return false;
    r.abort = reason instanceof LoraplexError ? reason : new LoraplexError('CANCELLED', 'request cancelled');
    const i = this.waiting.indexOf(r);
    if (i < 0) return false;
    this.waiting.splice(i, 1);
    return true;
  }

  /** The waiting requests of an adapter that cannot be used leave with its error. */
  failWaiting(key: AdapterKey, err: unknown): Departure<P>[] {
    const error = err instanceof Error ? err : new Error(String(err));
    const gone = this.waiting.filter((r) => r.req.adapterKey === key);
    for (const r of gone) this.waiting.splice(this.waiting.indexOf(r), 1);
    return gone.map((request) => ({ request, error }));
  }

  /** Every running request leaves with `error` (the engine failed; the server goes on). */
  failRunning(error: Error): Departure<P>[] {
    return [...this.running].map((request) => {
      this.retire(request);
      return { request, error };
    });
  }

  plan(phase: StepPhase): StepPlan<P> {
    const departed = this.reapAborted();
    if (phase === 'prefill') {
      const r = this.running.find((x) => x.seq.prefilling && !x.abort);
      if (!r) return { admitted: [], departed, decode: [], prefill: null, prefix: null, prefixLookup: null };
      const lookup = this.restorePrefix(r);
      const prefill = this.planned(r, this.opts.prefillChunk);
      const prefix = this.savePrefix(r, prefill.row.pastLen + prefill.row.tokens.length, lookup?.ops ?? null);
      return { admitted: [], departed, decode: [], prefill, prefix, prefixLookup: lookup && { hitTokens: lookup.hitTokens } };
    }
    const admitted = this.admit(departed);
    const decode = this.running.filter((r) => !r.seq.prefilling && !r.seq.done && !r.abort).map((r) => this.planned(r, 1));
    return { admitted, departed, decode, prefill: null, prefix: null, prefixLookup: null };
  }

  /** The step failed: the blocks its plan meant to save were never saved. */
  forgetSaves(plan: StepPlan<P>): void {
    this.opts.prefixes?.forget(plan.prefix?.save?.map((s) => s.id) ?? []);
  }

  /**
   * Before a prompt's first chunk: the longest cached prefix of it (same tenant, adapter load and scale) is restored
   * into its row and its prefill starts after it, at a block boundary (a multiple of prefillChunk).
   */
  private restorePrefix(r: ScheduledRequest<P>): { ops: PrefixOps | null; hitTokens: number } | null {
    const index = this.opts.prefixes;
    if (!index?.enabled || r.prefixChain || r.seq.pastLen !== 0) return null;
    const { adapterKey, adapterScale, tenant } = r.req;
    // The tenant salts the chain (vLLM's cache_salt): tenants never share blocks, even for the base model, so the
    // time to first token cannot tell one tenant whether another sent the same prompt.
    const identity = JSON.stringify([tenant ?? '', adapterKey, this.opts.slotLoadId?.(r.seq.slot) ?? 0, adapterScale]);
    r.prefixChain = index.chain(identity, r.seq.promptIds);
    const ids = index.lookup(r.prefixChain, r.seq.promptIds.length);
    if (!ids.length) return { ops: null, hitTokens: 0 };
    const hitTokens = ids.length * index.blockTokens;
    r.seq.advance(hitTokens);
    return { ops: { blockTokens: index.blockTokens, restore: [{ kvRow: r.seq.kvRow, ids }] }, hitTokens };
  }

  /** A chunk that completes a prompt block not cached yet saves it (evicting least recently used blocks). */
  private savePrefix(r: ScheduledRequest<P>, end: number, prefix: PrefixOps | null): PrefixOps | null {
    const index = this.opts.prefixes;
    if (!index || !r.prefixChain || end % index.blockTokens !== 0) return prefix;
    const id = r.prefixChain[end / index.blockTokens - 1];
    if (id === undefined || index.has(id)) return prefix;
    const drop = index.add(r.prefixChain, end / index.blockTokens - 1);
    if (!drop) return prefix;
    const ops = prefix ?? { blockTokens: index.blockTokens };
    ops.save = [{ kvRow: r.seq.kvRow, start: end - index.blockTokens, id }];
    if (drop.length) ops.drop = drop;
    return ops;
  }

  /** Advances the plan's sequences by its step's logits (one row of `vocabSize` each) and samples; returns who left. */
  apply(plan: StepPlan<P>, logits: Float32Array): Departure<P>[] {
    const V = this.opts.vocabSize;
    const out: Departure<P>[] = [];
    plan.decode.forEach(({ request }, b) => {
      request.seq.advance(1);
      this.deliver(request, logits.subarray(b * V, (b + 1) * V), out);
    });
    if (plan.prefill) {
      const { request, row } = plan.prefill;
      const b = plan.decode.length;
      request.seq.advance(row.tokens.length);
      if (!request.seq.prefilling) this.deliver(request, logits.subarray(b * V, (b + 1) * V), out);
    }
    return out;
  }

  private planned(request: ScheduledRequest<P>, chunk: number): PlannedRow<P> {
    return { request, row: request.seq.stepRow(chunk, request.req.adapterScale) };
  }

  private deliver(r: ScheduledRequest<P>, logits: Float32Array, out: Departure<P>[]): void {
    if (r.abort) return;
    let sampled: SampledToken | null;
    try {
      sampled = r.seq.sample(logits);
    } catch (err) {
      if (!(err instanceof NonFiniteLogits)) throw err;
      // Only this row ends: rows of a batch never mix, and its cache row is zeroed before its next use.
      this.retire(r);
      out.push({ request: r, error: nonFiniteLogitsError(r.req, err.generatedToken) });
      return;
    }
    if (!sampled) return;
    if (this.sink(r, sampled)) r.seq.stopByString();
    if (r.seq.done) {
      this.retire(r);
      out.push({ request: r, error: null });
    }
  }

  /** Frees the rows and leases of aborted sequences before the next step is built. */
  private reapAborted(): Departure<P>[] {
    const out: Departure<P>[] = [];
    for (const r of [...this.running]) {
      if (!r.abort) continue;
      this.retire(r);
      out.push({ request: r, error: r.abort });
    }
    return out;
  }

  /**
   * Admits waiting requests while rows are free, round-robin across adapters. Never waits: a request whose
   * adapter is not ready stays queued while its adapter is prepared in the background.
   *
   * KV memory: a request is admitted only when the blocks for its prompt + max_new_tokens can be reserved (it
   * takes them from the pool only as it grows). Nothing is ever preempted and recomputed: a prompt recomputed
   * in one prefill is not bit-identical to the tokens it decoded one by one. The first request in turn that does
   * not fit stops admission, so a long request is not starved by shorter ones behind it.
   */
  private admit(departed: Departure<P>[]): ScheduledRequest<P>[] {
    const admitted: ScheduledRequest<P>[] = [];
    if (!this.waiting.length || !this.freeRows.length) return admitted;
    const blocked = new Set<AdapterKey>();
    for (const r of this.admissionOrder()) {
      if (!this.freeRows.length) break;
      const blocks = this.blocksFor(r);
      if (this.opts.kvBlocks !== undefined && this.reserved + blocks > this.opts.kvBlocks) break;
      const key = r.req.adapterKey;
      if (key !== null && blocked.has(key)) continue;
      const lease = key === null ? BASE_LEASE : this.takeLease(key, departed);
      if (!lease) {
        blocked.add(key!);
        continue;
      }
      if (r.abort || !this.waiting.includes(r)) {
        lease.release();
        continue;
      }
      this.waiting.splice(this.waiting.indexOf(r), 1);
      r.lease = lease;
      r.seq.slot = lease.slot;
      r.seq.kvRow = this.freeRows.pop()!;
      r.reservedBlocks = blocks;
      this.reserved += blocks;
      r.admitted = true;
      this.running.push(r);
      admitted.push(r);
      this.lastAdmittedAdapter = key ?? '';
    }
    return admitted;
  }

  /** The cache blocks a request can ever hold (0 without block accounting). */
  blocksFor(r: ScheduledRequest<P>): number {
    if (this.opts.kvBlocks === undefined) return 0;
    const tokens = Math.min(r.seq.promptIds.length + r.seq.params.maxNewTokens, this.opts.maxModelLen ?? Infinity);
    return Math.ceil(tokens / KV_BLOCK);
  }

  private takeLease(key: AdapterKey, departed: Departure<P>[]): AdapterLease | null {
    try {
      return this.leases.take(key);
    } catch (err) {
      departed.push(...this.failWaiting(key, err));
      return null;
    }
  }

  /** Waiting requests ordered FIFO within each adapter, adapters taken in turn after the last admitted one. */
  private admissionOrder(): ScheduledRequest<P>[] {
    const byAdapter = new Map<string, ScheduledRequest<P>[]>();
    for (const r of this.waiting) {
      const k = r.req.adapterKey ?? '';
      const list = byAdapter.get(k) ?? [];
      list.push(r);
      byAdapter.set(k, list);
    }
    const keys = [...byAdapter.keys()];
    const start = this.lastAdmittedAdapter === null ? 0 : (keys.indexOf(this.lastAdmittedAdapter) + 1) % keys.length;
    const rotated = [...keys.slice(start), ...keys.slice(0, start)];
    const out: ScheduledRequest<P>[] = [];
    for (let round = 0; out.length < this.waiting.length; round++) {
      for (const k of rotated) {
        const r = byAdapter.get(k)![round];
        if (r) out.push(r);
      }
    }
    return out;
  }

  /** The request leaves the batch: its row, its block reservation and its adapter lease go back. */
  private retire(r: ScheduledRequest<P>): void {
    const i = this.running.indexOf(r);
    if (i < 0) return;
    this.running.splice(i, 1);
    this.freeRows.push(r.seq.kvRow);
    this.freedRows.push(r.seq.kvRow);
    r.seq.kvRow = -1;
    this.reserved -= r.reservedBlocks;
    r.reservedBlocks = 0;
    r.lease?.release();
    r.lease = null;
  }
}

/**
 * INVALID_ARGUMENT rather than FAILED_PRECONDITION: no change of the server's state makes a retry succeed; the
 * request's own choices (its adapter, adapter_scale or mix weights) are what must change.
 */
function nonFiniteLogitsError(req: GenerationRequest, generatedToken: number): LoraplexError {
  const who = req.adapterLabel ?? (req.adapterKey === null ? 'the base model' : `adapter_id ${JSON.stringify(req.adapterKey)}`);
  return new LoraplexError('INVALID_ARGUMENT', `${who}: logits became non-finite at generated token ${generatedToken}; the adapter's weights are unusable`);
}
