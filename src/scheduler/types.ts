import type { AdapterKey } from '../adapter-key.js';
import type { PrefixOps } from '../engine/prefix-cache.js';
import type { StepRow } from '../engine/runtime.js';
import type { SamplingParams, TokenLogprob } from '../sampling/index.js';
import type { FinishReason } from './sequence-state.js';

/** What the scheduler needs from the engine: one forward step at a time. */
export interface StepRunner {
  /** `freeRows`: rows of sequences that ended since the last step, whose cache blocks go back first. */
  step(rows: StepRow[], prefix?: PrefixOps, freeRows?: number[]): Promise<{ logits: Float32Array; kvBlocksUsed?: number }>;
  readonly vocabSize: number;
  /** KV cache blocks (of KV_BLOCK positions) rows can hold at once; without it admission counts rows only. */
  readonly kvBlocks?: number;
  /** K and V bytes of one cached token; without it there is no prefix cache. */
  readonly kvBytesPerToken?: number;
  /** Which load of its adapter a slot holds (see Engine.slotLoadId). */
  slotLoadId?(slot: number): number;
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
  tryAcquire(adapterKey: AdapterKey): Promise<AdapterLease | null>;
  /** A lease at once when the adapter is ready in a slot, else null; never waits. Without it, every lease goes through tryAcquire. */
  leaseReady?(adapterKey: AdapterKey): AdapterLease | null;
}

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
  /**
   * Bytes of prompt-prefix K/V kept for reuse (blocks of lcm(64, prefillChunk) tokens, LRU); 0 or absent = off.
   */
  prefixCacheBytes?: number;
}

export interface GenerationRequest {
  promptIds: number[];
  params: SamplingParams;
  /** null = the base model. */
  adapterKey: AdapterKey | null;
  adapterScale: number;
  /** Fires when the client cancels or its deadline passes; reason is a LoraplexError. */
  signal?: AbortSignal;
  /** Who the request is for: metrics and logs, and the salt of its prefix-cache blocks (never for scheduling order). */
  tenant?: string;
  /**
   * How errors name the adapter to the client, e.g. `adapter_id "x"` (never an internal key). Without it
   * messages show adapterKey as is, which is the client's id only when there is no tenancy.
   */
  adapterLabel?: string;
}

export type GenerationEvent =
  /** logprobs: one per token id, when the request asked for them. */
  | { type: 'token'; tokenIds: number[]; text: string; logprobs?: TokenLogprob[] }
  | { type: 'finished'; reason: FinishReason; promptTokens: number; generatedTokens: number; timings: Timings };

export interface Timings {
  queueSeconds: number;
  timeToFirstTokenSeconds: number;
  totalSeconds: number;
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
    adapterKey: string | null;
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
  /** A prompt looked up in the prefix cache: `hitTokens` restored (0 = miss); `bytes` now cached. */
  observePrefixLookup?(hitTokens: number, bytes: number): void;
  /** KV cache blocks: held by rows after the last step, reserved for running requests, and in the pool. */
  setKvBlocks?(state: { used: number; reserved: number; total: number }): void;
}

export interface SchedulerStats {
  waiting: number;
  running: number;
  freeRows: number;
  steps: number;
  lastDecodeBatch: number;
  /** Prompts looked up, those that restored a cached prefix, the tokens restored, and the bytes cached now. */
  prefixCache: { queries: number; hits: number; hitTokens: number; bytes: number };
  /** KV cache blocks held after the last step, reserved by running requests, and in the pool (0: not counted). */
  kvBlocks: { used: number; reserved: number; total: number };
}
