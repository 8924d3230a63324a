/** Test fixtures shared by the tokenizer tests (not a test file itself). */
import { gpt2BytesToUnicode } from '../../src/models/synthetic-tokenizer.js';

/** A tiny GPT-2 style ByteLevel BPE tokenizer.json: 256 byte chars, a few merges, <|endoftext|>. */
export function byteLevelTokenizerJson(): Record<string, unknown> {
  const table = gpt2BytesToUnicode();
  const vocab: Record<string, number> = {};
  table.forEach((c, b) => (vocab[c] = b));
  const G = table[0x20]!; // 'Ġ'
  const mergeList: [string, string][] = [
    [G, 'h'],
    [`${G}h`, 'e'],
    ['l', 'l'],
    ['ll', 'o'],
    // "€" is E2 82 AC -> 'â', 'Ĥ', '¬'
    [table[0xe2]!, table[0x82]!],
  ];
  for (const [a, b] of mergeList) vocab[a + b] = Object.keys(vocab).length;
  const eosId = Object.keys(vocab).length;
  vocab['<|endoftext|>'] = eosId;
  const bl = { add_prefix_space: false, trim_offsets: true, use_regex: true };
  return {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: [
      { id: eosId, content: '<|endoftext|>', single_word: false, lstrip: false, rstrip: false, normalized: false, special: true },
    ],
    normalizer: null,
    pre_tokenizer: { type: 'ByteLevel', ...bl },
    post_processor: { type: 'ByteLevel', ...bl },
    decoder: { type: 'ByteLevel', ...bl },
    model: {
      type: 'BPE',
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: '',
      end_of_word_suffix: '',
      fuse_unk: false,
      byte_fallback: false,
      vocab,
      merges: mergeList.map(([a, b]) => `${a} ${b}`),
    },
  };
}
