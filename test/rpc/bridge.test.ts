import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { create, createFileRegistry, fromBinary, toBinary, type DescMessage, type Message } from '@bufbuild/protobuf';
import {
  FieldDescriptorProto_Label as Label,
  FieldDescriptorProto_Type as Type,
  FileDescriptorProtoSchema,
  FileDescriptorSetSchema,
  type FileDescriptorProto,
} from '@bufbuild/protobuf/wkt';
import { service as healthServiceDefinition } from 'grpc-health-check';
import { LoraplexError } from '../../src/errors.js';
import { makeClient, type ServiceClient } from '../../src/rpc/bridge.js';
import { INTERNAL_MESSAGE, STATUS_BY_CODE, toStatus } from '../../src/rpc/status.js';
import { AdapterService, AdapterState, ExportDtype, MajoritySignMethod, MergeMethod } from '../../src/gen/loraplex/v1/adapters_pb.js';
import { FinishReason, GenerateRequestSchema, InferenceService } from '../../src/gen/loraplex/v1/inference_pb.js';
import { reflect } from '../helpers/grpc.js';
import { DELTAS, DEMO_ADAPTER, FLOOD_COUNT, startFakeServer, type FakeServer } from './fake-services.js';

let server: FakeServer;
let inference: ServiceClient<typeof InferenceService>;
let adapters: ServiceClient<typeof AdapterService>;

before(async () => {
  server = await startFakeServer();
  inference = makeClient(InferenceService, server.address);
  adapters = makeClient(AdapterService, server.address);
});

after(async () => {
  inference.close();
  adapters.close();
  await server.stop();
});

async function collect<T>(iterable: AsyncIterable<T>): Promise<T[]> {
  const out: T[] = [];
  for await (const item of iterable) out.push(item);
  return out;
}

/** Resolves with the value, or rejects if it takes longer than `ms`. */
function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  return Promise.race([
    promise,
    new Promise<never>((_, reject) => setTimeout(() => reject(new Error(`${what}: not within ${ms} ms`)), ms).unref()),
  ]);
}

function isStatus(code: grpc.status, details?: string | RegExp) {
  return (err: unknown) => {
    const e = err as grpc.ServiceError;
    assert.equal(e.code, code, `status ${grpc.status[e.code]} (${e.details}), wanted ${grpc.status[code]}`);
    if (typeof details === 'string') assert.equal(e.details, details);
    else if (details) assert.match(e.details, details);
    return true;
  };
}

test('server streaming: deltas then finished, decoded into generated types', async () => {
  const responses = await collect(inference.generate({ prompt: { case: 'text', value: 'hello' }, adapterId: DEMO_ADAPTER }));
  assert.equal(responses.length, DELTAS.length + 1);
  assert.deepEqual(
    responses.slice(0, -1).map((r) => (r.event.case === 'delta' ? r.event.value.text : null)),
    [...DELTAS],
  );
  const last = responses.at(-1)!.event;
  assert.equal(last.case, 'finished');
  assert.equal(last.value.finishReason, FinishReason.STOP);
  assert.equal(last.value.promptTokens, 5);
  assert.equal(last.value.timings?.totalSeconds, 1.5);
  assert.equal(responses[0]!.$typeName, 'loraplex.v1.GenerateResponse');
  await server.generateFinally(DEMO_ADAPTER);
});

test('unary: request and response round-trip, including the call context', async () => {
  const tokens = await inference.tokenize({ prompt: { case: 'text', value: 'hé' } });
  assert.deepEqual(tokens.tokenIds, [104, 233]);
  assert.equal(tokens.rendered, 'hé');

  const metadata = new grpc.Metadata();
  metadata.set('x-test', 'yes');
  const info = await inference.getModelInfo({}, { metadata, timeoutMs: 60_000 });
  const ctx = JSON.parse(info.model!.source) as { peer: string; test: string[]; deadline: string | null; method: string };
  assert.match(ctx.peer, /^127\.0\.0\.1:\d+$/);
  assert.deepEqual(ctx.test, ['yes']);
  assert.ok(ctx.deadline && Math.abs(Date.parse(ctx.deadline) - Date.now() - 60_000) < 5_000, `deadline ${ctx.deadline}`);
  assert.equal(ctx.method, '/loraplex.v1.InferenceService/GetModelInfo');
  assert.equal(info.limits?.maxAdapterBytes, 1n << 40n); // uint64 survives as bigint

  const none = JSON.parse((await inference.getModelInfo({})).model!.source) as { deadline: string | null };
  assert.equal(none.deadline, null);
});

