import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { makeRandomAdapter, writePeftAdapter, type PeftAdapter } from '../../src/adapters/peft.js';
import { readModelSpec } from '../../src/models/config.js';
import { collect, failure, startTestServer, type TestServer } from '../helpers/server.js';
import { STORIES } from '../helpers/engine.js';

const spec = readModelSpec(STORIES);
const text = (value: string) => ({ case: 'text' as const, value });
const greedy = (maxNewTokens: number) => ({ temperature: 0, maxNewTokens });
const ALL = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'];
const LONG_PROMPT = 'Once upon a time there was a little girl named Lily who loved to play in the park with her big red ball and her dog';
const BASE_PROMPTS = Array.from({ length: 20 }, (_, i) => ['Tom', 'The cat sat', 'One day a bird', 'Lily was happy'][i % 4]! + ' and'.repeat(i % 5));

let s: TestServer;
const expected: number[][] = [];
before(async () => {
  s = await startTestServer();
  // What a fresh server answers, before anything could have been left behind.
  for (const p of BASE_PROMPTS) expected.push((await collect(s.inference.generate({ prompt: text(p), sampling: greedy(12) }))).tokenIds);
  const write = (id: string, a: PeftAdapter) => writePeftAdapter(join(s.adapterRoot, id), a);
  const huge = makeRandomAdapter(spec, { r: 4, alpha: 8, targetModules: ALL, seed: 1 });
  for (const m of huge.modules) if (m.module.endsWith('o_proj')) m.b.fill(3e38);
  write('huge-b', huge);
  write('huge-alpha', { ...makeRandomAdapter(spec, { r: 4, alpha: 1e30, targetModules: ALL, seed: 2 }), alpha: 1e30, scaling: 1e30 / 4 });
});
after(async () => {
  await s.close();
});

test('adapters with finite but absurd weights are refused at load, naming the module and the figures', async () => {
  for (const id of ['huge-b', 'huge-alpha']) {
    const f = await failure(s.adapters.loadAdapter({ adapterId: id }));
    assert.equal(f.code, grpc.status.INVALID_ARGUMENT, f.details);
    assert.match(f.details, new RegExp(`^adapter_id "${id}": module model\\.layers\\.\\d+\\.\\S+: the adapter's effect .* times the base weight's`));
  }
});

/**
 * The report's own adapter, served as if the load-time bound did not exist: without base norms only finiteness is
 * checked (the manager's limits share the compiled layout's module objects), so the run-time defences are what
 * is tested. The same holds for what no load-time check can see, such as a mix weighted up to 1000.
 */
function withoutLoadBound(): void {
  for (const m of s.server.app.compiled.layout.loraModules) delete m.baseNorm;
}

test('a request whose logits turn non-finite fails with its adapter named; 20 later base requests are untouched', async () => {
  withoutLoadBound();
  const f = await failure(collect(s.inference.generate({ prompt: text(LONG_PROMPT), adapterId: 'huge-b', sampling: greedy(8) })));
  assert.equal(f.code, grpc.status.INVALID_ARGUMENT, f.details);
  assert.match(f.details, /^adapter_id "huge-b": logits became non-finite at generated token 1; the adapter's weights are unusable$/);
  // One at a time, so each reuses the cache row the poisoned request left (rows are handed out last-freed first).
  for (let i = 0; i < BASE_PROMPTS.length; i++) {
    const r = await collect(s.inference.generate({ prompt: text(BASE_PROMPTS[i]!), sampling: greedy(12) }));
    assert.deepEqual(r.tokenIds, expected[i], `base request ${i} after the poisoned one`);
  }
});

test('a poisoned request running beside a base request leaves the base tokens as they are alone (batched decode: test/engine/isolation.test.ts)', async () => {
  withoutLoadBound();
  const alone = (await collect(s.inference.generate({ prompt: text('Tom and Lily'), sampling: greedy(24) }))).tokenIds;
  const base = collect(s.inference.generate({ prompt: text('Tom and Lily'), sampling: greedy(24) }));
  const poisoned = failure(collect(s.inference.generate({ prompt: text('Once upon'), adapterId: 'huge-b', sampling: greedy(24) })));
  assert.equal((await poisoned).code, grpc.status.INVALID_ARGUMENT);
  assert.deepEqual((await base).tokenIds, alone);
});
