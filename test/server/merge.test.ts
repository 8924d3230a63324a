import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { existsSync, readFileSync } from 'node:fs';
import * as grpc from '@grpc/grpc-js';
import { makeRandomAdapter, writePeftAdapter } from '../../src/adapters/peft.js';
import { readModelSpec } from '../../src/models/config.js';
import { ExportDtype, MergeMethod } from '../../src/gen/loraplex/v1/adapters_pb.js';
import { collect, startTestServer, type TestServer } from '../helpers/server.js';
import { STORIES, tempDir } from '../helpers/engine.js';

const spec = readModelSpec(STORIES);
const text = (value: string) => ({ case: 'text' as const, value });
const greedy = (maxNewTokens: number) => ({ temperature: 0, maxNewTokens });
const code = (e: unknown) => (e as grpc.ServiceError).code;
const details = (e: unknown) => (e as grpc.ServiceError).details;

let s: TestServer;
let exportRoot: string;
before(async () => {
  exportRoot = tempDir('exports');
  // float32 base: the exported model must reproduce it exactly in tokens.
  s = await startTestServer({ exportRoot }, { kind: 'none' });
  const write = (id: string, r: number, targets: string[], seed: number) =>
    writePeftAdapter(join(s.adapterRoot, id), makeRandomAdapter(spec, { r, alpha: 2 * r, targetModules: targets, seed, bStd: 0.3 }));
  write('style-a', 4, ['q_proj', 'v_proj', 'down_proj'], 1);
  write('style-b', 4, ['q_proj', 'v_proj', 'down_proj'], 2);
  write('style-c', 8, ['k_proj', 'o_proj', 'up_proj'], 3);
  baseline = await tokens();
});
let baseline: number[];
after(async () => {
  await s.close();
});

async function tokens(adapterId = '', prompt = 'Once upon a time'): Promise<number[]> {
  return (await collect(s.inference.generate({ prompt: text(prompt), adapterId, sampling: greedy(24) }))).tokenIds;
}

test('MergeAdapters writes a servable adapter for every method; the base model never changes', async () => {
  const baseBefore = await tokens();
  const cases: [string, MergeMethod, object][] = [
    ['m-cat', MergeMethod.CAT, {}],
    ['m-svd', MergeMethod.SVD, { svdRank: 6, svdClamp: 0.99 }],
    ['m-linear', MergeMethod.LINEAR, {}],
    ['m-ties', MergeMethod.TIES, { density: 0.5 }],
    ['m-dare-linear', MergeMethod.DARE_LINEAR, { density: 0.5, seed: 7n }],
    ['m-dare-ties', MergeMethod.DARE_TIES, { density: 0.5, seed: 7n }],
  ];
  for (const [id, method, extra] of cases) {
    const sources = method === MergeMethod.CAT || method === MergeMethod.SVD ? [{ adapterId: 'style-a', weight: 0.5 }, { adapterId: 'style-c', weight: 1.5 }] : [{ adapterId: 'style-a', weight: 0.5 }, { adapterId: 'style-b', weight: 1.5 }];
    const r = await s.adapters.mergeAdapters({ sources, method, newAdapterId: id, ...extra });
    assert.equal(r.adapter?.adapterId, id);
    assert.ok(existsSync(join(s.adapterRoot, id, 'adapter_config.json')));
    const cfg = JSON.parse(readFileSync(join(s.adapterRoot, id, 'adapter_config.json'), 'utf8'));
    assert.equal(cfg.r, r.adapter?.rank);
    const out = await tokens(id);
    assert.equal(out.length, 24);
  }
  assert.equal((await s.adapters.mergeAdapters({ sources: [{ adapterId: 'style-a' }, { adapterId: 'style-c' }], method: MergeMethod.CAT, newAdapterId: 'm-cat-2' })).adapter?.rank, 12);
  await s.adapters.unloadAdapter({ adapterId: 'm-cat', deleteFromStore: true });
  assert.deepEqual(await tokens(), baseBefore, 'generating without an adapter gives exactly the tokens it gave before');
});

test('bad merge requests get their status codes', async () => {
  const merge = (req: object) => s.adapters.mergeAdapters(req);
  await assert.rejects(merge({ sources: [{ adapterId: 'nope' }], method: MergeMethod.CAT, newAdapterId: 'x1' }), (e) => code(e) === grpc.status.NOT_FOUND && /nope/.test(details(e)));
  await assert.rejects(merge({ sources: [{ adapterId: 'style-a' }], method: MergeMethod.CAT, newAdapterId: 'style-b' }), (e) => code(e) === grpc.status.ALREADY_EXISTS);
  await assert.rejects(merge({ sources: [{ adapterId: 'style-a' }, { adapterId: 'style-c' }], method: MergeMethod.LINEAR, newAdapterId: 'x2' }), (e) => code(e) === grpc.status.INVALID_ARGUMENT && /equal ranks/.test(details(e)));
  await assert.rejects(merge({ sources: [{ adapterId: 'style-a' }], method: MergeMethod.UNSPECIFIED, newAdapterId: 'x3' }), (e) => code(e) === grpc.status.INVALID_ARGUMENT && /method/.test(details(e)));
  // One source is linear for every method (as PEFT's add_weighted_adapter): density only matters for two or more.
  await assert.rejects(merge({ sources: [{ adapterId: 'style-a' }, { adapterId: 'style-b' }], method: MergeMethod.TIES, newAdapterId: 'x4' }), (e) => code(e) === grpc.status.INVALID_ARGUMENT && /density/.test(details(e)));
  await assert.rejects(merge({ sources: [{ adapterId: 'style-a' }], method: MergeMethod.CAT, newAdapterId: '../x' }), (e) => code(e) === grpc.status.INVALID_ARGUMENT && /adapter_id/.test(details(e)));
  await assert.rejects(merge({ sources: [], method: MergeMethod.CAT, newAdapterId: 'x5' }), (e) => code(e) === grpc.status.INVALID_ARGUMENT && /sources/.test(details(e)));
  await assert.rejects(merge({ sources: [{ adapterId: 'style-a', weight: Infinity }], method: MergeMethod.CAT, newAdapterId: 'x6' }), (e) => code(e) === grpc.status.INVALID_ARGUMENT && /weight/.test(details(e)));
  // A cat over maxLoraRank (16) cannot be served: refused before anything is written.
  await assert.rejects(merge({ sources: [{ adapterId: 'style-c' }, { adapterId: 'm-cat-2' }], method: MergeMethod.CAT, newAdapterId: 'x7' }), (e) => code(e) === grpc.status.INVALID_ARGUMENT && /maxLoraRank 16/.test(details(e)));
  assert.ok(!existsSync(join(s.adapterRoot, 'x7')));
});

