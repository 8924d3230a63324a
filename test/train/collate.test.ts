import assert from 'node:assert/strict';
import { test } from 'node:test';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, dirname, join } from 'node:path';
import {
  buildDataset,
  IGNORE_INDEX,
  microBatchesOfStep,
  packSequences,
  planSteps,
  tokenizeExamples,
  type CollateTokenizer,
} from '../../src/train/collate.js';
import { loadTrainData, parseTxt, type Example } from '../../src/train/data.js';
import { loadTokenizer, Tokenizer } from '../../src/tokenizer/tokenizer.js';
import { loraplexError, SHAKESPEARE, STORIES260K } from './train-fixtures.js';

const tok = await loadTokenizer(STORIES260K);
const shakespeare = readFileSync(SHAKESPEARE, 'utf8');
const sample: Example[] = parseTxt(shakespeare.slice(0, 20000), 'paragraph');

/** One char = one token (code + 3); BOS 1 added in front; EOS 2. Makes positions easy to reason about. */
const charTok: CollateTokenizer = {
  eosTokenId: 2,
  chatTemplate: null,
  encode: (text, opts) => {
    const raw = [...text].map((c) => c.codePointAt(0)! + 3);
    return (opts?.addSpecialTokens ?? true) ? [1, ...raw] : raw;
  },
  applyChatTemplate: () => {
    throw new Error('no template');
  },
};

test('tokenize: BOS as the tokenizer adds it, EOS appended, loss on all but the BOS for text', () => {
  const s = tokenizeExamples([{ kind: 'text', text: 'ab' }, { kind: 'text', text: 'c' }], charTok);
  assert.deepEqual([...s.ids], [1, 100, 101, 2, 1, 102, 2]);
  assert.deepEqual([...s.trained], [0, 1, 1, 1, 0, 1, 1]);
  assert.deepEqual(s.docStarts, [0, 4]);
  const real = tokenizeExamples([{ kind: 'text', text: 'Once upon a time' }], tok);
  assert.deepEqual([...real.ids], [...tok.encode('Once upon a time'), tok.eosTokenId]);
  assert.equal(real.ids[0], tok.bosTokenId);
});

test('packing preserves every token exactly once per epoch (inputs and targets)', () => {
  const stream = tokenizeExamples(sample, tok);
  const N = stream.ids.length;
  const L = 64;
  const packed = packSequences(stream, L, 0);
  assert.equal(packed.length, Math.ceil((N - 1) / L));
  const inputs: number[] = [];
  let targets = 0;
  packed.forEach((seq, k) => {
    for (let i = 0; i < L; i++) {
      if (i < seq.length) {
        inputs.push(seq.inputIds[i]!);
        const next = k * L + i + 1;
        assert.equal(seq.labels[i], stream.trained[next] ? stream.ids[next] : IGNORE_INDEX);
      } else {
        assert.equal(seq.labels[i], IGNORE_INDEX);
      }
      if (seq.labels[i] !== IGNORE_INDEX) targets++;
    }
  });
  // Inputs: tokens 0 .. N-2, in order, once; targets: every trained token after the first, once.
  assert.deepEqual(inputs, [...stream.ids.subarray(0, N - 1)]);
  assert.equal(targets, stream.trained.subarray(1).reduce((a, b) => a + b, 0));

  const ds = buildDataset({ train: sample, eval: null }, tok, { maxSeqLength: L, microBatchSize: 3, seed: 1, evalFraction: 0 });
  for (const epoch of [0, 1]) {
    const seen: number[] = [];
    for (const mb of ds.microBatches(epoch)) {
      mb.sequences.forEach((s, row) => {
        seen.push(s);
        const got = Array.from(mb.inputIds.subarray(row * L, (row + 1) * L), Number);
        assert.deepEqual(got, [...ds.train[s]!.inputIds]);
        assert.deepEqual(Array.from(mb.labels.subarray(row * L, (row + 1) * L), Number), [...ds.train[s]!.labels]);
      });
    }
    assert.deepEqual([...seen].sort((a, b) => a - b), ds.train.map((_, i) => i));
  }
  assert.equal(ds.stats.trainTargets, targets);
});

