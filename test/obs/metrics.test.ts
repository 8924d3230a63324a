import { test } from 'node:test';
import assert from 'node:assert/strict';
import { status } from '@grpc/grpc-js';
import { createMetrics, shortMethod, statusName, type AdapterCounts, type RequestDone } from '../../src/obs/metrics.js';
import { startMetricsServer } from '../../src/obs/http.js';
import type { SchedulerObserver } from '../../src/scheduler/scheduler.js';

const done = (over: Partial<RequestDone> = {}): RequestDone => ({
  adapterKey: 'secret-adapter', outcome: 'length', promptTokens: 5, generatedTokens: 3, queueSeconds: 0.01, timeToFirstTokenSeconds: 0.05, totalSeconds: 0.2, ...over,
});

async function values(m: ReturnType<typeof createMetrics>, name: string): Promise<{ labels: Record<string, string | number>; value: number }[]> {
  const metric = m.registry.getSingleMetric(name);
  assert.ok(metric, `${name} is registered`);
  return (await metric.get()).values.map((v) => ({ labels: v.labels as Record<string, string | number>, value: v.value }));
}

test('Metrics implement the scheduler observer', () => {
  const m = createMetrics({ maxTenantLabels: 0, defaultMetrics: false });
  const observer: SchedulerObserver = m; // compile-time check: main.ts passes the Metrics object as is
  assert.ok(observer);
});

test('every metric is loraplex_-prefixed, default metrics included', async () => {
  const m = createMetrics({ maxTenantLabels: 0 });
  const names = (await m.registry.getMetricsAsJSON()).map((x) => x.name);
  assert.ok(names.includes('loraplex_process_cpu_seconds_total'), 'process metrics carry the prefix');
  assert.ok(names.includes('loraplex_nodejs_heap_size_used_bytes'));
  for (const n of names) assert.match(n, /^loraplex_/);
});

test('no tenant label when maxTenantLabels is 0', async () => {
  const m = createMetrics({ maxTenantLabels: 0, defaultMetrics: false });
  m.observeRequest(done({ tenant: 'acme' }));
  m.observeRequest(done({ tenant: 'globex', generatedTokens: 4 }));
  assert.deepEqual(await values(m, 'loraplex_generated_tokens_total'), [{ labels: {}, value: 7 }]);
  assert.deepEqual(await values(m, 'loraplex_prompt_tokens_total'), [{ labels: {}, value: 10 }]);
});

test('tenant labels are capped: the first N tenants, then "other"', async () => {
  const m = createMetrics({ maxTenantLabels: 2, defaultMetrics: false });
  for (const tenant of ['a', 'b', 'c', 'd', 'a', 'e']) m.observeRequest(done({ tenant, generatedTokens: 1 }));
  m.observeRequest(done({ generatedTokens: 10 })); // no tenant
  m.observeRequest(done({ tenant: 'x'.repeat(500), generatedTokens: 100 }));
  const got = Object.fromEntries((await values(m, 'loraplex_generated_tokens_total')).map((v) => [v.labels['tenant'], v.value]));
  assert.deepEqual(got, { a: 2, b: 1, other: 103, none: 10 });
});

test('method and code labels are short names; odd methods collapse to "other"', async () => {
  const m = createMetrics({ maxTenantLabels: 0, defaultMetrics: false });
  m.observeCall('/loraplex.v1.InferenceService/Generate', status.OK, 0.5);
  m.observeCall('Generate', status.OK, 0.25);
  m.observeCall('/loraplex.v1.AdapterService/LoadAdapter', status.NOT_FOUND, 0.01);
  m.observeCall('/x/../../etc/passwd with spaces', status.INTERNAL, 0.01);
  const got = (await values(m, 'loraplex_rpc_requests_total')).map((v) => `${v.labels['method']} ${v.labels['code']} ${v.value}`).sort();
  assert.deepEqual(got, ['Generate OK 2', 'LoadAdapter NOT_FOUND 1', 'other INTERNAL 1']);
  const count = (await values(m, 'loraplex_rpc_duration_seconds')).find((v) => v.labels['method'] === 'Generate' && v.labels['le'] === '+Inf');
  assert.equal(count?.value, 2);
  assert.equal(shortMethod('/a.B/C'), 'C');
  assert.equal(statusName(status.RESOURCE_EXHAUSTED), 'RESOURCE_EXHAUSTED');
  assert.equal(statusName(99 as status), 'UNKNOWN');
  assert.equal(statusName('NOT_A_CODE'), 'UNKNOWN');
});

test('request histograms: aborted requests count tokens but not end-to-end time', async () => {
  const m = createMetrics({ maxTenantLabels: 0, defaultMetrics: false });
  m.observeRequest(done());
  m.observeRequest(done({ outcome: 'aborted', timeToFirstTokenSeconds: null, generatedTokens: 0 }));
  const inf = async (name: string) => (await values(m, name)).find((v) => v.labels['le'] === '+Inf')?.value;
  assert.equal(await inf('loraplex_request_duration_seconds'), 1);
  assert.equal(await inf('loraplex_request_queue_seconds'), 2);
  assert.equal(await inf('loraplex_time_to_first_token_seconds'), 1);
});

