import type { PrefixOps } from '../engine/prefix-cache.js';
import type { StepRow } from '../engine/runtime.js';
import type { LoraplexError } from '../errors.js';
import type { GenerationRequest, AdapterLease } from './types.js';
import type { SequenceState } from './sequence-state.js';

/** A request inside the scheduler core; `P` is what the runner keeps with it (its stream, its text, timings). */
export interface ScheduledRequest<P> {
  readonly seq: SequenceState;
  readonly req: GenerationRequest;
  readonly payload: P;
  /** Held from admission until the request leaves the batch. */
  lease: AdapterLease | null;
  /** Set when the request must leave at the next plan (cancel, deadline, drain). */
  abort: LoraplexError | null;
  /** Took a cache row once (the runner reports only admitted requests to metrics). */
  admitted: boolean;
  /** The prefix-block chain of its prompt, set when its prefill starts (null before, or without a prefix cache). */
  prefixChain: string[] | null;
  /** KV cache blocks reserved for it from admission until it leaves (0 without block accounting). */
  reservedBlocks: number;
}

/** One request's part of a step: the row the engine computes for it. */
export interface PlannedRow<P> {
  request: ScheduledRequest<P>;
  row: StepRow;
}

/** A request that left: finished (error null), or ended with an error (aborted, failed load, bad logits). */
export interface Departure<P> {
  request: ScheduledRequest<P>;
  error: Error | null;
}

/**
 * What the next engine step computes, and what changed to get there (vLLM's SchedulerOutput). Today a plan is
 * either a decode step (all running rows, one token each) or one prefill chunk; a mixed step fills both.
 */
export interface StepPlan<P> {
  /** Requests that took a row (and their adapter lease) for this step. */
  admitted: ScheduledRequest<P>[];
  /** Requests that left before the step: cancelled, past their deadline, drained, or whose adapter failed. */
  departed: Departure<P>[];
  /** Decode rows, in logits order. */
  decode: PlannedRow<P>[];
  /** One prompt chunk at its fixed position; its logits row follows the decode rows. */
  prefill: PlannedRow<P> | null;
  /** Cached prefix blocks the step restores before its pass, saves after it, and drops (evicted). */
  prefix: PrefixOps | null;
  /** The prefill's prompt was looked up in the prefix cache at this plan: the tokens it restored (0 = a miss). */
  prefixLookup: { hitTokens: number } | null;
}

export type StepPhase = 'decode' | 'prefill';

/** The engine rows of a plan, in the order apply() reads the logits. */
export function stepRows<P>(plan: StepPlan<P>): StepRow[] {
  const rows = plan.decode.map((r) => r.row);
  if (plan.prefill) rows.push(plan.prefill.row);
  return rows;
}
