import assert from 'node:assert/strict';
import { test } from 'node:test';
import { mkdirSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { loadTrainData, parseJsonl, parseTxt, resolveDataPath } from '../../src/train/data.js';
import { removeDir, tempDir } from '../models/fixtures.js';
import { loraplexError } from './train-fixtures.js';

function makeRoot(): { root: string; outside: string; cleanup: () => void } {
  const base = tempDir('train-data');
  const root = join(base, 'root');
  const outside = join(base, 'outside');
  mkdirSync(join(root, 'sub'), { recursive: true });
  mkdirSync(outside);
  writeFileSync(join(root, 'a.txt'), 'First paragraph.\nStill first.\n\n\nSecond paragraph.\n');
  writeFileSync(join(root, 'sub', 'b.jsonl'), '{"text": "hello"}\n\n{"prompt": "Q: ", "completion": "A"}\n');
  writeFileSync(join(outside, 'secret.txt'), 'secret');
  symlinkSync(join(outside, 'secret.txt'), join(root, 'link-out.txt'));
  symlinkSync(outside, join(root, 'dir-out'));
  symlinkSync(join(root, 'a.txt'), join(root, 'link-in.txt'));
  return { root, outside, cleanup: () => removeDir(base) };
}

test('the data root cannot be escaped: .., absolute paths, symlinks pointing out', () => {
  const { root, cleanup } = makeRoot();
  try {
    const inv = (p: string, msg: string | RegExp) => assert.throws(() => resolveDataPath(root, p), loraplexError('INVALID_ARGUMENT', msg));
    inv('../x.txt', `path "../x.txt": must not contain '..'`);
    inv('sub/../../outside/secret.txt', /must not contain '\.\.'/);
    inv('sub\\..\\..\\x.txt', /must not contain '\.\.'/);
    inv('/etc/passwd', 'path "/etc/passwd": must be relative to the data root');
    inv('link-out.txt', 'path "link-out.txt": resolves outside the data root');
    inv('dir-out/secret.txt', 'path "dir-out/secret.txt": resolves outside the data root');
    inv('a.csv', 'path "a.csv": must be a .txt or .jsonl file');
    inv('', 'path: must not be empty');
    assert.throws(() => resolveDataPath(root, 'missing.txt'), loraplexError('NOT_FOUND', 'path "missing.txt": no such file under the data root'));
    mkdirSync(join(root, 'dir.txt'));
    inv('dir.txt', 'path "dir.txt": is not a regular file');
    assert.throws(() => resolveDataPath(root, 'a.txt', 'path', 10), loraplexError('INVALID_ARGUMENT', /path "a.txt": \d+ bytes exceed the limit of 10/));
    // Inside the root (also through a symlink that stays inside) is fine.
    assert.ok(resolveDataPath(root, 'a.txt').endsWith('a.txt'));
    assert.ok(resolveDataPath(root, './sub/b.jsonl').endsWith('b.jsonl'));
    assert.ok(resolveDataPath(root, 'link-in.txt').endsWith('a.txt'));
    // The messages never show the server's paths.
    try {
      resolveDataPath(root, 'link-out.txt');
    } catch (e) {
      assert.ok(!(e as Error).message.includes(root));
    }
    assert.throws(() => loadTrainData({ path: 'a.txt' }, {}), loraplexError('INVALID_ARGUMENT', /no data root configured/));
  } finally {
    cleanup();
  }
});

test('.txt is one stream by default (or blank-line paragraphs, whole document, lines); .jsonl takes each form', () => {
  const { root, cleanup } = makeRoot();
  try {
    assert.deepEqual(loadTrainData({ path: 'a.txt' }, { dataRoot: root }).train, [
      { kind: 'text', text: 'First paragraph.\nStill first.\n\n\nSecond paragraph.\n', stream: true },
    ]);
    assert.deepEqual(loadTrainData({ path: 'a.txt', textSplit: 'paragraph' }, { dataRoot: root }).train, [
      { kind: 'text', text: 'First paragraph.\nStill first.' },
      { kind: 'text', text: 'Second paragraph.' },
    ]);
    assert.deepEqual(loadTrainData({ path: 'a.txt', textSplit: 'document' }, { dataRoot: root }).train, [
      { kind: 'text', text: 'First paragraph.\nStill first.\n\n\nSecond paragraph.' },
    ]);
    assert.equal(loadTrainData({ path: 'a.txt', textSplit: 'line' }, { dataRoot: root }).train.length, 3);
    const d = loadTrainData({ path: 'sub/b.jsonl', evalExamples: [{ text: 'held out' }] }, { dataRoot: root });
    assert.deepEqual(d.train, [
      { kind: 'text', text: 'hello' },
      { kind: 'completion', prompt: 'Q: ', completion: 'A' },
    ]);
    assert.deepEqual(d.eval, [{ kind: 'text', text: 'held out' }]);
    assert.deepEqual(parseTxt('a\r\n\r\nb', 'paragraph'), [{ kind: 'text', text: 'a' }, { kind: 'text', text: 'b' }]);
    assert.throws(() => loadTrainData({ path: 'a.txt', textSplit: 'word' as 'line' }, { dataRoot: root }), loraplexError('INVALID_ARGUMENT', 'text_split "word": must be one of stream, paragraph, document, line'));
  } finally {
    cleanup();
  }
});

test('.jsonl errors name the line', () => {
  const bad = (content: string, msg: string | RegExp) => assert.throws(() => parseJsonl(content, 'path "d.jsonl"'), loraplexError('INVALID_ARGUMENT', msg));
  bad('{"text": "ok"}\n\n{"text": oops}\n', /^path "d.jsonl" line 3: not valid JSON/);
  bad('{"text": "ok"}\n[1, 2]\n', 'path "d.jsonl" line 2: must be an object with text, prompt + completion, or messages');
  bad('{"text": "a", "prompt": "b", "completion": "c"}', 'path "d.jsonl" line 1: must have exactly one of text, prompt + completion, or messages');
  bad('{}\n', 'path "d.jsonl" line 1: must have exactly one of text, prompt + completion, or messages');
  bad('{"text": ""}', 'path "d.jsonl" line 1.text: must not be empty');
  bad('{"text": 5}', 'path "d.jsonl" line 1.text: must be a string');
  bad('\n{"prompt": "p"}', 'path "d.jsonl" line 2.completion: is missing (prompt needs a completion)');
  bad('{"messages": [{"role": "user", "content": "hi"}]}', 'path "d.jsonl" line 1.messages: needs at least one assistant message (the loss is on assistant turns)');
  bad('{"messages": [{"role": "user", "content": 1}]}', 'path "d.jsonl" line 1.messages[0].content: must be a string');
  bad('{"messages": []}', 'path "d.jsonl" line 1.messages: must be a non-empty list');
  assert.equal(parseJsonl('{"completion": "only"}\r\n', 'x').length, 1);
});

test('inline examples and source fields are validated by name', () => {
  const inv = (input: Parameters<typeof loadTrainData>[0], msg: string, limits = {}) =>
    assert.throws(() => loadTrainData(input, limits), loraplexError('INVALID_ARGUMENT', msg));
  inv({}, 'examples: no training data; send examples or a path under the data root');
  inv({ examples: [{ text: 'a' }, { prompt: 'x' }] }, 'examples[1].completion: is missing (prompt needs a completion)');
  inv({ examples: [{ text: 'a' }], path: 'a.txt' }, 'examples and path: set one, not both');
  inv({ examples: [{ text: 'a' }, { text: 'b' }] }, 'examples: 2 examples exceed the limit of 1', { maxExamples: 1 });
  inv({ examples: [{ text: 'a' }], evalExamples: [{ messages: [{ role: '', content: 'x' }] }] }, 'eval_examples[0].messages[0].role: must be a non-empty string');
  const d = loadTrainData({ examples: [{ messages: [{ role: 'user', content: 'hi' }, { role: 'assistant', content: 'yo' }] }] }, {});
  assert.deepEqual(d, { train: [{ kind: 'chat', messages: [{ role: 'user', content: 'hi' }, { role: 'assistant', content: 'yo' }] }], eval: null });
});

test('a file over the size limit or not UTF-8 is refused', () => {
  const { root, cleanup } = makeRoot();
  try {
    writeFileSync(join(root, 'big.txt'), 'x'.repeat(2000));
    assert.throws(() => loadTrainData({ path: 'big.txt' }, { dataRoot: root, maxFileBytes: 1000 }), loraplexError('INVALID_ARGUMENT', 'path "big.txt": 2000 bytes exceed the limit of 1000'));
    writeFileSync(join(root, 'bin.txt'), Buffer.from([0x61, 0xff, 0xfe]));
    assert.throws(() => loadTrainData({ path: 'bin.txt' }, { dataRoot: root }), loraplexError('INVALID_ARGUMENT', 'path "bin.txt": is not valid UTF-8'));
    writeFileSync(join(root, 'empty.jsonl'), '\n\n');
    assert.throws(() => loadTrainData({ path: 'empty.jsonl' }, { dataRoot: root }), loraplexError('INVALID_ARGUMENT', 'path "empty.jsonl": holds no examples'));
  } finally {
    cleanup();
  }
});
