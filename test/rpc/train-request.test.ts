import assert from 'node:assert/strict';
import { test } from 'node:test';
import { create } from '@bufbuild/protobuf';
import { TextSplit, TrainRequestSchema } from '../../src/gen/loraplex/v1/train_pb.js';
import { dataSourceInput } from '../../src/rpc/train-handlers.js';
import { DEFAULT_TEXT_SPLIT, TEXT_SPLITS } from '../../src/train/data.js';

test('text_split: every TextSplit value maps to a split; unset is the one-stream default', () => {
  const split = (textSplit: TextSplit) => dataSourceInput(create(TrainRequestSchema, { path: 'a.txt', textSplit })).textSplit;
  assert.equal(split(TextSplit.UNSPECIFIED), '');
  assert.equal(DEFAULT_TEXT_SPLIT, 'stream');
  const named = Object.values(TextSplit).filter((v): v is TextSplit => typeof v === 'number' && v !== TextSplit.UNSPECIFIED);
  assert.deepEqual(named.map(split).sort(), [...TEXT_SPLITS].sort());
  assert.equal(split(TextSplit.STREAM), 'stream');
  assert.equal(split(TextSplit.PARAGRAPH), 'paragraph');
});