test('the exported merged model, served with --quant none, gives the same greedy tokens as base + adapter', async () => {
  const withAdapter = await tokens('style-c', 'The little dog');
  const r = await s.adapters.exportMergedModel({ adapters: [{ adapterId: 'style-c' }], outputName: 'stories-style-c', dtype: ExportDtype.FLOAT32 });
  assert.equal(r.outputName, 'stories-style-c');
  const dir = join(exportRoot, 'stories-style-c');
  for (const f of ['config.json', 'model.safetensors', 'tokenizer.json', 'generation_config.json', 'loraplex_export.json']) assert.ok(existsSync(join(dir, f)), f);
  await assert.rejects(s.adapters.exportMergedModel({ adapters: [{ adapterId: 'style-c' }], outputName: 'stories-style-c' }), (e) => code(e) === grpc.status.ALREADY_EXISTS);
  await assert.rejects(s.adapters.exportMergedModel({ adapters: [], outputName: 'empty' }), (e) => code(e) === grpc.status.INVALID_ARGUMENT);
  await assert.rejects(s.adapters.exportMergedModel({ adapters: [{ adapterId: 'style-c' }], outputName: '../up' }), (e) => code(e) === grpc.status.INVALID_ARGUMENT && /output_name/.test(details(e)));
  const exported = await startTestServer({ modelDir: dir, source: dir }, { kind: 'none' });
  try {
    const out = await collect(exported.inference.generate({ prompt: text('The little dog'), sampling: greedy(24) }));
    assert.deepEqual(out.tokenIds, withAdapter);
  } finally {
    await exported.close();
  }
});

test('a per-request mix equals its stored cat merge, also batched with single-adapter requests', async () => {
  const mix = [{ adapterId: 'style-a', weight: 0.8 }, { adapterId: 'style-c', weight: -0.4 }];
  await s.adapters.mergeAdapters({ sources: mix, method: MergeMethod.CAT, newAdapterId: 'stored-mix' });
  const stored = await tokens('stored-mix');
  const viaMix = (await collect(s.inference.generate({ prompt: text('Once upon a time'), adapters: mix, sampling: greedy(24) }))).tokenIds;
  assert.deepEqual(viaMix, stored);
  // Together with other requests (a single adapter, the base, the same mix again): still the same tokens.
  const [a, b, c] = await Promise.all([
    collect(s.inference.generate({ prompt: text('Once upon a time'), adapters: mix, sampling: greedy(24) })),
    collect(s.inference.generate({ prompt: text('One day'), adapterId: 'style-b', sampling: greedy(24) })),
    collect(s.inference.generate({ prompt: text('The cat'), sampling: greedy(24) })),
  ]);
  assert.deepEqual(a.tokenIds, stored);
  assert.deepEqual(b.tokenIds, await tokens('style-b', 'One day'));
  assert.deepEqual(c.tokenIds, await tokens('', 'The cat'));
  // The mix is not a stored adapter.
  assert.ok(!(await s.adapters.listAdapters({})).adapters.some((x) => x.adapterId.includes('mix-')));
  await assert.rejects(collect(s.inference.generate({ prompt: text('x'), adapterId: 'style-a', adapters: mix })), (e) => code(e) === grpc.status.INVALID_ARGUMENT && /either adapter_id or adapters/.test(details(e)));
  await assert.rejects(collect(s.inference.generate({ prompt: text('x'), adapters: [{ adapterId: 'style-c' }, { adapterId: 'stored-mix' }] })), (e) => code(e) === grpc.status.INVALID_ARGUMENT && /rank 20 .* over maxLoraRank 16/.test(details(e)));
  await assert.rejects(collect(s.inference.generate({ prompt: text('x'), adapters: [{ adapterId: 'nope' }] })), (e) => code(e) === grpc.status.NOT_FOUND);
});

test('after loads, merges, mixes, exports and unloads the base model gives exactly the tokens it gave first', async () => {
  await s.adapters.loadAdapter({ adapterId: 'style-b', pin: true });
  await s.adapters.unloadAdapter({ adapterId: 'style-b' });
  assert.deepEqual(await tokens(), baseline);
});