test('steps, batch sizes and queue gauges', async () => {
  const m = createMetrics({ maxTenantLabels: 0, defaultMetrics: false });
  m.observeStep('prefill', 0.02, 1);
  m.observeStep('decode', 0.01, 3);
  m.observeStep('decode', 0.01, 8);
  m.setQueue({ running: 3, waiting: 2, rowsUsed: 3, rowsFree: 5 });
  m.setKvBlocks({ used: 4, reserved: 6, total: 32 });
  m.observeInterToken(0.04);
  const text = await m.registry.metrics();
  assert.match(text, /^loraplex_engine_step_seconds_count\{kind="prefill"\} 1$/m);
  assert.match(text, /^loraplex_engine_step_seconds_count\{kind="decode"\} 2$/m);
  assert.match(text, /^loraplex_decode_batch_size_bucket\{le="4"\} 1$/m);
  assert.match(text, /^loraplex_decode_batch_size_bucket\{le="8"\} 2$/m);
  assert.match(text, /^loraplex_sequences_running 3$/m);
  assert.match(text, /^loraplex_sequences_waiting 2$/m);
  assert.match(text, /^loraplex_kv_cache_rows_used 3$/m);
  assert.match(text, /^loraplex_kv_cache_rows_free 5$/m);
  assert.match(text, /^loraplex_kv_cache_blocks\{state="used"\} 4$/m);
  assert.match(text, /^loraplex_kv_cache_blocks\{state="reserved"\} 6$/m);
  assert.match(text, /^loraplex_kv_cache_blocks\{state="total"\} 32$/m);
  assert.match(text, /^loraplex_inter_token_latency_seconds_count 1$/m);
});

test('adapter figures come from the getter, once per scrape, and never name an adapter', async () => {
  const m = createMetrics({ maxTenantLabels: 0, defaultMetrics: false });
  let calls = 0;
  const stats: AdapterCounts = { stored: 4, loaded: 2, active: 1, memoryBytes: 1234, loads: 5, evictions: 1, slotEvictions: 2, hits: 7, misses: 3, loadSecondsTotal: 0.75 };
  m.attachAdapters(() => {
    calls++;
    return stats;
  });
  m.observeRequest(done());
  const text = await m.registry.metrics();
  assert.equal(calls, 1);
  assert.match(text, /^loraplex_adapters\{state="stored"\} 4$/m);
  assert.match(text, /^loraplex_adapters\{state="loaded"\} 2$/m);
  assert.match(text, /^loraplex_adapters\{state="active"\} 1$/m);
  assert.match(text, /^loraplex_adapter_memory_bytes 1234$/m);
  assert.match(text, /^loraplex_adapter_loads_total 5$/m);
  assert.match(text, /^loraplex_adapter_evictions_total 1$/m);
  assert.match(text, /^loraplex_adapter_slot_evictions_total 2$/m);
  assert.match(text, /^loraplex_adapter_cache_hits_total 7$/m);
  assert.match(text, /^loraplex_adapter_cache_misses_total 3$/m);
  assert.match(text, /^loraplex_adapter_load_seconds_total 0.75$/m);
  assert.doesNotMatch(text, /secret-adapter/);
  // Counters follow the manager's totals across scrapes (reset + add, never accumulated twice).
  stats.loads = 6;
  await new Promise((r) => setTimeout(r, 600));
  assert.match(await m.registry.metrics(), /^loraplex_adapter_loads_total 6$/m);
});

test('label names stay within the documented sets', async () => {
  const m = createMetrics({ maxTenantLabels: 3, defaultMetrics: false });
  m.attachAdapters(() => ({ stored: 0, loaded: 0, active: 0, memoryBytes: 0, loads: 0, evictions: 0, slotEvictions: 0, hits: 0, misses: 0, loadSecondsTotal: 0 }));
  m.observeCall('Generate', status.OK, 1);
  m.observeRequest(done({ tenant: 't' }));
  m.observeStep('decode', 0.1, 2);
  const allowed = new Set(['method', 'code', 'tenant', 'kind', 'state', 'le']);
  for (const metric of await m.registry.getMetricsAsJSON()) {
    for (const v of metric.values) for (const k of Object.keys(v.labels)) assert.ok(allowed.has(k), `${metric.name}: label ${k}`);
  }
});

test('HTTP: /metrics, /healthz follows ready(), 404 elsewhere', async () => {
  const m = createMetrics({ maxTenantLabels: 0, defaultMetrics: false });
  m.observeCall('Generate', status.OK, 1);
  let ready = false;
  const srv = await startMetricsServer({ port: 0, host: '127.0.0.1', registry: m.registry, ready: () => ready });
  try {
    const base = `http://127.0.0.1:${srv.port}`;
    const metrics = await fetch(`${base}/metrics`);
    assert.equal(metrics.status, 200);
    assert.equal(metrics.headers.get('content-type'), m.registry.contentType);
    assert.match(await metrics.text(), /^loraplex_rpc_requests_total\{method="Generate",code="OK"\} 1$/m);
    const notReady = await fetch(`${base}/healthz`);
    assert.equal(notReady.status, 503);
    await notReady.text();
    ready = true;
    const ok = await fetch(`${base}/healthz`);
    assert.equal(ok.status, 200);
    assert.equal((await ok.text()).trim(), 'ok');
    const missing = await fetch(`${base}/nope`);
    assert.equal(missing.status, 404);
    await missing.text();
    const post = await fetch(`${base}/metrics`, { method: 'POST' });
    assert.equal(post.status, 405);
    await post.text();
  } finally {
    await srv.close();
  }
});