test('unary response with a nested well-known type (Timestamp)', async () => {
  const res = await adapters.loadAdapter({ adapterId: DEMO_ADAPTER, pin: true });
  assert.equal(res.adapter?.state, AdapterState.LOADED);
  assert.equal(res.adapter?.bytes, 123456n);
  assert.equal(res.adapter?.pinned, true);
  assert.deepEqual(res.adapter?.targetModules, ['q_proj', 'v_proj']);
  assert.equal(res.adapter?.lastUsed?.seconds, BigInt(Date.parse('2024-01-02T03:04:05Z') / 1000));
  assert.equal(res.adapter?.lastUsed?.nanos, 678_000_000);
});

test('LoraplexError codes map to their status with the message preserved', async () => {
  await assert.rejects(
    adapters.loadAdapter({ adapterId: 'nope' }),
    isStatus(grpc.status.NOT_FOUND, 'adapter_id "nope" is not in the adapter store'),
  );
  await assert.rejects(inference.tokenize({}), isStatus(grpc.status.INVALID_ARGUMENT, 'prompt: text must not be empty'));
  // In a stream, before any message.
  await assert.rejects(
    collect(inference.generate({ adapterId: 'missing' })),
    isStatus(grpc.status.NOT_FOUND, 'adapter_id "missing" is not in the adapter store'),
  );
  assert.equal(server.internalErrors.length, 0);
});

test('an enum number the proto does not declare is INVALID_ARGUMENT naming the field, before any handler runs', async () => {
  await assert.rejects(adapters.mergeAdapters({ newAdapterId: 'm', method: 99 as MergeMethod }), isStatus(grpc.status.INVALID_ARGUMENT, 'method 99: not a value of MergeMethod'));
  await assert.rejects(
    adapters.mergeAdapters({ newAdapterId: 'm', method: 1, majoritySignMethod: 99 as MajoritySignMethod }),
    isStatus(grpc.status.INVALID_ARGUMENT, 'majority_sign_method 99: not a value of MajoritySignMethod'),
  );
  await assert.rejects(adapters.exportMergedModel({ outputName: 'x', dtype: -3 as ExportDtype }), isStatus(grpc.status.INVALID_ARGUMENT, 'dtype -3: not a value of ExportDtype'));
  assert.equal(server.internalErrors.length, 0);
});

test('RESOURCE_EXHAUSTED carries retry-after-ms', async () => {
  const err = await collect(inference.generate({ adapterId: 'busy' })).then(
    () => assert.fail('expected an error'),
    (e: grpc.ServiceError) => e,
  );
  assert.equal(err.code, grpc.status.RESOURCE_EXHAUSTED);
  assert.equal(err.details, 'waiting queue is full (maxWaiting=2); retry later');
  assert.deepEqual(err.metadata.get('retry-after-ms'), ['1500']);
});

test('an unexpected Error becomes INTERNAL "internal error"; the detail goes only to the logger', async () => {
  await assert.rejects(adapters.unloadAdapter({ adapterId: DEMO_ADAPTER }), isStatus(grpc.status.INTERNAL, INTERNAL_MESSAGE));
  // After a message was streamed, too.
  const seen: string[] = [];
  await assert.rejects(async () => {
    for await (const r of inference.generate({ adapterId: 'boom' })) seen.push(r.event.case ?? '');
  }, isStatus(grpc.status.INTERNAL, INTERNAL_MESSAGE));
  assert.deepEqual(seen, ['delta']);
  const logged = server.internalErrors.splice(0);
  assert.deepEqual(
    logged.map((l) => [l.method, (l.err as Error).message]),
    [
      ['/loraplex.v1.AdapterService/UnloadAdapter', 'disk on fire at /srv/secret/adapters'],
      ['/loraplex.v1.InferenceService/Generate', 'engine exploded at /srv/secret/model.onnx'],
    ],
  );
});

