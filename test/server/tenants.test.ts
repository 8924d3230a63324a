/**
 * The cross-tenant matrix against the real server with auth required: no key or a wrong key is refused on
 * every loraplex RPC (health and reflection stay open), and one tenant's adapter does not exist for another
 * on any adapter-taking RPC: the same NOT_FOUND, message included, as a truly missing adapter.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { existsSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { create, type DescMethod, type DescService } from '@bufbuild/protobuf';
import { makeRandomAdapter, writePeftAdapter } from '../../src/adapters/peft.js';
import { readModelSpec } from '../../src/models/config.js';
import { serviceDefinition, type ClientCallOptions } from '../../src/rpc/bridge.js';
import { INVALID_KEY_MESSAGE, MISSING_KEY_MESSAGE } from '../../src/rpc/auth.js';
import { AdapterService, MergeMethod } from '../../src/gen/loraplex/v1/adapters_pb.js';
import { InferenceService } from '../../src/gen/loraplex/v1/inference_pb.js';
import { TrainJobState, TrainService, type TrainEvent } from '../../src/gen/loraplex/v1/train_pb.js';
import { healthCheck, reflect } from '../helpers/grpc.js';
import { collect, failure, startTestServer, type TestServer } from '../helpers/server.js';
import { STORIES, tempDir } from '../helpers/engine.js';

const spec = readModelSpec(STORIES);
const KEYS = {
  acme: 'acme-user-key-0123456789abcdef',
  globex: 'globex-user-key-0123456789abcdef',
  ops: 'ops-admin-key-0123456789abcdef',
} as const;
type Tenant = keyof typeof KEYS;

/** acme's adapter: it exists only in <root>/acme. */
const ACME_ONLY = 'acme-only';
/** In no namespace at all. */
const MISSING = 'no-such-adapter';
/** The same id in two namespaces, different weights. */
const DUP = 'dup';

const text = (value: string) => ({ case: 'text' as const, value });
const greedy = { temperature: 0, maxNewTokens: 12 };

