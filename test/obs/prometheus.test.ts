/**
 * A real Prometheus (Debian's `prometheus` package; .ci/run installs it) scrapes a real loraplex server, with
 * the scrape config generated from deploy/prometheus/prometheus.yml, and its query API must show what the
 * clients saw. promtool checks the config, the rules and the /metrics output.
 *
 * The server is started with the request log as its RPC observer (startServer's hooks); until main.ts wires
 * the metrics itself, the test attaches the scheduler observer and the adapter stats the way main.ts will.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { accessSync, constants, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { delimiter, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import type { MessageInitShape } from '@bufbuild/protobuf';
import * as grpc from '@grpc/grpc-js';
import { pino } from 'pino';
import YAML from 'yaml';
import { makeRandomAdapter, writePeftAdapter } from '../../src/adapters/peft.js';
import { GenerateRequestSchema, InferenceService } from '../../src/gen/loraplex/v1/inference_pb.js';
import { startServer, type RunningServer } from '../../src/main.js';
import { readModelSpec } from '../../src/models/config.js';
import { startMetricsServer, type MetricsServer } from '../../src/obs/http.js';
import { createMetrics, type Metrics } from '../../src/obs/metrics.js';
import { createRequestLog } from '../../src/rpc/request-log.js';
import { makeClient } from '../../src/rpc/bridge.js';
import { STORIES, tempDir } from '../helpers/engine.js';
import { collect } from '../helpers/server.js';

const run = promisify(execFile);
const root = fileURLToPath(new URL('../../../', import.meta.url));
const CONFIG = join(root, 'deploy/prometheus/prometheus.yml');
const INSTALL = 'apt-get install -y --no-install-recommends prometheus (.ci/run does this)';
const WAIT_MS = 30_000;

function onPath(name: string): string | undefined {
  for (const dir of ['/usr/bin', ...(process.env['PATH'] ?? '').split(delimiter)]) {
    try {
      accessSync(join(dir, name), constants.X_OK);
      return join(dir, name);
    } catch {
      // not in this directory
    }
  }
  return undefined;
}

/** Fails (never skips) with what to install: CI installs it, so a missing package is a broken setup. */
function requireTools(): { prometheus: string; promtool: string } {
  const prometheus = onPath('prometheus');
  const promtool = onPath('promtool');
  assert.ok(prometheus, `prometheus not found: ${INSTALL}`);
  assert.ok(promtool, `promtool not found: ${INSTALL}`);
  return { prometheus, promtool };
}

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as { port: number };
      s.close(() => resolve(port));
    });
  });
}

/** deploy/prometheus/prometheus.yml with the loraplex job pointed at `target`, scraping every second. */
function scrapeConfig(target: string): string {
  const doc = YAML.parse(readFileSync(CONFIG, 'utf8')) as {
    global?: Record<string, unknown>;
    rule_files?: string[];
    scrape_configs: { job_name: string; static_configs?: { targets: string[] }[]; scrape_interval?: string; scrape_timeout?: string }[];
  };
  doc.global = { ...doc.global, scrape_interval: '1s', evaluation_interval: '1s' };
  doc.rule_files = (doc.rule_files ?? []).map((f) => join(root, 'deploy/prometheus', f));
  const job = doc.scrape_configs.find((j) => j.job_name === 'loraplex');
  assert.ok(job, 'prometheus.yml has a job named loraplex');
  job.static_configs = [{ targets: [target] }];
  job.scrape_interval = '1s';
  job.scrape_timeout = '1s';
  return YAML.stringify(doc);
}

interface Sample {
  metric: Record<string, string>;
  value: [number, string];
}

async function query(base: string, q: string): Promise<Sample[]> {
  const res = await fetch(`${base}/api/v1/query?query=${encodeURIComponent(q)}`);
  const body = (await res.json()) as { status: string; data?: { result: Sample[] }; error?: string };
  assert.equal(body.status, 'success', `${q}: ${body.error}`);
  return body.data!.result;
}