test('status map: every domain code, unknown codes and non-errors', () => {
  const logged: unknown[] = [];
  const log = (err: unknown) => logged.push(err);
  for (const [code, status] of Object.entries(STATUS_BY_CODE)) {
    assert.equal(grpc.status[status], code, `${code} maps to the gRPC status of the same name`);
    const s = toStatus(new LoraplexError(code as keyof typeof STATUS_BY_CODE, `msg ${code}`), '/m', log);
    assert.equal(s.code, status);
    assert.equal(s.details, `msg ${code}`);
  }
  assert.equal(logged.length, 1, 'an explicit INTERNAL is logged too');
  for (const weird of [new LoraplexError('NOPE' as never, 'x'), 'a string', { code: 5, details: 'looks like a status' }, null]) {
    const s = toStatus(weird, '/m', log);
    assert.equal(s.code, grpc.status.INTERNAL);
    assert.equal(s.details, INTERNAL_MESSAGE);
  }
  assert.equal(logged.length, 5);
  // A retry hint only on RESOURCE_EXHAUSTED, and only a sane one.
  const hint = (code: 'RESOURCE_EXHAUSTED' | 'UNAVAILABLE', retryAfterMs: unknown) =>
    toStatus(Object.assign(new LoraplexError(code, 'x'), { retryAfterMs }), '/m').metadata?.get('retry-after-ms');
  assert.deepEqual(hint('RESOURCE_EXHAUSTED', 10), ['10']);
  assert.deepEqual(hint('RESOURCE_EXHAUSTED', -1), []);
  assert.deepEqual(hint('RESOURCE_EXHAUSTED', Number.NaN), []);
  assert.deepEqual(hint('RESOURCE_EXHAUSTED', '10'), []);
  assert.deepEqual(hint('UNAVAILABLE', 10), []);
});

test('leaving a stream early cancels the call and runs the generator finally block', async () => {
  let n = 0;
  for await (const _ of inference.generate({ adapterId: 'slow' })) if (++n === 3) break;
  await within(server.generateFinally('slow'), 1000, 'generator finally after break');

  const controller = new AbortController();
  const stream = inference.generate({ adapterId: 'slow' }, { signal: controller.signal });
  await assert.rejects(async () => {
    for await (const _ of stream) controller.abort();
  }, isStatus(grpc.status.CANCELLED));
  await within(server.generateFinally('slow'), 1000, 'generator finally after abort');
  assert.equal(server.internalErrors.length, 0, 'a cancelled call is not an internal error');
});

test('an expired deadline aborts ctx.signal with DEADLINE_EXCEEDED (streaming and unary)', async () => {
  server.abortReasons.splice(0);
  const started = Date.now();
  await assert.rejects(collect(inference.generate({ adapterId: 'wait' }, { timeoutMs: 200 })), isStatus(grpc.status.DEADLINE_EXCEEDED));
  await within(server.generateFinally('wait'), 1000, 'generator finally after deadline');
  assert.ok(Date.now() - started < 1500, 'the deadline ended the stream promptly');

  await assert.rejects(inference.tokenize({ prompt: { case: 'text', value: 'wait' } }, { timeoutMs: 200 }), isStatus(grpc.status.DEADLINE_EXCEEDED));
  await within(
    (async () => {
      while (server.abortReasons.length < 2) await new Promise((r) => setTimeout(r, 10));
    })(),
    1000,
    'unary handler saw the abort',
  );
  for (const reason of server.abortReasons) {
    assert.ok(reason instanceof LoraplexError);
    assert.equal(reason.code, 'DEADLINE_EXCEEDED');
  }
  assert.equal(server.internalErrors.length, 0);
});

test('streaming respects backpressure: a stalled client stops the generator', async () => {
  const stream = inference.generate({ adapterId: 'flood' })[Symbol.asyncIterator]();
  await stream.next(); // the call is open
  await new Promise((r) => setTimeout(r, 500)); // the client reads nothing for a while
  const produced = server.floodProduced();
  assert.ok(produced < FLOOD_COUNT / 2, `the generator ran ahead to ${produced} of ${FLOOD_COUNT} messages`);
  let received = 1;
  for (let r = await stream.next(); !r.done; r = await stream.next()) received++;
  assert.equal(received, FLOOD_COUNT);
  await server.generateFinally('flood');
});

