import { join } from 'node:path';
import { writeFileAtomic } from './safetensors.js';

/**
 * Working tokenizer.json / tokenizer_config.json files for random-weight test models, loadable by
 * @huggingface/tokenizers and transformers alike. Merges are learned deterministically from SAMPLE_TEXT,
 * so the same vocabulary size always yields byte-identical files.
 */

/** A small English sample (written for this project) to learn BPE merges from. */
export const SAMPLE_TEXT = `Once upon a time, in a small town near the sea, there lived a girl named Lily. She loved to play
outside with her dog, Max. Every morning they walked to the park, where the trees were tall and the grass
was green. One day, Lily found a shiny red ball under a bench. "Look, Max!" she said. "It's a ball!" Max
wagged his tail and barked. They played with the ball all day, and when the sun went down, they went home
happy and tired.

The next day it was raining. Lily looked out of the window and felt sad. "I want to go to the park," she
told her mother. Her mother smiled and said, "We can bake a cake instead." So they made a big chocolate
cake with eggs, milk, flour and sugar. Lily helped to mix everything in a bowl. When the cake was ready,
they shared it with their neighbor, an old man who lived alone. He was very thankful, and he told them a
story about a boat, a storm and a brave little bird.

Tom was a boy who liked to build things. He built a tower from blocks, a bridge from sticks and a house
for his cat. His friend Sara asked him, "How do you know where each block goes?" Tom thought for a moment.
"I try, and when it falls, I try again," he said. Sara laughed, and together they built the tallest tower
in the whole school. Their teacher took a picture and put it on the wall.

A computer program is a list of instructions. The machine reads each instruction and does what it says,
one step after another. Programs can add numbers, sort names, draw pictures or answer questions. When a
program has a bug, it does something nobody wanted. Good programmers write small tests, read error
messages carefully and change one thing at a time. They don't guess; they measure.

Language models read text as tokens. A token can be a whole word, a part of a word or a single byte. The
model looks at the tokens it has seen so far and predicts which token should come next. It repeats this
again and again until it writes an end token or reaches a limit. Small models are fast but make more
mistakes; large models are slow but usually write better answers.

In 1969, people walked on the moon for the first time. The trip took about 3 days, and the astronauts
stayed for 21 hours. They brought back 22 kilograms of rocks. Today, more than 50 years later, scientists
still study those rocks to learn how the moon was made.

Water boils at 100 degrees and freezes at 0 degrees. Plants need water, light and air to grow. Bees carry
pollen from one flower to another, and birds eat the seeds and drop them far away. In the forest, every
animal has a place: the owl hunts at night, the squirrel hides nuts for the winter, and the deer walks
quietly between the trees.

"Can I have some more soup, please?" asked the little bear. "Of course," said his father, and he filled
the bowl again. The bear ate slowly, because the soup was hot. Outside, the snow kept falling, and the
wind sang in the chimney. It was the best evening of the whole year.

Questions are good. Why is the sky blue? Why do cats purr? How far away are the stars? Some questions have
simple answers, and some take many years to answer. The important thing is to keep asking, to listen to
the answers, and to share what you learn with your friends.
`;

/** A TinyLlama/Zephyr-style chat template: role markers, eos after each turn, optional generation prompt. */
export const SIMPLE_CHAT_TEMPLATE =
  "{% for message in messages %}" +
  "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + eos_token + '\\n' }}" +
  "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + eos_token + '\\n' }}" +
  "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + eos_token + '\\n' }}" +
  "{% endif %}{% endfor %}" +
  "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}";

export type SyntheticTokenizerKind = 'llama' | 'gpt2';

export interface SyntheticTokenizerOptions {
  kind: SyntheticTokenizerKind;
  /** Exact vocabulary size; never-merged filler tokens pad it out when the sample runs out of merges. */
  vocabSize: number;
  /** true for SIMPLE_CHAT_TEMPLATE, a string for a custom jinja template; default none. */
  chatTemplate?: boolean | string;
  modelMaxLength?: number;
}

