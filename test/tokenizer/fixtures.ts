/** Test fixtures shared by the tokenizer tests (not a test file itself). */

/** GPT-2's byte -> printable-char table. */
export function bytesToUnicode(): string[] {
  const bs: number[] = [];
  for (let b = 33; b <= 126; b++) bs.push(b);
  for (let b = 161; b <= 172; b++) bs.push(b);
  for (let b = 174; b <= 255; b++) bs.push(b);
  const cs = [...bs];
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (!bs.includes(b)) {
      bs.push(b);
      cs.push(256 + n++);
    }
  }
  const table = new Array<string>(256);
  bs.forEach((b, i) => (table[b] = String.fromCodePoint(cs[i]!)));
  return table;
}

/** A tiny GPT-2 style ByteLevel BPE tokenizer.json: 256 byte chars, a few merges, <|endoftext|>. */
export function byteLevelTokenizerJson(): Record<string, unknown> {
  const table = bytesToUnicode();
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
