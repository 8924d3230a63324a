import type { Tokenizer } from './tokenizer.js';

const REPLACEMENT = '\uFFFD';
// Prompt tokens kept as left context: enough for decoders whose output for a token
// depends on its neighbours (leading-space strip, byte runs), small enough to be cheap.
const INITIAL_CONTEXT = 6;
const MAX_INITIAL_CONTEXT = 64;

export interface IncrementalDecoderOptions {
  /** Default true: a streamed completion should not show <s>/</s>. */
  skipSpecialTokens?: boolean;
}

/**
 * Streams text for generated ids so that the concatenation of every push() and the
 * final flush() equals decode(promptIds ++ ids) minus decode(promptIds) (or decode(ids)
 * without a prompt), and no chunk ends in half a UTF-8 character.
 *
 * The window technique (as in TGI/vLLM/tokenizers' DecodeStream): decode ids[prefix..]
 * and ids[prefix..read] and emit the difference. Decoding with left context keeps the
 * SentencePiece leading space and byte-fallback runs right; holding back while the text
 * ends in U+FFFD waits for the rest of a multi-byte character.
 */
export class IncrementalDecoder {
  private readonly tokenizer: Tokenizer;
  private readonly skip: boolean;
  /** Ids from the window start onward; older ids are dropped to keep work O(window). */
  private ids: number[];
  /** ids[0..read) is text already emitted (or prompt); ids[read..] is pending. */
  private read: number;
  private prefixText: string;
  private finished = false;

  constructor(tokenizer: Tokenizer, promptIds: readonly number[] = [], opts: IncrementalDecoderOptions = {}) {
    this.tokenizer = tokenizer;
    this.skip = opts.skipSpecialTokens ?? true;
    // Start the context window on a char boundary with visible text, so the decoder's
    // first-token rules (e.g. stripping one leading space) hit the context, not new text.
    let start = Math.max(0, promptIds.length - INITIAL_CONTEXT);
    let text = this.decode(promptIds.slice(start));
    while (start > 0 && promptIds.length - start < MAX_INITIAL_CONTEXT && (text === '' || text.startsWith(REPLACEMENT))) {
      start--;
      text = this.decode(promptIds.slice(start));
    }
    this.ids = promptIds.slice(start);
    this.read = this.ids.length;
    this.prefixText = text;
  }

  private decode(ids: readonly number[]): string {
    return this.tokenizer.decode(ids, { skipSpecialTokens: this.skip });
  }

  /** Adds one generated id; returns the newly completed text (often '', never a broken char). */
  push(id: number): string {
    if (this.finished) throw new Error('IncrementalDecoder.push after flush');
    this.ids.push(id);
    const text = this.decode(this.ids);
    // Not longer yet (special token, or bytes still merging), or ends in an incomplete char.
    if (text.length <= this.prefixText.length || text.endsWith(REPLACEMENT)) return '';
    // startsWith holds for every decoder we know; if not, cut by length like vLLM does.
    const delta = text.slice(this.prefixText.length);
    // Next window starts at the ids just completed: they are the new left context.
    this.ids = this.ids.slice(this.read);
    this.read = this.ids.length;
    this.prefixText = this.decode(this.ids);
    return delta;
  }

  /** Emits whatever is still held (an incomplete byte sequence becomes U+FFFD). */
  flush(): string {
    if (this.finished) return '';
    this.finished = true;
    if (this.ids.length === this.read) return '';
    const text = this.decode(this.ids);
    return text.length > this.prefixText.length ? text.slice(this.prefixText.length) : '';
  }
}