function writeAdapter(root: string, tenant: string, id: string, seed: number): void {
  writePeftAdapter(join(root, tenant, id), makeRandomAdapter(spec, { r: 8, alpha: 16, targetModules: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'], seed, bStd: 0.3 }));
}

const as = (who: Tenant | 'wrong' | 'none'): ClientCallOptions => {
  const metadata = new grpc.Metadata();
  if (who === 'wrong') metadata.set('authorization', 'Bearer wrong-key-0123456789abcdef');
  else if (who !== 'none') metadata.set('authorization', `Bearer ${KEYS[who]}`);
  return { metadata, timeoutMs: 60_000 };
};


let s: TestServer;
before(async () => {
  const dir = tempDir('tenants-keys');
  const apiKeysFile = join(dir, 'keys.yaml');
  writeFileSync(apiKeysFile, `keys:
  - { key: ${KEYS.acme}, tenant: acme, role: user }
  - { key: ${KEYS.globex}, tenant: globex, role: user }
  - { key: ${KEYS.ops}, tenant: ops, role: admin }
`);
  s = await startTestServer({ auth: 'required', apiKeysFile });
  writeAdapter(s.adapterRoot, 'acme', ACME_ONLY, 1);
  writeAdapter(s.adapterRoot, 'acme', DUP, 2);
  writeAdapter(s.adapterRoot, 'globex', DUP, 3);
});
after(async () => {
  await s.close();
});

// --- authentication: every loraplex RPC, found from the service descriptors (new RPCs are covered too) ----

/** Calls `method` with an empty request through a raw grpc-js client, for its status only. */
function callRaw(client: grpc.Client, method: DescMethod, options: ClientCallOptions): Promise<unknown> {
  const def = serviceDefinition(method.parent)[method.name]!;
  const request = create(method.input);
  const deadline = Date.now() + (options.timeoutMs ?? 10_000);
  if (method.methodKind === 'unary') {
    return new Promise((resolve, reject) =>
      client.makeUnaryRequest(def.path, def.requestSerialize, def.responseDeserialize, request, options.metadata!, { deadline }, (err, res) => (err ? reject(err) : resolve(res))),
    );
  }
  return new Promise((resolve, reject) => {
    const call = client.makeServerStreamRequest(def.path, def.requestSerialize, def.responseDeserialize, request, options.metadata!, { deadline });
    call.on('data', () => undefined);
    call.on('error', reject);
    call.on('end', resolve);
  });
}

test('no key or a wrong key: UNAUTHENTICATED on every loraplex RPC; health and reflection stay open', async () => {
  const client = new grpc.Client(s.address, grpc.credentials.createInsecure());
  try {
    const methods = [InferenceService, AdapterService, TrainService].flatMap((svc) => (svc as unknown as DescService).methods);
    assert.ok(methods.length >= 13);
    for (const method of methods) {
      const none = await failure(callRaw(client, method, as('none')));
      assert.deepEqual(none, { code: grpc.status.UNAUTHENTICATED, details: MISSING_KEY_MESSAGE }, `${method.name} without a key`);
      const wrong = await failure(callRaw(client, method, as('wrong')));
      assert.deepEqual(wrong, { code: grpc.status.UNAUTHENTICATED, details: INVALID_KEY_MESSAGE }, `${method.name} with a wrong key`);
    }
  } finally {
    client.close();
  }
  assert.equal(await healthCheck(s.address), 'SERVING');
  assert.equal(await healthCheck(s.address, 'loraplex.v1.AdapterService'), 'SERVING');
  assert.equal(await healthCheck(s.address, 'loraplex.v1.TrainService'), 'SERVING');
  const list = await reflect(s.address, 'grpc.reflection.v1', { messageRequest: { case: 'listServices', value: '*' } });
  assert.ok(list.listServicesResponse?.service.some((x) => x.name === 'loraplex.v1.InferenceService'));
  assert.ok(list.listServicesResponse?.service.some((x) => x.name === 'loraplex.v1.TrainService'));
  // A right key works on a model-wide read.
  assert.equal((await s.inference.getModelInfo({}, as('globex'))).model?.modelType, 'llama');
});

// --- isolation: one case per adapter-taking RPC ---------------------------------------------------------

interface AdapterCase {
  name: string;
  /** Runs the RPC naming `adapterId`, as `who`. */
  run(who: Tenant, adapterId: string): Promise<unknown>;
  /** Admin-only RPC: a user gets PERMISSION_DENIED whatever the adapter (which tells nothing either). */
  adminOnly?: boolean;
}

const ADAPTER_CASES: AdapterCase[] = [
  { name: 'Generate adapter_id', run: (who, id) => collect(s.inference.generate({ prompt: text('Once upon a time'), adapterId: id, sampling: greedy }, as(who))) },
  { name: 'LoadAdapter', run: (who, id) => s.adapters.loadAdapter({ adapterId: id }, as(who)) },
  { name: 'UnloadAdapter', run: (who, id) => s.adapters.unloadAdapter({ adapterId: id }, as(who)) },
  { name: 'UnloadAdapter delete_from_store', run: (who, id) => s.adapters.unloadAdapter({ adapterId: id, deleteFromStore: true }, as(who)) },
];

/**
 * MERGE CASES (for the lead): one entry per way a merge RPC names an adapter as a SOURCE, e.g.
 *   { name: 'MergeAdapters sources', run: (who, id) => s.adapters.mergeAdapters({ newAdapterId: `m-${who}-${n++}`, method: MergeMethod.LINEAR, sources: [{ adapterId: id }] }, as(who)) },
 *   { name: 'ExportMergedModel adapters', adminOnly: true, run: (who, id) => s.adapters.exportMergedModel({ outputName: `e-${who}-${n++}`, adapters: [{ adapterId: id }] }, as(who)) },
 * They run in the same matrix: another tenant's source is NOT_FOUND like a missing one. Also worth a test:
 * a merge whose new_adapter_id equals another tenant's adapter creates the caller's own (no ALREADY_EXISTS
 * leak, no overwrite).
 */
let n = 0;
const MERGE_CASES: AdapterCase[] = [
  { name: 'MergeAdapters sources', run: (who, id) => s.adapters.mergeAdapters({ newAdapterId: `m-${who}-${n++}`, method: MergeMethod.CAT, sources: [{ adapterId: id }] }, as(who)) },
  { name: 'Generate adapters (a per-request mix)', run: (who, id) => collect(s.inference.generate({ prompt: text('Once upon a time'), adapters: [{ adapterId: id, weight: 0.5 }], sampling: greedy }, as(who))) },
  { name: 'ExportMergedModel adapters', adminOnly: true, run: (who, id) => s.adapters.exportMergedModel({ outputName: `e-${who}-${n++}`, adapters: [{ adapterId: id }] }, as(who)) },
];

for (const c of [...ADAPTER_CASES, ...MERGE_CASES]) {
  test(`${c.name}: another tenant's adapter is NOT_FOUND exactly like a missing one`, async () => {
    if (c.adminOnly) {
      for (const id of [ACME_ONLY, MISSING]) {
        const denied = await failure(c.run('globex', id));
        assert.equal(denied.code, grpc.status.PERMISSION_DENIED, `${grpc.status[denied.code]} ${denied.details}`);
      }
    }
    for (const who of c.adminOnly ? (['ops'] as const) : (['globex', 'ops'] as const)) {
      const theirs = await failure(c.run(who, ACME_ONLY));
      const missing = await failure(c.run(who, MISSING));
      assert.equal(theirs.code, grpc.status.NOT_FOUND, `${who}: ${grpc.status[theirs.code]} ${theirs.details}`);
      assert.equal(missing.code, grpc.status.NOT_FOUND, `${who}: ${grpc.status[missing.code]} ${missing.details}`);
      assert.equal(theirs.details.replaceAll(ACME_ONLY, '<id>'), missing.details.replaceAll(MISSING, '<id>'), 'the message must not tell the two apart');
      assert.equal(theirs.details, `adapter_id "${ACME_ONLY}" is not in the adapter store`);
    }
    assert.ok(existsSync(join(s.adapterRoot, 'acme', ACME_ONLY, 'adapter_config.json')), 'acme\'s adapter is still on disk');
  });
}

test('ListAdapters shows each tenant only its own adapters, by their plain ids', async () => {
  await s.adapters.loadAdapter({ adapterId: ACME_ONLY }, as('acme')); // in memory too: still invisible to others
  const ids = async (who: Tenant) => (await s.adapters.listAdapters({}, as(who))).adapters.map((a) => a.adapterId).sort();
  assert.deepEqual(await ids('acme'), [ACME_ONLY, DUP]);
  assert.deepEqual(await ids('globex'), [DUP]);
  assert.deepEqual(await ids('ops'), []);
});

test('the owner can use its adapter on every RPC; the answers carry plain ids', async () => {
  const base = await collect(s.inference.generate({ prompt: text('Once upon a time'), sampling: greedy }, as('acme')));
  const withAdapter = await collect(s.inference.generate({ prompt: text('Once upon a time'), adapterId: ACME_ONLY, sampling: greedy }, as('acme')));
  assert.equal(withAdapter.finished?.generatedTokens, greedy.maxNewTokens);
  assert.notDeepEqual(withAdapter.tokenIds, base.tokenIds, 'the adapter changes the output');
  const loaded = await s.adapters.loadAdapter({ adapterId: ACME_ONLY }, as('acme'));
  assert.equal(loaded.adapter?.adapterId, ACME_ONLY);
  const unloaded = await s.adapters.unloadAdapter({ adapterId: ACME_ONLY }, as('acme'));
  assert.equal(unloaded.adapter?.adapterId, ACME_ONLY);
  assert.ok(existsSync(join(s.adapterRoot, 'acme', ACME_ONLY)));
});

test("error messages show the caller's adapter ids, never the internal tenant~id keys", async () => {
  const twice = await failure(s.adapters.mergeAdapters({ newAdapterId: 'm-twice', method: MergeMethod.CAT, sources: [{ adapterId: ACME_ONLY }, { adapterId: ACME_ONLY }] }, as('acme')));
  assert.equal(twice.code, grpc.status.INVALID_ARGUMENT);
  assert.equal(twice.details, `sources: adapter_id "${ACME_ONLY}" is given twice; give it once with the summed weight`);
  const missing = await failure(s.adapters.mergeAdapters({ newAdapterId: 'm-missing', method: MergeMethod.LINEAR, sources: [{ adapterId: ACME_ONLY }, { adapterId: 'not-there', weight: -1 }] }, as('acme')));
  assert.equal(missing.code, grpc.status.NOT_FOUND);
  assert.match(missing.details, /"not-there"/);
  for (const e of [twice, missing]) assert.ok(!e.details.includes('acme~'), e.details);
});

test('the same id in two namespaces is two adapters', async () => {
  const run = (who: Tenant) => collect(s.inference.generate({ prompt: text('Once upon a time'), adapterId: DUP, sampling: greedy }, as(who)));
  const [a, g] = await Promise.all([run('acme'), run('globex')]);
  assert.notDeepEqual(a.tokenIds, g.tokenIds);
  assert.deepEqual((await run('acme')).tokenIds, a.tokenIds);
  // globex deleting its "dup" leaves acme's.
  await s.adapters.unloadAdapter({ adapterId: DUP, deleteFromStore: true }, as('globex'));
  assert.ok(!existsSync(join(s.adapterRoot, 'globex', DUP)));
  assert.ok(existsSync(join(s.adapterRoot, 'acme', DUP, 'adapter_config.json')));
  assert.deepEqual((await run('acme')).tokenIds, a.tokenIds);
  assert.equal((await failure(run('globex'))).code, grpc.status.NOT_FOUND);
});

test('finally, the owner can delete it from the store', async () => {
  await s.adapters.unloadAdapter({ adapterId: ACME_ONLY, deleteFromStore: true }, as('acme'));
  assert.ok(!existsSync(join(s.adapterRoot, 'acme', ACME_ONLY)));
  const gone = await failure(s.adapters.loadAdapter({ adapterId: ACME_ONLY }, as('acme')));
  assert.deepEqual(gone, { code: grpc.status.NOT_FOUND, details: `adapter_id "${ACME_ONLY}" is not in the adapter store` });
});

// --- training jobs: scoped like adapters --------------------------------------------------------------

const trainText = Array.from({ length: 24 }, (_, i) => ({ example: { case: 'text' as const, value: `Tom found a red ball number ${i} in the garden.` } }));
const trainJob = (adapterId: string, maxSteps: number) => ({ adapterId, examples: trainText, maxSeqLength: 32, microBatchSize: 4, maxSteps, learningRate: 1e-2 });
type TrainEv = NonNullable<TrainEvent['event']>;
async function trainEvents(stream: AsyncIterable<{ event?: TrainEvent | undefined }>): Promise<TrainEv[]> {
  const out: TrainEv[] = [];
  for await (const m of stream) out.push(m.event!.event);
  return out;
}

test("training jobs: another tenant's job is NOT_FOUND like a missing one (Get, Watch, Cancel, List); the adapter lands in the owner's namespace", async () => {
  const TRAINED = 'acme-trained';
  const stream = s.train.train(trainJob(TRAINED, 40), as('acme'))[Symbol.asyncIterator]();
  const accepted = (await stream.next()).value!.event!.event;
  assert.equal(accepted.case, 'accepted');
  const jobId = (accepted.value as { jobId: string }).jobId;
  const missingJob = 'tj-AAAAAAAAAAAAAAAA';
  const calls: [string, (who: Tenant, id: string) => Promise<unknown>][] = [
    ['GetTrainJob', (who, id) => s.train.getTrainJob({ jobId: id }, as(who))],
    ['WatchTrainJob', (who, id) => trainEvents(s.train.watchTrainJob({ jobId: id }, as(who)))],
    ['CancelTrainJob', (who, id) => s.train.cancelTrainJob({ jobId: id }, as(who))],
  ];
  for (const [name, call] of calls) {
    for (const who of ['globex', 'ops'] as const) {
      const theirs = await failure(call(who, jobId));
      const missing = await failure(call(who, missingJob));
      assert.equal(theirs.code, grpc.status.NOT_FOUND, `${name} as ${who}: ${grpc.status[theirs.code]} ${theirs.details}`);
      assert.equal(theirs.details.replaceAll(jobId, '<id>'), missing.details.replaceAll(missingJob, '<id>'), `${name}: the message must not tell the two apart`);
    }
  }
  for (const who of ['globex', 'ops'] as const) assert.ok(!(await s.train.listTrainJobs({}, as(who))).jobs.some((j) => j.jobId === jobId));
  assert.ok((await s.train.listTrainJobs({}, as('acme'))).jobs.some((j) => j.jobId === jobId));
  // The owner sees it through to the end; nobody else's Cancel stopped it.
  const rest: TrainEv[] = [];
  for (let r = await stream.next(); !r.done; r = await stream.next()) rest.push(r.value.event!.event);
  assert.equal(rest.at(-1)?.case, 'completed');
  assert.equal((await s.train.getTrainJob({ jobId }, as('acme'))).job!.state, TrainJobState.SUCCEEDED);
  assert.ok(existsSync(join(s.adapterRoot, 'acme', TRAINED, 'adapter_config.json')));
  const theirs = await failure(collect(s.inference.generate({ prompt: text('Once upon a time'), adapterId: TRAINED, sampling: greedy }, as('globex'))));
  assert.deepEqual(theirs, { code: grpc.status.NOT_FOUND, details: `adapter_id "${TRAINED}" is not in the adapter store` });
  // The same id is free in another namespace: no ALREADY_EXISTS leak, no overwrite.
  const other = await trainEvents(s.train.train(trainJob(TRAINED, 2), as('globex')));
  assert.equal(other.at(-1)?.case, 'completed');
  assert.ok(existsSync(join(s.adapterRoot, 'globex', TRAINED, 'adapter_config.json')));
});
