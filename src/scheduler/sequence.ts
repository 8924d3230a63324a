import type { SamplingParams } from '../sampling/index.js';
import type { Tokenizer } from '../tokenizer/index.js';
import { TextOutput } from './output.js';
import { SequenceState } from './sequence-state.js';

export { NonFiniteLogits, type FinishReason } from './sequence-state.js';

export interface TokenEvent {
  /** The generated token, or null when a stop token ended generation (it is not part of the output). */
  tokenId: number | null;
  /** Text completed by this token (may be '' while a UTF-8 character or a possible stop string is pending). */
  text: string;
}

/**
 * A sequence with its own text, for callers that drive the engine themselves (runBatch: the CLI's generate,
 * tests): the scheduler's token state and output stage in one object.
 */
export class Sequence extends SequenceState {
  private readonly output: TextOutput;

  constructor(promptIds: number[], params: SamplingParams, tokenizer: Tokenizer, slot: number, eosTokenIds: readonly number[], maxModelLen: number) {
    super(promptIds, params, slot, eosTokenIds, maxModelLen);
    this.output = new TextOutput(tokenizer, promptIds, params.stopStrings);
  }

  get text(): string {
    return this.output.text;
  }

  /** Samples and detokenizes one step's logits; what to stream, or null while prefilling. Throws NonFiniteLogits. */
  accept(logits: Float32Array): TokenEvent | null {
    const sampled = this.sample(logits);
    if (!sampled) return null;
    const { text, stopped } = this.output.push(sampled);
    if (stopped) this.stopByString();
    return { tokenId: sampled.tokenId, text };
  }
}