export interface SyntheticTokenizer {
  tokenizerJson: Record<string, unknown>;
  tokenizerConfig: Record<string, unknown>;
  vocabSize: number;
  bosTokenId: number;
  eosTokenId: number;
  unkTokenId: number | null;
  /** How many merges were learned (the rest of the vocabulary past base symbols is filler). */
  mergeCount: number;
}

/**
 * Greedy BPE training: repeatedly merge the most frequent adjacent pair inside words (ties broken by the
 * pair's strings, so the result is deterministic). Stops at maxMerges or when every word is one token.
 */
function learnMerges(words: Map<string, number>, known: Set<string>, maxMerges: number): [string, string][] {
  const entries = [...words.entries()].sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
  const seqs = entries.map(([w]) => Array.from(w));
  const freqs = entries.map(([, c]) => c);
  const merges: [string, string][] = [];
  let newTokens = 0;
  while (newTokens < maxMerges) {
    const counts = new Map<string, number>();
    for (let w = 0; w < seqs.length; w++) {
      const s = seqs[w]!;
      for (let i = 0; i + 1 < s.length; i++) {
        const key = s[i]! + '\u0000' + s[i + 1]!;
        counts.set(key, (counts.get(key) ?? 0) + freqs[w]!);
      }
    }
    // Pairs seen once are merged too: a few KB of text should still fill a few thousand tokens.
    let best: string | null = null;
    let bestCount = 0;
    for (const [key, c] of counts) {
      if (c > bestCount || (c === bestCount && best !== null && key < best)) {
        best = key;
        bestCount = c;
      }
    }
    if (best === null) break;
    const [a, b] = best.split('\u0000') as [string, string];
    merges.push([a, b]);
    if (!known.has(a + b)) {
      known.add(a + b);
      newTokens++;
    }
    for (const s of seqs) {
      for (let i = 0; i + 1 < s.length; i++) {
        if (s[i] === a && s[i + 1] === b) s.splice(i, 2, a + b);
      }
    }
  }
  return merges;
}

function byteToken(b: number): string {
  return `<0x${b.toString(16).toUpperCase().padStart(2, '0')}>`;
}