test('health: NOT_SERVING until setServing(true), for the server and each service', async () => {
  const Health = grpc.makeGenericClientConstructor(healthServiceDefinition as unknown as grpc.ServiceDefinition, 'grpc.health.v1.Health');
  const client = new Health(server.address, grpc.credentials.createInsecure());
  const check = (service: string) =>
    new Promise<string>((resolve, reject) =>
      client['Check']!({ service }, (err: grpc.ServiceError | null, res: { status: string }) => (err ? reject(err) : resolve(res.status))),
    );
  try {
    assert.deepEqual(server.health.services, ['', 'loraplex.v1.InferenceService', 'loraplex.v1.AdapterService', 'loraplex.v1.TrainService']);
    for (const name of server.health.services) assert.equal(await check(name), 'NOT_SERVING');
    server.health.setServing(true);
    for (const name of server.health.services) assert.equal(await check(name), 'SERVING');
    await assert.rejects(check('loraplex.v1.Nope'), isStatus(grpc.status.NOT_FOUND));
    server.health.setServing(false);
    assert.equal(await check(''), 'NOT_SERVING');
  } finally {
    client.close();
  }
});

for (const pkg of ['grpc.reflection.v1', 'grpc.reflection.v1alpha']) {
  test(`reflection (${pkg}): lists the services and describes them with their imports`, async () => {
    const list = await reflect(server.address, pkg, { messageRequest: { case: 'listServices', value: '*' } });
    assert.deepEqual(list.listServicesResponse?.service.map((s) => s.name).sort(), [
      'grpc.health.v1.Health',
      'loraplex.v1.AdapterService',
      'loraplex.v1.InferenceService',
      'loraplex.v1.TrainService',
    ]);

    const described = await reflect(server.address, pkg, { messageRequest: { case: 'fileContainingSymbol', value: 'loraplex.v1.AdapterService' } });
    const files = described.fileDescriptorResponse!.fileDescriptorProto.map((b) => fromBinary(FileDescriptorProtoSchema, b));
    assert.deepEqual(files.map((f) => f.name).sort(), ['google/protobuf/timestamp.proto', 'loraplex/v1/adapters.proto']);
    // What a client (grpcurl) does with them: build a registry and use the types.
    // Imports come after the file that needs them; a registry wants them first.
    const registry = createFileRegistry(create(FileDescriptorSetSchema, { file: [...files].reverse() }));
    assert.equal(registry.getService('loraplex.v1.AdapterService')?.method['loadAdapter']?.output.typeName, 'loraplex.v1.LoadAdapterResponse');

    const inference = await reflect(server.address, pkg, { messageRequest: { case: 'fileContainingSymbol', value: 'loraplex.v1.GenerateRequest' } });
    const [file] = inference.fileDescriptorResponse!.fileDescriptorProto.map((b) => fromBinary(FileDescriptorProtoSchema, b));
    assert.equal(file?.name, 'loraplex/v1/inference.proto');
    const generate = file!.service.find((s) => s.name === 'InferenceService')!.method.find((m) => m.name === 'Generate')!;
    assert.equal(generate.serverStreaming, true);
    const scale = file!.messageType.find((m) => m.name === 'GenerateRequest')!.field.find((f) => f.name === 'adapter_scale')!;
    assert.equal(scale.proto3Optional, true, 'proto3 optional survives the reflection round trip');
    // The descriptor served is the one we compiled.
    assert.equal(file!.messageType.length, GenerateRequestSchema.file.proto.messageType.length);

    // grpcurl fetches imports by file name.
    const byName = await reflect(server.address, pkg, { messageRequest: { case: 'fileByFilename', value: 'google/protobuf/timestamp.proto' } });
    assert.deepEqual(
      byName.fileDescriptorResponse?.fileDescriptorProto.map((b) => fromBinary(FileDescriptorProtoSchema, b).name),
      ['google/protobuf/timestamp.proto'],
    );
    const health = await reflect(server.address, pkg, { messageRequest: { case: 'fileContainingSymbol', value: 'grpc.health.v1.Health' } });
    const healthFile = fromBinary(FileDescriptorProtoSchema, health.fileDescriptorResponse!.fileDescriptorProto[0]!);
    assert.deepEqual(healthFile.service[0]?.method.map((m) => m.name), ['Check', 'Watch', 'List']);

    const missing = await reflect(server.address, pkg, { messageRequest: { case: 'fileContainingSymbol', value: 'loraplex.v1.Nope' } });
    assert.equal(missing.errorResponse?.errorCode, grpc.status.NOT_FOUND);
  });
}
