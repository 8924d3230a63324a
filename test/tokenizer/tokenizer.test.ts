import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { mkdtemp, writeFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { loadTokenizer, Tokenizer, TokenizerError, ChatTemplateError } from '../../src/tokenizer/index.js';
import { byteLevelTokenizerJson } from './fixtures.js';

const STORIES = '/work/shared/models/stories260K';
const reference = JSON.parse(readFileSync(join(STORIES, 'reference.json'), 'utf8')) as {
  cases: { prompt: string; prompt_ids_with_bos: number[]; greedy_new_ids: number[]; greedy_text: string }[];
};

const CHATML =
  "{% for m in messages %}{% if m['role'] not in ['system','user','assistant'] %}{{ raise_exception('bad role ' + m['role']) }}{% endif %}" +
  "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}{% endfor %}" +
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

test('stories260K: encode matches llama2.c reference, BOS exactly once', async () => {
  const tok = await loadTokenizer(STORIES);
  const c = reference.cases[0]!;
  assert.deepEqual(tok.encode(c.prompt), c.prompt_ids_with_bos);
  assert.deepEqual(tok.encode(c.prompt, { addSpecialTokens: false }), c.prompt_ids_with_bos.slice(1));
  assert.equal(tok.bosTokenId, 1);
  assert.equal(tok.eosTokenId, 2);
  assert.equal(tok.vocabSize, 512);
  assert.equal(tok.idToToken(1), '<s>');
  assert.equal(tok.idToToken(403), '▁Once');
  assert.equal(tok.idToToken(99999), undefined);
  assert.deepEqual(tok.encode(''), [1]);
});

test('stories260K: decode of the reference greedy continuation', async () => {
  const tok = await loadTokenizer(STORIES);
  const c = reference.cases[0]!;
  const all = [...c.prompt_ids_with_bos, ...c.greedy_new_ids];
  assert.equal(tok.decode(all, { skipSpecialTokens: true }), c.prompt + c.greedy_text);
  assert.equal(tok.decode(c.greedy_new_ids), c.greedy_text);
  assert.equal(tok.decode([]), '');
  assert.equal(tok.decode([1, 403], { skipSpecialTokens: false }), '<s> Once');
  assert.equal(tok.decode([403, 2, 407], { skipSpecialTokens: true }), 'Once upon');
});

test('stories260K: byte fallback round trip for multi-byte text', async () => {
  const tok = await loadTokenizer(STORIES);
  for (const s of ['é€😀', 'naïve café — 中文 😀!', '  two  spaces\nand\ttab']) {
    const ids = tok.encode(s, { addSpecialTokens: false });
    assert.equal(tok.decode(ids), s);
  }
});

test('add_bos_token / add_eos_token flags override the post-processor without doubling', () => {
  const json = JSON.parse(readFileSync(join(STORIES, 'tokenizer.json'), 'utf8')) as Record<string, unknown>;
  const cfg = JSON.parse(readFileSync(join(STORIES, 'tokenizer_config.json'), 'utf8')) as Record<string, unknown>;
  const raw = [403, 407, 261, 378];
  assert.deepEqual(new Tokenizer(json, { ...cfg, add_bos_token: false }).encode('Once upon a time'), raw);
  assert.deepEqual(new Tokenizer(json, { ...cfg, add_eos_token: true }).encode('Once upon a time'), [1, ...raw, 2]);
  // No flags: the tokenizer.json post-processor (TemplateProcessing with <s>) decides.
  const { add_bos_token: _a, add_eos_token: _b, ...noFlags } = cfg;
  assert.deepEqual(new Tokenizer(json, noFlags).encode('Once upon a time'), [1, ...raw]);
  // Nothing at all: BOS still found from the post-processor.
  const bare = new Tokenizer(json, {});
  assert.equal(bare.bosTokenId, 1);
  assert.deepEqual(bare.encode('Once upon a time'), [1, ...raw]);
});

test('no chat template: clear error', async () => {
  const tok = await loadTokenizer(STORIES);
  assert.equal(tok.chatTemplate, null);
  assert.throws(
    () => tok.applyChatTemplate([{ role: 'user', content: 'hi' }], { addGenerationPrompt: true }),
    (e: unknown) => e instanceof ChatTemplateError && /no chat template/.test(e.message),
  );
});

test('missing tokenizer.json: error names the file', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'loraplex-tok-'));
  try {
    await assert.rejects(loadTokenizer(dir), (e: unknown) => e instanceof TokenizerError && /tokenizer\.json/.test(e.message));
  } finally {
    await rm(dir, { recursive: true });
  }
});

test('ByteLevel BPE: no BOS, round trip, merges used, chat template', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'loraplex-tok-'));
  try {
    await writeFile(join(dir, 'tokenizer.json'), JSON.stringify(byteLevelTokenizerJson()));
    // No tokenizer_config.json at first: must still load, EOS found by name.
    let tok = await loadTokenizer(dir);
    assert.equal(tok.bosTokenId, null);
    assert.equal(tok.eosTokenId, 261);
    assert.equal(tok.vocabSize, 262);
    const ids = tok.encode('hello he€');
    assert.equal(tok.decode(ids), 'hello he€');
    assert.ok(ids.includes(256 + 3), 'llo merge'); // "llo"
    assert.ok(ids.includes(256 + 1), 'Ġhe merge');
    assert.equal(ids[0], 'h'.charCodeAt(0), 'no BOS prepended');
    for (const s of ['é€😀 x', 'tab\tnew\nline', '']) assert.equal(tok.decode(tok.encode(s)), s);
    assert.equal(tok.decode([...tok.encode('hi'), 261], { skipSpecialTokens: true }), 'hi');
    assert.equal(tok.decode([...tok.encode('hi'), 261]), 'hi<|endoftext|>');

    await writeFile(
      join(dir, 'tokenizer_config.json'),
      JSON.stringify({ eos_token: '<|endoftext|>', bos_token: null, chat_template: CHATML }),
    );
    tok = await loadTokenizer(dir);
    const prompt = tok.applyChatTemplate(
      [
        { role: 'system', content: 'be brief' },
        { role: 'user', content: 'hi' },
      ],
      { addGenerationPrompt: true },
    );
    assert.equal(prompt, '<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n');
    assert.equal(tok.decode(tok.encodeChat([{ role: 'user', content: 'hi' }])), '<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n');
    assert.throws(
      () => tok.applyChatTemplate([{ role: 'robot', content: 'x' }]),
      (e: unknown) => e instanceof ChatTemplateError && /bad role robot/.test(e.message),
    );
  } finally {
    await rm(dir, { recursive: true });
  }
});

test('chat template from chat_template.jinja, bos_token variable', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'loraplex-tok-'));
  try {
    await writeFile(join(dir, 'tokenizer.json'), readFileSync(join(STORIES, 'tokenizer.json')));
    await writeFile(join(dir, 'tokenizer_config.json'), readFileSync(join(STORIES, 'tokenizer_config.json')));
    await writeFile(
      join(dir, 'chat_template.jinja'),
      '{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}',
    );
    const tok = await loadTokenizer(dir);
    assert.equal(tok.applyChatTemplate([{ role: 'user', content: 'hi' }]), '<s>[user] hi</s>[assistant]');
    const ids = tok.encodeChat([{ role: 'user', content: 'hi' }]);
    assert.equal(ids[0], 1);
    assert.notEqual(ids[1], 1, 'BOS from the template only, not doubled');
  } finally {
    await rm(dir, { recursive: true });
  }
});