function llamaTokenizer(opts: SyntheticTokenizerOptions): SyntheticTokenizer {
  // SentencePiece style: a space becomes U+2581 and starts the next piece, so merges never cross words.
  // As SentencePiece does, pieces also break between letters, single digits and punctuation runs; the
  // U+2581 joins the first piece of each word.
  const words = new Map<string, number>();
  for (const w of SAMPLE_TEXT.split(/\s+/).filter(Boolean)) {
    const runs = w.match(/\p{L}+|\p{N}|[^\p{L}\p{N}]+/gu) ?? [];
    runs.forEach((r, i) => {
      const piece = i === 0 ? '\u2581' + r : r;
      words.set(piece, (words.get(piece) ?? 0) + 1);
    });
  }
  const charFreq = new Map<string, number>();
  for (let c = 0x21; c <= 0x7e; c++) charFreq.set(String.fromCharCode(c), 0);
  charFreq.set('\u2581', 0);
  for (const [w, n] of words) for (const ch of w) charFreq.set(ch, (charFreq.get(ch) ?? 0) + n);
  const baseChars = [...charFreq.entries()].sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1)).map(([c]) => c);

  const specials = ['<unk>', '<s>', '</s>'];
  const fixed = specials.length + 256 + baseChars.length;
  if (opts.vocabSize < fixed) throw new Error(`llama synthetic tokenizer needs vocabSize >= ${fixed}, got ${opts.vocabSize}`);
  const known = new Set<string>([...specials, ...baseChars]);
  const merges = learnMerges(words, known, opts.vocabSize - fixed);

  // Vocabulary layout as in Llama 2: specials, byte-fallback tokens, merged pieces, then single characters.
  const vocab: Record<string, number> = {};
  let size = 0;
  const add = (t: string) => {
    if (!(t in vocab)) vocab[t] = size++;
  };
  specials.forEach(add);
  for (let b = 0; b < 256; b++) add(byteToken(b));
  for (const [a, b] of merges) add(a + b);
  baseChars.forEach(add);
  for (let i = 0; size < opts.vocabSize; i++) add(`<extra_${i}>`);

  const special = (id: number, content: string) => ({
    id,
    content,
    single_word: false,
    lstrip: false,
    rstrip: false,
    normalized: false,
    special: true,
  });
  const tokenizerJson = {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: specials.map((s, i) => special(i, s)),
    // transformers' LlamaConverter with legacy=false: no normalizer, a Metaspace pre-tokenizer that adds
    // U+2581 only at the start of the text (not after every special token, as legacy Llama 2 files do).
    normalizer: null,
    pre_tokenizer: { type: 'Metaspace', replacement: '\u2581', prepend_scheme: 'first', split: false },
    post_processor: {
      type: 'TemplateProcessing',
      single: [{ SpecialToken: { id: '<s>', type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }],
      pair: [
        { SpecialToken: { id: '<s>', type_id: 0 } },
        { Sequence: { id: 'A', type_id: 0 } },
        { SpecialToken: { id: '<s>', type_id: 1 } },
        { Sequence: { id: 'B', type_id: 1 } },
      ],
      special_tokens: { '<s>': { id: '<s>', ids: [1], tokens: ['<s>'] } },
    },
    decoder: {
      type: 'Sequence',
      decoders: [
        { type: 'Replace', pattern: { String: '\u2581' }, content: ' ' },
        { type: 'ByteFallback' },
        { type: 'Fuse' },
        { type: 'Strip', content: ' ', start: 1, stop: 0 },
      ],
    },
    model: {
      type: 'BPE',
      dropout: null,
      unk_token: '<unk>',
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: true,
      byte_fallback: true,
      ignore_merges: false,
      vocab,
      merges,
    },
  };
  const tokenizerConfig: Record<string, unknown> = {
    add_bos_token: true,
    add_eos_token: false,
    added_tokens_decoder: Object.fromEntries(
      specials.map((s, i) => [String(i), { content: s, lstrip: false, normalized: false, rstrip: false, single_word: false, special: true }]),
    ),
    bos_token: '<s>',
    clean_up_tokenization_spaces: false,
    eos_token: '</s>',
    legacy: false,
    model_max_length: opts.modelMaxLength ?? 2048,
    pad_token: null,
    sp_model_kwargs: {},
    tokenizer_class: 'LlamaTokenizer',
    unk_token: '<unk>',
    use_default_system_prompt: false,
  };
  setChatTemplate(tokenizerConfig, opts.chatTemplate);
  return { tokenizerJson, tokenizerConfig, vocabSize: opts.vocabSize, bosTokenId: 1, eosTokenId: 2, unkTokenId: 0, mergeCount: merges.length };
}

/** GPT-2's reversible byte -> printable character map. */
export function gpt2BytesToUnicode(): string[] {
  const bs: number[] = [];
  for (let b = 0x21; b <= 0x7e; b++) bs.push(b);
  for (let b = 0xa1; b <= 0xac; b++) bs.push(b);
  for (let b = 0xae; b <= 0xff; b++) bs.push(b);
  const cs = [...bs];
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (!bs.includes(b)) {
      bs.push(b);
      cs.push(256 + n++);
    }
  }
  const map: string[] = new Array(256);
  bs.forEach((b, i) => (map[b] = String.fromCharCode(cs[i]!)));
  return map;
}

/** GPT-2's pre-tokenizer split. */
const GPT2_SPLIT = /'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+/gu;