/** Polls until `check` passes on the query's result (bounded); fails with the last result seen. */
async function eventually(base: string, q: string, check: (r: Sample[]) => boolean): Promise<Sample[]> {
  const end = Date.now() + WAIT_MS;
  let last: Sample[] | string = 'no answer';
  while (Date.now() < end) {
    if (prom && prom.exitCode !== null) assert.fail(`prometheus exited with code ${prom.exitCode}:\n${promLog.slice(-3000)}`);
    try {
      last = await query(base, q);
      if (check(last)) return last;
    } catch (err) {
      last = String(err);
    }
    await new Promise((r) => setTimeout(r, 250));
  }
  assert.fail(`${q}: not as expected within ${WAIT_MS / 1000} s; last: ${JSON.stringify(last)}\nprometheus log:\n${promLog.slice(-3000)}`);
}

const value = (r: Sample[]) => r.reduce((n, s) => n + Number(s.value[1]), 0);

let tools: { prometheus: string; promtool: string };
let server: RunningServer;
let client: ReturnType<typeof makeClient<(typeof InferenceService)['method']>>;
let adapterRoot = '';
let metrics: Metrics;
let http: MetricsServer;
let prom: ChildProcess | null = null;
let promBase = '';
let promLog = '';
let dataDir = '';

before(async () => {
  tools = requireTools();
  metrics = createMetrics({ maxTenantLabels: 0 });
  const log = pino({ level: 'silent' });
  adapterRoot = tempDir('adapters');
  server = await startServer(
    {
      modelDir: STORIES, quant: { kind: 'int4', blockSize: 32, accuracyLevel: 4 }, threads: 1, cacheDir: tempDir('server-cache'), maxModelLen: 256, maxNumSeqs: 8, maxLoras: 4,
      maxLoraRank: 16, prefillChunk: 16, allowSpinning: false, host: '127.0.0.1', port: 0, adapterRoot, maxCpuLoras: 8, maxWaiting: 64,
      maxAdapterBytes: 64 * 1024 * 1024, maxNewTokensDefault: 32, drainSeconds: 5, source: STORIES, auth: 'disabled', metricsPort: 0, httpPort: 0,
    },
    log,
    { observer: createRequestLog({ log, metrics }) },
  );
  // What main.ts does once wired: the scheduler reports to the metrics, the adapter stats are read per scrape.
  server.app.scheduler.observer = metrics;
  metrics.attachAdapters(() => server.app.adapters.stats());
  http = await startMetricsServer({ port: 0, host: '127.0.0.1', registry: metrics.registry, ready: () => true });
  client = makeClient(InferenceService, `127.0.0.1:${server.port}`);
  writePeftAdapter(join(adapterRoot, 'prom-adapter'), makeRandomAdapter(readModelSpec(STORIES), { r: 4, alpha: 8, targetModules: ['q_proj', 'v_proj'], seed: 3, bStd: 0.3 }));

  dataDir = tempDir('prometheus');
  const configFile = join(dataDir, 'prometheus.yml');
  writeFileSync(configFile, scrapeConfig(`127.0.0.1:${http.port}`));
  const port = await freePort();
  promBase = `http://127.0.0.1:${port}`;
  // The binary itself, never the Debian service: a private config, storage and port, killed in after().
  prom = spawn(tools.prometheus, [`--config.file=${configFile}`, `--storage.tsdb.path=${join(dataDir, 'data')}`, `--web.listen-address=127.0.0.1:${port}`, '--log.level=warn'], { stdio: ['ignore', 'pipe', 'pipe'] });
  const keep = (b: Buffer) => (promLog = (promLog + b.toString()).slice(-20_000));
  prom.stdout!.on('data', keep);
  prom.stderr!.on('data', keep);
});

after(async () => {
  if (prom && prom.exitCode === null) {
    const exited = new Promise((r) => prom!.once('exit', r));
    prom.kill('SIGTERM');
    const timer = setTimeout(() => prom?.kill('SIGKILL'), 5000);
    await exited;
    clearTimeout(timer);
  }
  await http?.close();
  client?.close();
  await server?.close();
  for (const dir of [dataDir, adapterRoot]) if (dir) rmSync(dir, { recursive: true, force: true });
});

/** A Generate call: the collected stream, or null with the status code checked. */
async function generate(request: MessageInitShape<typeof GenerateRequestSchema>, expectCode = grpc.status.OK) {
  try {
    const r = await collect(client.generate(request));
    assert.equal(expectCode, grpc.status.OK);
    return r;
  } catch (err) {
    assert.equal((err as grpc.ServiceError).code, expectCode, String(err));
    return null;
  }
}