test('prompt tokens are masked: only the completion (and its EOS) is in the loss', () => {
  const prompt = 'Once upon a time, ';
  const completion = 'there was a big dog.';
  const s = tokenizeExamples([{ kind: 'completion', prompt, completion }], tok);
  const full = tok.encode(prompt + completion);
  assert.deepEqual([...s.ids], [...full, tok.eosTokenId]);
  const promptRaw = tok.encode(prompt, { addSpecialTokens: false });
  // The prompt's trailing '▁' merges into '▁there', which counts as completion.
  const firstTrained = s.trained.indexOf(1);
  assert.ok(firstTrained >= 1 && firstTrained <= promptRaw.length + 1);
  assert.ok(s.trained.subarray(0, firstTrained).every((x) => x === 0));
  assert.ok(s.trained.subarray(firstTrained).every((x) => x === 1));
  const trainedIds = [...s.ids].filter((_, i) => s.trained[i]);
  assert.equal(tok.decode(trainedIds, { skipSpecialTokens: true }).trim(), completion);
  assert.equal(trainedIds[trainedIds.length - 1], tok.eosTokenId);
  assert.ok(!tok.decode(trainedIds).includes('upon'));

  // Through packing: the labels hold exactly the completion tokens.
  const ds = buildDataset({ train: [{ kind: 'completion', prompt, completion }], eval: null }, tok, { maxSeqLength: 64, microBatchSize: 1, seed: 0, evalFraction: 0 });
  const labels = [...ds.train[0]!.labels].filter((l) => l !== IGNORE_INDEX);
  assert.deepEqual(labels, trainedIds);
  // Character-level: exactly the prompt's characters are masked.
  const c = tokenizeExamples([{ kind: 'completion', prompt: 'ab', completion: 'cd' }], charTok);
  assert.deepEqual([...c.trained], [0, 0, 0, 1, 1, 1]);
});

const ZEPHYR =
  "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}{% endfor %}" +
  "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}";

function chatTokenizer(template: string): Tokenizer {
  const json = JSON.parse(readFileSync(join(STORIES260K, 'tokenizer.json'), 'utf8'));
  const cfg = JSON.parse(readFileSync(join(STORIES260K, 'tokenizer_config.json'), 'utf8'));
  return new Tokenizer(json, cfg, { chatTemplate: template });
}

const conversation: Example = {
  kind: 'chat',
  messages: [
    { role: 'system', content: 'Be kind.' },
    { role: 'user', content: 'Tell me about the cat.' },
    { role: 'assistant', content: 'The cat was happy.' },
    { role: 'user', content: 'And the dog?' },
    { role: 'assistant', content: 'The dog ran home.' },
  ],
};

test('chat: rendered with the template, loss on the assistant turns only', () => {
  const ct = chatTokenizer(ZEPHYR);
  const s = tokenizeExamples([conversation], ct);
  assert.equal(s.chatFallbacks, 0);
  const rendered = ct.applyChatTemplate((conversation as Extract<Example, { kind: 'chat' }>).messages, { addGenerationPrompt: false });
  assert.deepEqual([...s.ids].slice(0, -1), ct.encode(rendered, { addSpecialTokens: false }));
  assert.equal(s.ids[0], ct.bosTokenId);
  // Trained runs: one per assistant turn (its content, the template's </s> and newline), plus the final EOS.
  const runs: number[][] = [];
  s.trained.forEach((t, i) => {
    if (t && (i === 0 || !s.trained[i - 1])) runs.push([]);
    if (t) runs[runs.length - 1]!.push(s.ids[i]!);
  });
  assert.equal(runs.length, 2);
  assert.match(ct.decode(runs[0]!), /^ ?The cat was happy\.<\/s>/);
  assert.match(ct.decode(runs[1]!), /^ ?The dog ran home\.<\/s>/);
  const trainedText = ct.decode([...s.ids].filter((_, i) => s.trained[i]));
  for (const word of ['kind', 'Tell', 'And', 'user', 'assistant']) assert.ok(!trainedText.includes(word), `${word} is trained`);
});

test('chat: a template that is not prefix-stable falls back to the text after the last user turn', () => {
  // The message count at the top changes with every prefix, so turns cannot be located.
  const ct = chatTokenizer('{{ messages|length }}' + ZEPHYR);
  const s = tokenizeExamples([conversation], ct);
  assert.equal(s.chatFallbacks, 1);
  const trainedText = ct.decode([...s.ids].filter((_, i) => s.trained[i]));
  assert.ok(trainedText.includes('The dog ran home.'));
  assert.ok(!trainedText.includes('The cat was happy.'));
  assert.ok(!trainedText.includes('And the dog'));
  // No template at all: refused by name.
  assert.throws(() => tokenizeExamples([conversation], tok), loraplexError('INVALID_ARGUMENT', 'examples[0].messages: the model has no chat template; send text or prompt + completion'));
});

