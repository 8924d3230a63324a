import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Writable } from 'node:stream';
import * as grpc from '@grpc/grpc-js';
import { pino } from 'pino';
import { createMetrics } from '../../src/obs/metrics.js';
import { annotate, createRequestLog, requestId } from '../../src/rpc/request-log.js';
import type { CallContext } from '../../src/rpc/bridge.js';

function capture(level = 'info') {
  const lines: Record<string, unknown>[] = [];
  const stream = new Writable({
    write(chunk: Buffer, _enc, cb) {
      for (const l of chunk.toString().split('\n')) if (l) lines.push(JSON.parse(l) as Record<string, unknown>);
      cb();
    },
  });
  return { log: pino({ level }, stream), lines };
}

function ctx(requestId?: string, tenant = ''): CallContext {
  const metadata = new grpc.Metadata();
  if (requestId !== undefined) metadata.set('x-request-id', requestId);
  return { method: '/loraplex.v1.InferenceService/Generate', metadata, deadline: undefined, signal: new AbortController().signal, peer: '127.0.0.1:1234', principal: { tenant, role: 'user' } };
}

const flush = () => new Promise((r) => setImmediate(r));
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

test('one summary line per call, with the client x-request-id and the handler annotations', async () => {
  const { log, lines } = capture();
  const metrics = createMetrics({ maxTenantLabels: 0, defaultMetrics: false });
  const r = createRequestLog({ log, metrics });
  const c = ctx('req-42', 'acme');
  assert.equal(requestId(c), 'req-42');
  annotate(c, { adapterId: 'a1', promptTokens: 4 });
  annotate(c, { generatedTokens: 7, timings: { queueSeconds: 0.1 } });
  r.onCallEnd({ method: c.method, code: grpc.status.OK, seconds: 1.23456789, ctx: c });
  await flush();
  assert.equal(lines.length, 1);
  const line = lines[0]!;
  assert.equal(line['msg'], 'request');
  assert.equal(line['level'], 30);
  assert.equal(line['requestId'], 'req-42');
  assert.equal(line['method'], 'Generate');
  assert.equal(line['code'], 'OK');
  assert.equal(line['seconds'], 1.2346);
  assert.equal(line['adapterId'], 'a1');
  assert.equal(line['tenant'], 'acme');
  assert.equal(line['promptTokens'], 4);
  assert.equal(line['generatedTokens'], 7);
  assert.deepEqual(line['timings'], { queueSeconds: 0.1 });
  assert.match(await metrics.registry.metrics(), /^loraplex_rpc_requests_total\{method="Generate",code="OK"\} 1$/m);
});

test('request ids: generated when absent or unusable, stable within a call', async () => {
  const { log, lines } = capture();
  const r = createRequestLog({ log });
  for (const bad of [undefined, '', 'has space', 'x'.repeat(129)]) {
    const c = ctx(bad);
    const id = requestId(c);
    assert.match(id, UUID, String(bad));
    assert.equal(requestId(c), id);
    r.onCallEnd({ method: c.method, code: grpc.status.OK, seconds: 0, ctx: c });
    await flush();
    assert.equal(lines.at(-1)!['requestId'], id);
  }
  assert.equal(requestId(ctx('x'.repeat(128))), 'x'.repeat(128));
  assert.notEqual(requestId(ctx()), requestId(ctx()));
  // A call that ended before it had a context (e.g. rejected on arrival) still gets an id.
  r.onCallEnd({ method: '/loraplex.v1.InferenceService/Generate', code: grpc.status.UNAVAILABLE, seconds: 0, ctx: null });
  await flush();
  assert.match(String(lines.at(-1)!['requestId']), UUID);
});

test('prompts and generated text are dropped unless logPrompts', async () => {
  const off = capture();
  const r = createRequestLog({ log: off.log });
  const c = ctx();
  annotate(c, { prompt: 'my secret prompt', text: 'the secret answer', adapterId: 'a1' });
  r.onCallEnd({ method: c.method, code: grpc.status.OK, seconds: 0.1, ctx: c });
  await flush();
  const raw = JSON.stringify(off.lines);
  assert.doesNotMatch(raw, /secret/);
  assert.equal(off.lines[0]!['adapterId'], 'a1');

  const on = capture();
  const r2 = createRequestLog({ log: on.log, logPrompts: true });
  const c2 = ctx();
  annotate(c2, { prompt: 'my secret prompt', text: 'the secret answer' });
  r2.onCallEnd({ method: c2.method, code: grpc.status.OK, seconds: 0.1, ctx: c2 });
  await flush();
  assert.equal(on.lines[0]!['prompt'], 'my secret prompt');
  assert.equal(on.lines[0]!['text'], 'the secret answer');
});

test('annotations cannot overwrite the core fields; errors: message, and warn for server faults', async () => {
  const { log, lines } = capture();
  const r = createRequestLog({ log });
  const c = ctx('abc', 'acme');
  annotate(c, { requestId: 'forged', code: 'OK', method: 'Other', tenant: 'forged' });
  r.onCallEnd({ method: c.method, code: grpc.status.NOT_FOUND, seconds: 0.01, ctx: c, error: new Error('adapter "x" not found') });
  r.onCallEnd({ method: c.method, code: grpc.status.INTERNAL, seconds: 0.01, ctx: ctx(), error: new Error('boom') });
  await flush();
  assert.equal(lines[0]!['requestId'], 'abc');
  assert.equal(lines[0]!['code'], 'NOT_FOUND');
  assert.equal(lines[0]!['method'], 'Generate');
  assert.equal(lines[0]!['tenant'], 'acme', 'the authenticated tenant, not an annotation');
  assert.equal(lines[0]!['error'], 'adapter "x" not found');
  assert.equal(lines[0]!['level'], 30);
  assert.equal(lines[1]!['code'], 'INTERNAL');
  assert.equal(lines[1]!['level'], 40);
});

test('the level is the logger\'s: at warn, only server faults are written', async () => {
  const { log, lines } = capture('warn');
  const r = createRequestLog({ log });
  r.onCallEnd({ method: 'Generate', code: grpc.status.OK, seconds: 0, ctx: ctx() });
  r.onCallEnd({ method: 'Generate', code: grpc.status.INTERNAL, seconds: 0, ctx: ctx() });
  await flush();
  assert.deepEqual(lines.map((l) => l['code']), ['INTERNAL']);
});
