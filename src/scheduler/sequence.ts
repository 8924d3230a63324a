import type { SamplingParams } from '../sampling/index.js';
import { Sampler } from '../sampling/index.js';
import { IncrementalDecoder, StopStringMatcher, type Tokenizer } from '../tokenizer/index.js';

export type FinishReason = 'stop' | 'length';

/** Thrown by Sequence.accept when the row's logits hold NaN or Inf: a token sampled from them would be noise. */
export class NonFiniteLogits extends Error {
  /** 1-based index of the token that was being generated. */
  constructor(readonly generatedToken: number) {
    super(`logits became non-finite at generated token ${generatedToken}`);
    this.name = 'NonFiniteLogits';
  }
}

export interface TokenEvent {
  /** The generated token, or null when a stop token ended generation (it is not part of the output). */
  tokenId: number | null;
  /** Text completed by this token (may be '' while a UTF-8 character or a possible stop string is pending). */
  text: string;
}

/**
 * One generation request's state: waiting -> prefill (in chunks) -> decode -> done.
 * Owns its sampler, its incremental detokenizer and its stop-string matcher; knows its cache row and adapter slot.
 */
export class Sequence {
  /** Cache row while running, -1 otherwise. */
  kvRow = -1;
  /** Tokens already in the KV cache. */
  pastLen = 0;
  readonly tokenIds: number[] = [];
  text = '';
  finishReason: FinishReason | null = null;
  private readonly sampler: Sampler;
  private readonly decoder: IncrementalDecoder;
  private readonly stops: StopStringMatcher;
  private readonly stopIds: Set<number>;

  constructor(
    readonly promptIds: number[],
    readonly params: SamplingParams,
    tokenizer: Tokenizer,
    /** Adapter slot (0 = base model). */
    public slot: number,
    eosTokenIds: readonly number[],
    /** Cache capacity per row: generation ends with 'length' when it is full. */
    private readonly maxModelLen: number,
  ) {
    this.sampler = new Sampler(params, promptIds);
    this.decoder = new IncrementalDecoder(tokenizer, promptIds);
    this.stops = new StopStringMatcher(params.stopStrings);
    this.stopIds = new Set([...eosTokenIds, ...params.stopTokenIds]);
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

  /** Records that `count` fed tokens are now cached. */
  advance(count: number): void {
    this.pastLen += count;
  }

  /**
   * Samples from this row's logits (only after the whole prompt is cached); returns what to stream.
   * Throws NonFiniteLogits (and records nothing) when the logits hold NaN or Inf.
   */
  accept(logits: Float32Array): TokenEvent | null {
    if (this.prefilling || this.done) return null;
    const tokenId = this.sampler.next(logits);
    if (!this.sampler.lastLogitsFinite) throw new NonFiniteLogits(this.tokenIds.length + 1);
    if (this.stopIds.has(tokenId)) {
      this.finish('stop');
      return { tokenId: null, text: this.tailText() };
    }
    this.tokenIds.push(tokenId);
    const r = this.stops.push(this.decoder.push(tokenId));
    let text = r.text;
    if (r.stopped) this.finishReason = 'stop';
    else if (this.tokenIds.length >= this.params.maxNewTokens || this.pastLen + 1 >= this.maxModelLen) {
      this.finishReason = 'length';
      text += this.tailText();
    }
    this.text += text;
    return { tokenId, text };
  }

  /** Ends early (cancel, deadline, shutdown) with what was produced so far. */
  finish(reason: FinishReason): void {
    if (this.finishReason === null) this.finishReason = reason;
  }

  /** Pending text at the end: the rest of the detokenizer, then anything a stop-string prefix held back. */
  private tailText(): string {
    const r = this.stops.push(this.decoder.flush());
    const text = r.stopped ? r.text : r.text + this.stops.flush();
    this.text += text;
    return text;
  }
}