test('the same seed gives the same batches; epochs and seeds reshuffle', () => {
  const opts = { maxSeqLength: 32, microBatchSize: 4, seed: 5, evalFraction: 0 };
  const a = buildDataset({ train: sample, eval: null }, tok, opts);
  const b = buildDataset({ train: sample, eval: null }, tok, opts);
  const c = buildDataset({ train: sample, eval: null }, tok, { ...opts, seed: 6 });
  assert.deepEqual([...a.microBatches(0)], [...b.microBatches(0)]);
  assert.deepEqual([...a.microBatches(3)], [...b.microBatches(3)]);
  assert.deepEqual(a.microBatch(2, 5), b.microBatch(2, 5));
  assert.notDeepEqual(a.epochOrder(0), c.epochOrder(0));
  assert.notDeepEqual(a.epochOrder(0), a.epochOrder(1));
  // Resuming mid-epoch continues with the same batches.
  assert.deepEqual([...a.microBatches(1, 7)], [...a.microBatches(1)].slice(7));
});

test('eval split: eval_fraction of the packed sequences, chosen by the seed; or a separate eval set', () => {
  const all = buildDataset({ train: sample, eval: null }, tok, { maxSeqLength: 32, microBatchSize: 4, seed: 5, evalFraction: 0 });
  const opts = { maxSeqLength: 32, microBatchSize: 4, seed: 5, evalFraction: 0.2 };
  const a = buildDataset({ train: sample, eval: null }, tok, opts);
  const b = buildDataset({ train: sample, eval: null }, tok, opts);
  const c = buildDataset({ train: sample, eval: null }, tok, { ...opts, seed: 9 });
  assert.equal(a.evalSet.length, Math.round(0.2 * all.train.length));
  assert.equal(a.train.length + a.evalSet.length, all.train.length);
  assert.deepEqual(a.evalSet, b.evalSet);
  assert.notDeepEqual(a.evalSet, c.evalSet);
  const key = (s: { inputIds: Int32Array }) => s.inputIds.join(',');
  const trainKeys = new Set(a.train.map(key));
  assert.ok(a.evalSet.every((s) => !trainKeys.has(key(s))));
  assert.deepEqual(new Set([...a.train, ...a.evalSet].map(key)), new Set(all.train.map(key)));
  const evalBatches = [...a.evalBatches()];
  assert.equal(evalBatches.length, Math.ceil(a.evalSet.length / 4));

  const sep = buildDataset({ train: sample, eval: [{ kind: 'text', text: 'To be or not to be.' }] }, tok, { ...opts, evalFraction: 0 });
  assert.equal(sep.evalSet.length, 1);
  assert.equal(sep.train.length, all.train.length);
  assert.throws(
    () => buildDataset({ train: sample, eval: [{ kind: 'text', text: 'x y' }] }, tok, opts),
    loraplexError('INVALID_ARGUMENT', 'eval_fraction 0.2: set eval_fraction or a separate eval set, not both'),
  );
  assert.throws(
    () => buildDataset({ train: [{ kind: 'text', text: 'Hi.' }], eval: null }, tok, { ...opts, evalFraction: 0.5 }),
    loraplexError('INVALID_ARGUMENT', /eval_fraction 0.5: leaves no training data/),
  );
  assert.throws(
    () => buildDataset({ train: [{ kind: 'completion', prompt: 'all prompt', completion: '' }], eval: null }, charTok, { ...opts, evalFraction: 0 }),
    loraplexError('INVALID_ARGUMENT', /no token is in the loss/),
  );
});

