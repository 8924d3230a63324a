import type { StepRow } from '../engine/runtime.js';
import type { SamplingParams } from '../sampling/index.js';
import { logprobsOf, Sampler, type TokenLogprob } from '../sampling/index.js';

export type FinishReason = 'stop' | 'length';

/** Thrown by SequenceState.sample when the row's logits hold NaN or Inf: a token sampled from them would be noise. */
export class NonFiniteLogits extends Error {
  /** 1-based index of the token that was being generated. */
  constructor(readonly generatedToken: number) {
    super(`logits became non-finite at generated token ${generatedToken}`);
    this.name = 'NonFiniteLogits';
  }
}

/** What one step sampled for a sequence, before any text exists. */
export interface SampledToken {
  /** The generated token, or null when a stop token ended generation (it is not part of the output). */
  tokenId: number | null;
  /** Set when this token ends the sequence by token ('stop') or by length; stop strings are the output stage's. */
  finish: FinishReason | null;
  /** The generated token's log-probability, when the request asked for logprobs (never for a stop token). */
  logprob?: TokenLogprob;
}

/**
 * One generation request's token state: waiting -> prefill (in chunks) -> decode -> done. Owns its sampler and
 * stop tokens, knows its cache row and adapter slot; knows no tokenizer (text is the output stage's).
 */
export class SequenceState {
  /** Cache row while running, -1 otherwise. */
  kvRow = -1;
  /** Tokens already in the KV cache. */
  pastLen = 0;
  readonly tokenIds: number[] = [];
  finishReason: FinishReason | null = null;
  private readonly sampler: Sampler;
  private readonly stopIds: Set<number>;
  /** The logits with the stop ids masked, while min_new_tokens holds them back. */
  private masked: Float32Array | null = null;

  constructor(
    readonly promptIds: number[],
    readonly params: SamplingParams,
    /** Adapter slot (0 = base model). */
    public slot: number,
    eosTokenIds: readonly number[],
    /** Cache capacity per row: generation ends with 'length' when it is full. */
    private readonly maxModelLen: number,
  ) {
    this.sampler = new Sampler(params, promptIds);
    this.stopIds = new Set([...(params.ignoreEos ? [] : eosTokenIds), ...params.stopTokenIds]);
  }

  get done(): boolean {
    return this.finishReason !== null;
  }

  get prefilling(): boolean {
    return this.pastLen < this.promptIds.length;
  }

  /** The tokens the next step feeds for this sequence: a prompt chunk, or the last sampled token. */
  nextInput(prefillChunk: number): number[] {
    if (this.prefilling) return this.promptIds.slice(this.pastLen, this.pastLen + prefillChunk);
    return [this.tokenIds[this.tokenIds.length - 1]!];
  }

  /** This sequence's row of the next engine step. */
  stepRow(prefillChunk: number, loraScale?: number): StepRow {
    const row: StepRow = { kvRow: this.kvRow, slot: this.slot, pastLen: this.pastLen, tokens: this.nextInput(prefillChunk) };
    if (loraScale !== undefined) row.loraScale = loraScale;
    return row;
  }

  /** Records that `count` fed tokens are now cached. */
  advance(count: number): void {
    this.pastLen += count;
  }

  /**
   * Samples from this row's logits (only after the whole prompt is cached). Throws NonFiniteLogits (and
   * records nothing) when the logits hold NaN or Inf.
   */
  sample(logits: Float32Array): SampledToken | null {
    if (this.prefilling || this.done) return null;
    const holdStops = this.tokenIds.length < (this.params.minNewTokens ?? 0);
    const tokenId = this.sampler.next(holdStops ? this.withoutStops(logits) : logits);
    // The masked copy's -Infinity entries are deliberate: judge the model's own row instead.
    if (holdStops ? !logits.every(Number.isFinite) : !this.sampler.lastLogitsFinite) throw new NonFiniteLogits(this.tokenIds.length + 1);
    if (this.stopIds.has(tokenId)) {
      this.finish('stop');
      return { tokenId: null, finish: 'stop' };
    }
    this.tokenIds.push(tokenId);
    if (this.tokenIds.length >= this.params.maxNewTokens || this.pastLen + 1 >= this.maxModelLen) this.finishReason = 'length';
    const topN = this.params.logprobs;
    return { tokenId, finish: this.finishReason, ...(topN !== undefined ? { logprob: logprobsOf(logits, tokenId, topN) } : {}) };
  }

  /** min_new_tokens: a copy of the logits in which no stop id can win (vLLM's MinTokensLogitsProcessor). */
  private withoutStops(logits: Float32Array): Float32Array {
    if (this.masked?.length !== logits.length) this.masked = new Float32Array(logits.length);
    this.masked.set(logits);
    for (const id of this.stopIds) if (id < logits.length) this.masked[id] = -Infinity;
    return this.masked;
  }

  /** A stop string ended the text at the last token: 'stop' even when that token also reached the length. */
  stopByString(): void {
    this.finishReason = 'stop';
  }

  /** Ends early (cancel, deadline, shutdown) with what was produced so far. */
  finish(reason: FinishReason): void {
    if (this.finishReason === null) this.finishReason = reason;
  }
}
