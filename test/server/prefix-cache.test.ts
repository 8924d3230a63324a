import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { makeRandomAdapter, writePeftAdapter } from '../../src/adapters/peft.js';
import { readModelSpec } from '../../src/models/config.js';
import { collect, startTestServer, type TestServer } from '../helpers/server.js';
import { STORIES, tempDir } from '../helpers/engine.js';

/**
 * Prefix reuse must be invisible in the output: every request here is compared with a server that has no prefix
 * cache. stories260K at prefillChunk 16: blocks of lcm(64, 16) = 64 tokens, 1280 K/V bytes per token.
 */
const spec = readModelSpec(STORIES);
const BLOCK_BYTES = 64 * 2 * spec.numLayers * spec.numKvHeads * spec.headDim * 4;
const SYSTEM = 'Once upon a time there was a little girl named Lily. She loved to play in the park with her big red ball. One day she met a dog who wanted to play too. '.repeat(5);
const QUESTIONS = ['Lily said', 'The dog ran to', 'Then the sun', 'Her mom called'];
const text = (value: string) => ({ case: 'text' as const, value });
const greedy = { temperature: 0, maxNewTokens: 10 };

interface Ask {
  prompt: string;
  adapterId?: string;
  adapterScale?: number;
  mix?: { adapterId: string; weight: number }[];
}
const ask = (a: Ask) => ({ prompt: text(a.prompt), sampling: greedy, ...(a.adapterId ? { adapterId: a.adapterId } : {}), ...(a.adapterScale !== undefined ? { adapterScale: a.adapterScale } : {}), ...(a.mix ? { adapters: a.mix } : {}) });
const run = async (s: TestServer, a: Ask) => (await collect(s.inference.generate(ask(a)))).tokenIds;
const stats = (s: TestServer) => s.server.app.scheduler.stats().prefixCache;

const ALL: Ask[] = [
  ...QUESTIONS.map((q) => ({ prompt: SYSTEM + q })),
  { prompt: SYSTEM + QUESTIONS[0], adapterId: 'a1' },
  { prompt: SYSTEM + QUESTIONS[0], adapterId: 'a1', adapterScale: 0.5 },
  { prompt: SYSTEM + QUESTIONS[0], adapterId: 'a2' },
  { prompt: SYSTEM + QUESTIONS[0], mix: [{ adapterId: 'a1', weight: 0.5 }, { adapterId: 'a2', weight: 0.5 }] },
  { prompt: 'Tom had a cat' },
];
const expected = new Map<Ask, number[]>();
let plain: TestServer;
let cached: TestServer;
let tiny: TestServer;

before(async () => {
  const common = { maxModelLen: 512 };
  [plain, cached, tiny] = await Promise.all([
    startTestServer({ ...common, prefixCacheBytes: 0 }),
    startTestServer({ ...common, prefixCacheBytes: 64 * BLOCK_BYTES }),
    startTestServer({ ...common, prefixCacheBytes: 2 * BLOCK_BYTES }),
  ]);
  for (const s of [plain, cached, tiny]) {
    for (const [i, id] of ['a1', 'a2'].entries()) writePeftAdapter(join(s.adapterRoot, id), makeRandomAdapter(spec, { r: 4, alpha: 8, targetModules: ['q_proj', 'k_proj', 'v_proj', 'o_proj'], seed: 11 + i }));
  }
  for (const a of ALL) expected.set(a, await run(plain, a));
});
after(async () => {
  await Promise.all([plain?.close(), cached?.close(), tiny?.close()]);
});

test('the prompts are long enough to reuse several blocks', async () => {
  const tokens = (await plain.server.app.tokenizer.encode(SYSTEM)).length;
  assert.ok(tokens >= 3 * 64 && tokens < 400, `${tokens} system-prompt tokens`);
});

test('a follow-up with the same system prompt restores it and answers exactly as without a cache', async () => {
  const [first, second] = [ALL[0]!, ALL[1]!];
  assert.deepEqual(await run(cached, first), expected.get(first));
  const before = stats(cached);
  assert.equal(before.hits, 0);
  assert.deepEqual(await run(cached, second), expected.get(second));
  const after = stats(cached);
  assert.equal(after.hits, 1);
  assert.ok(after.hitTokens >= 3 * 64 && after.hitTokens % 64 === 0, `${after.hitTokens} tokens restored`);
  assert.ok(after.bytes > 0 && after.bytes % BLOCK_BYTES === 0);
});