test('micro-batches: [batch, seq] int64; the last one pads rows and positions with mask 0 and label -100', () => {
  // 5 documents of 9 chars -> 5 * 11 = 55 tokens -> ceil(54 / 12) = 5 sequences, the last with 6 real positions.
  const docs: Example[] = Array.from({ length: 5 }, (_, i) => ({ kind: 'text', text: `document${i}` }));
  const ds = buildDataset({ train: docs, eval: null }, charTok, { maxSeqLength: 12, microBatchSize: 2, seed: 3, evalFraction: 0 });
  assert.equal(ds.train.length, 5);
  assert.equal(ds.microBatchesPerEpoch, 3);
  const batches = [...ds.microBatches(0)];
  const last = batches[2]!;
  assert.equal(last.rows, 1);
  assert.equal(last.inputIds.length, 2 * 12);
  assert.ok(last.inputIds instanceof BigInt64Array && last.labels instanceof BigInt64Array && last.attentionMask instanceof BigInt64Array);
  assert.ok(last.attentionMask.subarray(12).every((m) => m === 0n));
  assert.ok(last.labels.subarray(12).every((l) => l === -100n));
  const shortSeq = ds.train.findIndex((s) => s.length < 12);
  assert.equal(ds.train[shortSeq]!.length, 6);
  const withShort = batches.find((mb) => mb.sequences.includes(shortSeq))!;
  const row = withShort.sequences.indexOf(shortSeq);
  const mask = Array.from(withShort.attentionMask.subarray(row * 12, row * 12 + 12), Number);
  assert.deepEqual(mask, [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0]);
  for (const mb of batches) {
    assert.equal(mb.numTargets, [...mb.labels].filter((l) => l !== -100n).length);
    // Every attended position of a real row is real data; labels only where the mask is 1.
    mb.labels.forEach((l, i) => assert.ok(l === -100n || mb.attentionMask[i] === 1n));
  }
  assert.equal(batches.reduce((n, mb) => n + mb.numTargets, 0), ds.stats.trainTargets);
});

test('steps: ceil(micro-batches / accumulation) per epoch, max_steps overrides, position from the step', () => {
  const plan = planSteps(5, { gradientAccumulationSteps: 2, numEpochs: 2, maxSteps: 0 });
  assert.deepEqual(plan, { microBatchesPerEpoch: 5, stepsPerEpoch: 3, totalSteps: 6 });
  assert.deepEqual(microBatchesOfStep(0, plan, 2), { epoch: 0, batchIndices: [0, 1] });
  assert.deepEqual(microBatchesOfStep(2, plan, 2), { epoch: 0, batchIndices: [4] });
  assert.deepEqual(microBatchesOfStep(3, plan, 2), { epoch: 1, batchIndices: [0, 1] });
  assert.equal(planSteps(5, { gradientAccumulationSteps: 2, numEpochs: 2, maxSteps: 7 }).totalSteps, 7);
  assert.deepEqual(microBatchesOfStep(6, plan, 2), { epoch: 2, batchIndices: [0, 1] });
});

test('a .txt file is by default one stream: the packed rows are exactly the tokenizer\'s encoding of the whole text', () => {
  const root = mkdtempSync(join(tmpdir(), 'loraplex-stream-'));
  try {
    // Blank lines, a CRLF and a trailing newline: all kept (CRLF read as \n, as Python's text mode does).
    const text = `${shakespeare.slice(0, 3000)}\r\n\nEnd.\n`;
    writeFileSync(join(root, 'small.txt'), text);
    const data = loadTrainData({ path: 'small.txt' }, { dataRoot: root });
    const expected = tok.encode(text.replace(/\r\n/g, '\n')); // BOS once, no EOS: one document as the tokenizer encodes it
    assert.equal(expected[0], tok.bosTokenId);
    const L = 64;
    const ds = buildDataset(data, tok, { maxSeqLength: L, microBatchSize: 4, seed: 3, evalFraction: 0 });
    assert.equal(ds.stats.documents, 1);
    assert.equal(ds.stats.tokens, expected.length);
    assert.equal(ds.train.length, Math.ceil((expected.length - 1) / L));
    // Rows in order (the shuffle is of the batches, not of ds.train): inputs are the stream, labels the next token.
    ds.train.forEach((row, k) => {
      for (let i = 0; i < L; i++) {
        const at = k * L + i;
        if (i < row.length) {
          assert.equal(row.inputIds[i], expected[at], `row ${k} input ${i}`);
          assert.equal(row.labels[i], expected[at + 1], `row ${k} label ${i}`);
        } else assert.equal(row.labels[i], IGNORE_INDEX);
      }
    });
    assert.equal(ds.train.reduce((n, r) => n + r.length, 0), expected.length - 1);
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
});

test('the whole tiny Shakespeare file through the data root packs without losing a token', () => {
  const data = loadTrainData({ path: basename(SHAKESPEARE), textSplit: 'paragraph' }, { dataRoot: dirname(SHAKESPEARE) });
  assert.ok(data.train.length > 5000);
  const ds = buildDataset(data, tok, { maxSeqLength: 256, microBatchSize: 8, seed: 42, evalFraction: 0.05 });
  assert.equal(ds.stats.documents, data.train.length);
  assert.equal(ds.train.length + ds.evalSet.length, Math.ceil((ds.stats.tokens - 1) / 256));
  const realPositions = [...ds.train, ...ds.evalSet].reduce((n, s) => n + s.length, 0);
  assert.equal(realPositions, ds.stats.tokens - 1);
});