test('promtool accepts deploy/prometheus (config and rules)', async () => {
  const { stdout } = await run(tools.promtool, ['check', 'config', CONFIG]);
  assert.match(stdout, /SUCCESS/);
  const rules = await run(tools.promtool, ['check', 'rules', join(root, 'deploy/prometheus/loraplex.rules.yml')]);
  assert.match(rules.stdout, /SUCCESS/);
});

test('Prometheus scrapes loraplex and sees the tokens the clients received', async () => {
  const text = (value: string) => ({ case: 'text' as const, value });
  const results = await Promise.all([
    generate({ prompt: text('Once upon a time'), sampling: { temperature: 0, maxNewTokens: 12 } }),
    generate({ prompt: text('The cat sat'), sampling: { temperature: 0, maxNewTokens: 7 } }),
    generate({ prompt: text('Lily went to the park'), adapterId: 'prom-adapter', sampling: { temperature: 0, maxNewTokens: 9 } }),
  ]);
  await generate({ prompt: text('Hello'), adapterId: 'no-such-adapter' }, grpc.status.NOT_FOUND);
  const received = results.reduce((n, r) => n + r!.tokenIds.length, 0);
  const prompted = results.reduce((n, r) => n + r!.finished!.promptTokens, 0);
  assert.equal(received, 12 + 7 + 9);

  // The exposition itself passes promtool's linter (names, units, types, help).
  const res = await fetch(`http://127.0.0.1:${http.port}/metrics`);
  const body = await res.text();
  const check = spawn(tools.promtool, ['check', 'metrics'], { stdio: ['pipe', 'pipe', 'pipe'] });
  let lint = '';
  check.stdout.on('data', (b: Buffer) => (lint += b.toString()));
  check.stderr.on('data', (b: Buffer) => (lint += b.toString()));
  check.stdin.end(body);
  const code = await new Promise<number | null>((r) => check.once('exit', r));
  assert.equal(code, 0, `promtool check metrics:\n${lint}`);
  assert.doesNotMatch(body, /prom-adapter/, 'no adapter id in any label');

  await eventually(promBase, 'up{job="loraplex"}', (r) => r.length === 1 && r[0]!.value[1] === '1');
  await eventually(promBase, 'loraplex_generated_tokens_total', (r) => r.length === 1 && value(r) === received);
  await eventually(promBase, 'loraplex_prompt_tokens_total', (r) => value(r) === prompted);
  await eventually(promBase, 'loraplex_rpc_requests_total{method="Generate",code="OK"}', (r) => value(r) === 3);
  await eventually(promBase, 'loraplex_rpc_requests_total{method="Generate",code="NOT_FOUND"}', (r) => value(r) === 1);
  await eventually(promBase, 'loraplex_request_duration_seconds_count', (r) => value(r) === 3);
  await eventually(promBase, 'loraplex_time_to_first_token_seconds_count', (r) => value(r) === 3);
  await eventually(promBase, 'loraplex_inter_token_latency_seconds_count', (r) => value(r) === received - 3);
  await eventually(promBase, 'loraplex_engine_step_seconds_count{kind="decode"}', (r) => value(r) > 0);
  await eventually(promBase, 'loraplex_adapter_loads_total', (r) => value(r) === 1);
  await eventually(promBase, 'sum(loraplex_adapters{state=~"loaded|active"})', (r) => value(r) === 1);
  await eventually(promBase, 'loraplex_sequences_running', (r) => r.length === 1 && value(r) === 0);
  await eventually(promBase, 'loraplex_kv_cache_rows_free', (r) => value(r) === server.app.cfg.maxNumSeqs);
  // Idle again: every KV block is back in the pool.
  await eventually(promBase, 'loraplex_kv_cache_blocks{state="used"}', (r) => r.length === 1 && value(r) === 0);
  await eventually(promBase, 'loraplex_kv_cache_blocks{state="total"}', (r) => value(r) > 0);
  await eventually(promBase, 'loraplex_process_resident_memory_bytes', (r) => value(r) > 0);
  // The recording rules evaluate against the scraped series.
  await eventually(promBase, 'loraplex:generated_tokens:rate1m', (r) => r.length === 1);
});