function gpt2Tokenizer(opts: SyntheticTokenizerOptions): SyntheticTokenizer {
  const byteMap = gpt2BytesToUnicode();
  const encoder = new TextEncoder();
  const words = new Map<string, number>();
  for (const m of SAMPLE_TEXT.matchAll(GPT2_SPLIT)) {
    const w = Array.from(encoder.encode(m[0]), (b) => byteMap[b]!).join('');
    words.set(w, (words.get(w) ?? 0) + 1);
  }
  const eot = '<|endoftext|>';
  if (opts.vocabSize < 257) throw new Error(`gpt2 synthetic tokenizer needs vocabSize >= 257, got ${opts.vocabSize}`);
  // GPT-2's base order: the printable bytes first, then the remapped ones (what bytes_to_unicode lists).
  const base: string[] = [];
  for (let b = 0x21; b <= 0x7e; b++) base.push(byteMap[b]!);
  for (let b = 0xa1; b <= 0xac; b++) base.push(byteMap[b]!);
  for (let b = 0xae; b <= 0xff; b++) base.push(byteMap[b]!);
  for (let b = 0; b < 256; b++) if (!base.includes(byteMap[b]!)) base.push(byteMap[b]!);
  const known = new Set<string>(base);
  const merges = learnMerges(words, known, opts.vocabSize - 257);
  const vocab: Record<string, number> = {};
  let size = 0;
  const add = (t: string) => {
    if (!(t in vocab)) vocab[t] = size++;
  };
  base.forEach(add);
  for (const [a, b] of merges) add(a + b);
  for (let i = 0; size < opts.vocabSize - 1; i++) add(`<|extra_${i}|>`);
  add(eot);
  const eotId = opts.vocabSize - 1;
  const byteLevel = { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: true };
  const tokenizerJson = {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: [{ id: eotId, content: eot, single_word: false, lstrip: false, rstrip: false, normalized: true, special: true }],
    normalizer: null,
    pre_tokenizer: byteLevel,
    post_processor: { ...byteLevel, add_prefix_space: true, trim_offsets: false },
    decoder: { ...byteLevel, add_prefix_space: true },
    model: {
      type: 'BPE',
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: '',
      end_of_word_suffix: '',
      fuse_unk: false,
      byte_fallback: false,
      ignore_merges: false,
      vocab,
      merges,
    },
  };
  const tokenizerConfig: Record<string, unknown> = {
    add_bos_token: false,
    add_prefix_space: false,
    added_tokens_decoder: {
      [String(eotId)]: { content: eot, lstrip: false, normalized: true, rstrip: false, single_word: false, special: true },
    },
    bos_token: eot,
    clean_up_tokenization_spaces: false,
    eos_token: eot,
    model_max_length: opts.modelMaxLength ?? 1024,
    pad_token: null,
    tokenizer_class: 'GPT2Tokenizer',
    unk_token: eot,
  };
  setChatTemplate(tokenizerConfig, opts.chatTemplate);
  return { tokenizerJson, tokenizerConfig, vocabSize: opts.vocabSize, bosTokenId: eotId, eosTokenId: eotId, unkTokenId: null, mergeCount: merges.length };
}

function setChatTemplate(config: Record<string, unknown>, template: boolean | string | undefined): void {
  if (template === true) config['chat_template'] = SIMPLE_CHAT_TEMPLATE;
  else if (typeof template === 'string') config['chat_template'] = template;
}

export function makeSyntheticTokenizer(opts: SyntheticTokenizerOptions): SyntheticTokenizer {
  if (!Number.isSafeInteger(opts.vocabSize)) throw new Error(`vocabSize must be an integer, got ${opts.vocabSize}`);
  return opts.kind === 'llama' ? llamaTokenizer(opts) : gpt2Tokenizer(opts);
}

/** Writes tokenizer.json and tokenizer_config.json into dir (each atomically). */
export function writeSyntheticTokenizer(dir: string, tok: SyntheticTokenizer): void {
  writeFileAtomic(join(dir, 'tokenizer.json'), JSON.stringify(tok.tokenizerJson, null, 2) + '\n');
  writeFileAtomic(join(dir, 'tokenizer_config.json'), JSON.stringify(tok.tokenizerConfig, null, 2) + '\n');
}
