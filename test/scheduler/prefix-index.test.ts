import { test } from 'node:test';
import assert from 'node:assert/strict';
import { PrefixIndex } from '../../src/scheduler/prefix-index.js';

const tokens = (n: number, seed = 0) => Array.from({ length: n }, (_, i) => (i * 31 + seed) % 500);

test('blocks are lcm(64, prefillChunk) tokens, so they end on both attention blocks and chunk boundaries', () => {
  assert.equal(new PrefixIndex(16, 1, 1).blockTokens, 64);
  assert.equal(new PrefixIndex(48, 1, 1).blockTokens, 192);
  assert.equal(new PrefixIndex(128, 1, 1).blockTokens, 128);
});

test('a chain names the adapter identity and every token before it; a lookup leaves one prompt token to prefill', () => {
  const index = new PrefixIndex(16, 10, 100 * 64 * 10);
  const chain = index.chain('base', tokens(128));
  assert.equal(chain.length, 2);
  assert.notDeepEqual(index.chain('other', tokens(128)), chain);
  assert.equal(index.chain('base', [...tokens(64), ...tokens(64, 1)])[0], chain[0]);
  assert.notEqual(index.chain('base', [...tokens(64), ...tokens(64, 1)])[1], chain[1]);
  assert.deepEqual(index.add(chain, 0), []);
  assert.deepEqual(index.add(chain, 1), []);
  // A 128-token prompt can reuse only the first block: its last token must be computed for the first logits.
  assert.deepEqual(index.lookup(chain, 128), [chain[0]]);
  assert.deepEqual(index.lookup(chain, 129), chain);
  assert.deepEqual({ queries: index.queries, hits: index.hits, hitTokens: index.hitTokens }, { queries: 2, hits: 2, hitTokens: 192 });
});

test('eviction is least recently used, tails before heads, and never a block\'s own ancestors', () => {
  const index = new PrefixIndex(64, 1, 2 * 64);
  const a = index.chain('base', tokens(192));
  assert.deepEqual(index.add(a, 0), []);
  assert.deepEqual(index.add(a, 1), []);
  // A third block of the same chain would have to evict its ancestors: not saved.
  assert.equal(index.add(a, 2), null);
  const b = index.chain('base', tokens(64, 7));
  assert.deepEqual(index.add(b, 0), [a[1]]);
  assert.deepEqual(index.lookup(a, 1000), [a[0]]);
  assert.equal(index.bytes, 2 * 64);
  index.forget([b[0]!]);
  assert.equal(index.has(b[0]!), false);
});

test('a budget below one block turns the cache off', () => {
  const index = new PrefixIndex(16, 100, 64 * 100 - 1);
  assert.equal(index.enabled, false);
  assert.equal(index.add(index.chain('base', tokens(64)), 0), null);
});
