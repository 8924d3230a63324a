/** The output stage: text and stop strings for sampled tokens, with the real tokenizer and no engine. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { OutputStage } from '../../src/scheduler/output.js';
import { loadTokenizer } from '../../src/tokenizer/index.js';
import { STORIES } from '../helpers/engine.js';

test('streamed text equals the decoded tokens; a length finish flushes what was held back', async () => {
  const tokenizer = await loadTokenizer(STORIES);
  const prompt = tokenizer.encode('Once upon a time');
  const tokens = tokenizer.encode('there was a little girl named Lily', { addSpecialTokens: false });
  // A stop-string prefix at the very end is held back until the finish.
  const out = new OutputStage(tokenizer).open(prompt, ['Lily!']);
  const texts = tokens.map((t, i) => out.push({ tokenId: t, finish: i === tokens.length - 1 ? 'length' : null }));
  assert.ok(texts.every((t) => !t.stopped));
  assert.equal(texts.map((t) => t.text).join(''), ' there was a little girl named Lily');
  assert.equal(texts.at(-1)!.text.endsWith('Lily'), true, 'the held-back prefix comes with the last token');
  assert.equal(out.text, ' there was a little girl named Lily');
});

test('a stop string ends the text before it; a stop token flushes the rest', async () => {
  const tokenizer = await loadTokenizer(STORIES);
  const prompt = tokenizer.encode('Once upon a time');
  const tokens = tokenizer.encode('there was a cat. The cat', { addSpecialTokens: false });
  const stage = new OutputStage(tokenizer);
  const stopped = stage.open(prompt, ['cat.']);
  let text = '';
  let at = -1;
  for (const [i, t] of tokens.entries()) {
    const r = stopped.push({ tokenId: t, finish: null });
    text += r.text;
    if (r.stopped) {
      at = i;
      break;
    }
  }
  assert.ok(at > 0 && at < tokens.length - 1);
  assert.equal(text, ' there was a ');

  const held = stage.open(prompt, ['cat!']);
  const parts = tokens.map((t) => held.push({ tokenId: t, finish: null }).text);
  assert.ok(!parts.join('').endsWith('cat'), 'a possible stop string is held back');
  const end = held.push({ tokenId: null, finish: 'stop' });
  assert.deepEqual(end, { text: 'cat', stopped: false });
  assert.equal(held.text, ' there was a cat. The cat');
});
