import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { loadTokenizer, Tokenizer, IncrementalDecoder } from '../../src/tokenizer/index.js';
import { byteLevelTokenizerJson } from './fixtures.js';

const STORIES = '/work/shared/models/stories260K';
const reference = JSON.parse(readFileSync(join(STORIES, 'reference.json'), 'utf8')) as {
  cases: { prompt_ids_with_bos: number[]; greedy_new_ids: number[]; greedy_text: string }[];
};
const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;

function rng(seed: number): () => number {
  // mulberry32: test-local so these tests do not depend on src/sampling.
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Streams ids through an IncrementalDecoder; returns the chunks (flush last). */
function stream(tok: Tokenizer, prompt: number[], ids: number[], skip: boolean): string[] {
  const dec = new IncrementalDecoder(tok, prompt, { skipSpecialTokens: skip });
  const out = ids.map((id) => dec.push(id));
  out.push(dec.flush());
  return out;
}

function expected(tok: Tokenizer, prompt: number[], ids: number[], skip: boolean): string {
  const p = tok.decode(prompt, { skipSpecialTokens: skip });
  const all = tok.decode([...prompt, ...ids], { skipSpecialTokens: skip });
  assert.ok(all.startsWith(p), `decode(prompt) ${JSON.stringify(p)} is not a prefix of ${JSON.stringify(all)}`);
  return all.slice(p.length);
}

function checkChunks(chunks: string[], label: string): void {
  for (const c of chunks) assert.ok(!LONE_SURROGATE.test(c), `${label}: lone surrogate in ${JSON.stringify(c)}`);
  // Only the final flush may end in U+FFFD (an incomplete sequence at the very end).
  for (const c of chunks.slice(0, -1)) assert.ok(!c.endsWith('\uFFFD'), `${label}: chunk ends in U+FFFD`);
}

const ITER = Number(process.env.INCR_ITER ?? 400);
const stories = await loadTokenizer(STORIES);
const byteLevel = new Tokenizer(byteLevelTokenizerJson(), {});

test('byte-fallback bytes produce a char only when complete', () => {
  const b = (x: number) => x + 3; // <0x00> is id 3 in the Llama layout
  const dec = new IncrementalDecoder(stories, [1]);
  assert.equal(dec.push(b(0xe2)), '');
  assert.equal(dec.push(b(0x82)), '');
  assert.equal(dec.push(b(0xac)), '€');
  assert.equal(dec.push(b(0xf0)), '');
  assert.equal(dec.push(b(0x9f)), '');
  assert.equal(dec.push(b(0x98)), '');
  assert.equal(dec.push(b(0x80)), '😀');
  assert.equal(dec.flush(), '');

  // Truly invalid / truncated: U+FFFD, but only once the bytes can no longer complete.
  const d2 = new IncrementalDecoder(stories, [1]);
  assert.equal(d2.push(b(0xe2)), '');
  assert.equal(d2.push(b(0x82)), '');
  assert.equal(d2.flush(), '\uFFFD');
  const d3 = new IncrementalDecoder(stories, [1]);
  assert.equal(d3.push(b(0x80)), ''); // lone continuation byte: held, it might be... invalid
  assert.equal(d3.push(403), '\uFFFD Once');
});

test('SentencePiece spaces: streamed reference continuation equals decode', () => {
  const c = reference.cases[0]!;
  const chunks = stream(stories, c.prompt_ids_with_bos, c.greedy_new_ids, true);
  assert.equal(chunks.join(''), c.greedy_text);
  assert.equal(chunks[1], ' there', 'leading space of a mid-text token is kept');
  // Without a prompt the first token's leading space is stripped, as decode() does.
  const noPrompt = stream(stories, [], [403, 407, 261, 378], true);
  assert.deepEqual(noPrompt, ['Once', ' upon', ' a', ' time', '']);
  // After a lone BOS the first word is the start of the text: no space.
  assert.equal(stream(stories, [1], [403, 407], true).join(''), 'Once upon');
});

test('real text round trips stream exactly, no U+FFFD', () => {
  const texts = ['é€😀', 'Once upon a time, é€😀 and 中文 text.\n  Indented  twice.', 'x😀😀y  z€', ' leading space', 'trailing  '];
  for (const tok of [stories, byteLevel]) {
    for (const t of texts) {
      const ids = tok.encode(t, { addSpecialTokens: false });
      for (const prompt of [[] as number[], tok.encode('Hi there.')]) {
        const chunks = stream(tok, prompt, ids, true);
        const joined = chunks.join('');
        assert.equal(joined, expected(tok, prompt, ids, true), JSON.stringify(t));
        if (prompt.length === 0) assert.equal(joined, t);
        assert.ok(!joined.includes('\uFFFD'));
        checkChunks(chunks, JSON.stringify(t));
      }
    }
  }
});

test('random id sequences: concatenation equals decode(all ids)', () => {
  const r = rng(1234);
  const pick = (tok: Tokenizer, n: number): number => {
    const u = r();
    if (tok === stories) {
      // Oversample byte tokens (ids 3..258; high bytes make multi-byte runs) and specials.
      if (u < 0.45) return 3 + 0x80 + Math.floor(r() * 128);
      if (u < 0.55) return 3 + Math.floor(r() * 128);
      if (u < 0.6) return Math.floor(r() * 3);
    } else if (u < 0.6) {
      return 0x80 + Math.floor(r() * 128);
    }
    return Math.floor(r() * n);
  };
  let cases = 0;
  for (const tok of [stories, byteLevel]) {
    for (let iter = 0; iter < ITER; iter++) {
      const len = 1 + Math.floor(r() * 30);
      const ids = Array.from({ length: len }, () => pick(tok, tok.vocabSize));
      // Real prompts come from encoding valid text, so they never end inside a character.
      let prompt: number[] = [];
      while (iter % 3 !== 0) {
        prompt = Array.from({ length: Math.floor(r() * 8) }, () => pick(tok, tok.vocabSize));
        const ends = (skip: boolean) => tok.decode(prompt, { skipSpecialTokens: skip }).endsWith('\uFFFD');
        if (!ends(true) && !ends(false)) break;
      }
      for (const skip of [true, false]) {
        const chunks = stream(tok, prompt, ids, skip);
        const want = expected(tok, prompt, ids, skip);
        assert.equal(chunks.join(''), want, `prompt=${JSON.stringify(prompt)} ids=${JSON.stringify(ids)} skip=${skip}`);
        checkChunks(chunks, JSON.stringify(ids));
        cases++;
      }
    }
  }
  assert.equal(cases, ITER * 4);
});

test('random valid UTF-8 text: streamed output never contains U+FFFD', () => {
  const r = rng(99);
  const pool = [...'abc xyz.,!\n\t', 'é', 'ß', '€', '中', '文', '😀', '👍🏽', '\u0301', '  '];
  for (const tok of [stories, byteLevel]) {
    for (let iter = 0; iter < 200; iter++) {
      const s = Array.from({ length: 1 + Math.floor(r() * 25) }, () => pool[Math.floor(r() * pool.length)]).join('');
      const ids = tok.encode(s, { addSpecialTokens: false });
      const prompt = tok.encode('Story:');
      const chunks = stream(tok, prompt, ids, true);
      assert.equal(chunks.join(''), expected(tok, prompt, ids, true));
      for (const c of chunks) assert.ok(!c.includes('\uFFFD'), JSON.stringify(s));
      checkChunks(chunks, JSON.stringify(s));
    }
  }
});

test('unknown (padded-vocab) ids decode to nothing instead of throwing', () => {
  const dec = new IncrementalDecoder(stories, [1]);
  assert.equal(dec.push(100000), '');
  assert.equal(dec.push(403), 'Once');
  assert.equal(stories.decode([100000]), '');
});
