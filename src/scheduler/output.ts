import { IncrementalDecoder, StopStringMatcher, type Tokenizer } from '../tokenizer/index.js';
import type { SampledToken } from './sequence-state.js';

export interface TokenText {
  /** Text completed by this token (may be '' while a UTF-8 character or a possible stop string is pending). */
  text: string;
  /** A stop string matched: the text ends before it, and the sequence must end with 'stop'. */
  stopped: boolean;
}

/**
 * One request's text: the incremental detokenizer and the stop-string matcher, fed the sampled tokens in order.
 * Stop strings live here, outside the scheduler (as in vLLM v1's output processor); the scheduler ends the
 * sequence when told `stopped`.
 */
export class TextOutput {
  /** Everything streamed so far. */
  text = '';
  private readonly decoder: IncrementalDecoder;
  private readonly stops: StopStringMatcher;

  constructor(tokenizer: Tokenizer, promptIds: readonly number[], stopStrings: readonly string[]) {
    this.decoder = new IncrementalDecoder(tokenizer, promptIds);
    this.stops = new StopStringMatcher(stopStrings);
  }

  push(sampled: SampledToken): TokenText {
    if (sampled.tokenId === null) return this.emit({ text: this.tail(), stopped: false });
    const r = this.stops.push(this.decoder.push(sampled.tokenId));
    if (r.stopped) return this.emit({ text: r.text, stopped: true });
    return this.emit({ text: sampled.finish === null ? r.text : r.text + this.tail(), stopped: false });
  }

  private emit(t: TokenText): TokenText {
    this.text += t.text;
    return t;
  }

  /** Pending text at the end: the rest of the detokenizer, then anything a stop-string prefix held back. */
  private tail(): string {
    const r = this.stops.push(this.decoder.flush());
    return r.stopped ? r.text : r.text + this.stops.flush();
  }
}

/** The scheduler's output stage: owns the tokenizer, opens one TextOutput per request. */
export class OutputStage {
  constructor(private readonly tokenizer: Tokenizer) {}

  open(promptIds: readonly number[], stopStrings: readonly string[]): TextOutput {
    return new TextOutput(this.tokenizer, promptIds, stopStrings);
  }
}