test('different adapters, scales and mixes never share blocks', async () => {
  for (const a of ALL.slice(4, 8)) {
    const hits = stats(cached).hits;
    assert.deepEqual(await run(cached, a), expected.get(a), JSON.stringify(a));
    assert.equal(stats(cached).hits, hits, `${JSON.stringify(a)} must not reuse another identity's prefix`);
  }
  // Each of them now has its own prefix: a second request of each reuses it, still exactly.
  for (const a of ALL.slice(4, 8)) {
    const hits = stats(cached).hits;
    assert.deepEqual(await run(cached, a), expected.get(a), JSON.stringify(a));
    assert.equal(stats(cached).hits, hits + 1, JSON.stringify(a));
  }
});

test('in a mixed batch with other requests and other adapters, reused prefixes give the same tokens', async () => {
  const hits = stats(cached).hits;
  const batch = [...ALL, ...ALL];
  const got = await Promise.all(batch.map((a) => run(cached, a)));
  got.forEach((tokens, i) => assert.deepEqual(tokens, expected.get(batch[i]!), JSON.stringify(batch[i])));
  assert.ok(stats(cached).hits > hits);
});

test('under a budget of two blocks, eviction keeps every answer exact', async () => {
  for (let round = 0; round < 2; round++) {
    for (const a of ALL) assert.deepEqual(await run(tiny, a), expected.get(a), `round ${round}: ${JSON.stringify(a)}`);
  }
  const got = await Promise.all(ALL.map((a) => run(tiny, a)));
  got.forEach((tokens, i) => assert.deepEqual(tokens, expected.get(ALL[i]!)));
  const st = stats(tiny);
  assert.ok(st.bytes <= 2 * BLOCK_BYTES, `${st.bytes} bytes cached`);
  assert.ok(st.hits > 0, 'the last-used prefix is still reused');
});

test('metrics count queries, hits, restored tokens and cached bytes', async () => {
  const st = stats(cached);
  const text = await cached.server.metrics.registry.metrics();
  const value = (name: string) => Number(new RegExp(`^${name} (\\S+)$`, 'm').exec(text)?.[1]);
  assert.equal(value('loraplex_prefix_cache_queries_total'), st.queries);
  assert.equal(value('loraplex_prefix_cache_hits_total'), st.hits);
  assert.equal(value('loraplex_prefix_cache_hit_tokens_total'), st.hitTokens);
  assert.equal(value('loraplex_prefix_cache_bytes'), st.bytes);
  assert.ok(st.hits > 0 && st.queries > st.hits);
});

test("tenants never share prefix blocks, even for the base model: another tenant's prompt stays unobservable", async () => {
  const dir = tempDir('prefix-keys');
  const apiKeysFile = join(dir, 'keys.yaml');
  const keys = { acme: 'acme-prefix-key-0123456789abcdef', globex: 'globex-prefix-key-0123456789abcdef' };
  writeFileSync(apiKeysFile, `keys:\n  - { key: ${keys.acme}, tenant: acme }\n  - { key: ${keys.globex}, tenant: globex }\n`);
  const s = await startTestServer({ maxModelLen: 512, prefixCacheBytes: 64 * BLOCK_BYTES, auth: 'required', apiKeysFile });
  try {
    const as = (who: keyof typeof keys) => {
      const metadata = new grpc.Metadata();
      metadata.set('authorization', `Bearer ${keys[who]}`);
      return { metadata };
    };
    const ask1 = ALL[0]!;
    const runAs = async (who: keyof typeof keys) => (await collect(s.inference.generate(ask(ask1), as(who)))).tokenIds;
    assert.deepEqual(await runAs('acme'), expected.get(ask1));
    assert.deepEqual(await runAs('globex'), expected.get(ask1));
    assert.equal(stats(s).hits, 0, "globex does not reuse acme's blocks");
    assert.deepEqual(await runAs('acme'), expected.get(ask1));
    assert.equal(stats(s).hits, 1, 'acme reuses its own');
  } finally {
    await s.close();
  }
});
