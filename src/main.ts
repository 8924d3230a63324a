import { join } from 'node:path';
import { mkdirSync } from 'node:fs';
import { AdapterManager } from './adapters/manager.js';
import { AdapterStore } from './adapters/store.js';
import { sweepExportTemps } from './adapters/export.js';
import { modelName } from './models/model-name.js';
import { withDefaults, type ServerConfigInput } from './config/server-config.js';
import { startEngine, type LoadedEngine } from './engine/start.js';
import type { Logger } from './obs/logger.js';
import { startMetricsServer, type MetricsServer } from './obs/http.js';
import { createHttpApi, type HttpApi } from './http/server.js';
import { createMetrics, type Metrics } from './obs/metrics.js';
import { createAuthenticator } from './rpc/auth.js';
import type { CallObserver } from './rpc/bridge.js';
import { createRequestLog } from './rpc/request-log.js';
import type { App } from './rpc/app.js';
import { createRpcServer } from './rpc/server.js';
import { serverCredentials, tlsMode } from './rpc/tls.js';
import { Scheduler } from './scheduler/scheduler.js';
import { JobManager } from './train/jobs.js';
import { WorkerRunner } from './train/runner.js';
import { WorkerPool } from './workers/pool.js';
import { pooledAdapterIo, type Tasks } from './workers/tasks.js';

/**
 * Threads for heavy request work (src/workers/tasks.ts). Two: a long merge or export does not hold up adapter
 * loads and large prompts, and with the engine worker's threads the CPUs are full anyway.
 */
const TASK_THREADS = 2;

/** Extension points for the composition root's callers. */
export interface ServerHooks {
  /** Sees every loraplex RPC when it ends, besides the built-in request log and metrics. */
  observer?: CallObserver;
  /** The metrics to fill (tests pass their own); default: a new registry. */
  metrics?: Metrics;
  /** Serve the HTTP API on this port whatever cfg.httpPort says; 0 picks a free one (tests). */
  httpPort?: number;
}

export interface RunningServer {
  port: number;
  app: App;
  metrics: Metrics;
  /** The /metrics HTTP port, or null when metricsPort is 0. */
  metricsPort: number | null;
  /** The OpenAI-compatible HTTP API's port, or null when it is off. */
  httpPort: number | null;
  /** Re-reads the API keys file (SIGHUP); keeps the old keys and throws when the new file is broken. */
  reloadApiKeys(): number;
  /** Health NOT_SERVING, finish running streams within drainSeconds, then stop. */
  drain(): Promise<void>;
  /** Immediate stop (tests). */
  close(): Promise<void>;
}

/** The composition root: config -> engine -> adapters -> scheduler -> rpc. No logic of its own. */
export async function startServer(input: ServerConfigInput, log: Logger, hooks: ServerHooks = {}): Promise<RunningServer> {
  const cfg = withDefaults(input);
  // Keys and certificates are checked before anything slow, so a bad file fails the start at once.
  const auth = createAuthenticator(cfg);
  const credentials = serverCredentials(cfg);
  // The port answers at once (health NOT_SERVING, RPCs UNAVAILABLE) while the model loads.
  const metrics = hooks.metrics ?? createMetrics({ maxTenantLabels: cfg.maxTenantLabels });
  const requestLog = createRequestLog({ log, metrics, logPrompts: cfg.logPrompts });
  const extra = hooks.observer;
  const observer: CallObserver = extra ? { onCallEnd: (info) => (requestLog.onCallEnd(info), extra.onCallEnd(info)) } : requestLog;
  const rpc = createRpcServer(log, { authenticate: (md) => auth.authenticate(md), observer });
  const port = await new Promise<number>((resolve, reject) =>
    rpc.server.bindAsync(`${cfg.host}:${cfg.port}`, credentials, (err, p) => (err ? reject(err) : resolve(p))),
  );
  log.info({ port, host: cfg.host, auth: cfg.auth, tls: tlsMode(cfg) }, 'listening; loading the model');
  let serving = false;
  let metricsHttp: MetricsServer | null = null;
  let httpApi: HttpApi | null = null;
  let httpPort: number | null = null;
  let loaded: LoadedEngine;
  try {
    const wantedHttpPort = hooks.httpPort ?? (cfg.httpPort !== 0 ? cfg.httpPort : null);
    if (wantedHttpPort !== null) {
      // Plain HTTP: TLS, where wanted, belongs to a proxy or ingress in front of it.
      httpApi = createHttpApi({ state: rpc.state, authenticate: (md) => auth.authenticate(md), observer, onError: (err, method) => log.error({ err, method }, 'internal error') });
      httpPort = await httpApi.listen(wantedHttpPort, cfg.host);
      log.info({ httpPort }, 'OpenAI-compatible HTTP API listening');
    }
    if (cfg.metricsPort !== 0) {
      metricsHttp = await startMetricsServer({ port: cfg.metricsPort, host: cfg.host, registry: metrics.registry, ready: () => serving });
      log.info({ metricsPort: metricsHttp.port }, 'metrics listening');
    }
    loaded = await startEngine(cfg);
  } catch (e) {
    rpc.server.forceShutdown();
    await metricsHttp?.close();
    await httpApi?.close();
    throw e;
  }
  const { engine, compiled, tokenizer, maxModelLen } = loaded;
  log.info({ model: cfg.source, quant: cfg.quant.kind, cached: compiled.cached, contentHashed: compiled.contentHashed, startSeconds: +loaded.startSeconds.toFixed(2), kvCacheBytes: engine.info.kvCacheBytes, loraPoolBytes: engine.info.loraPoolBytes, pairsSingleRows: engine.info.pairsSingleRows }, 'model ready');
  mkdirSync(cfg.adapterRoot, { recursive: true });
  sweepExportTemps(cfg.exportRoot);
  const pool = new WorkerPool<Tasks>(new URL('./workers/task-worker.js', import.meta.url), { size: TASK_THREADS });
  const adapters = new AdapterManager({
    store: new AdapterStore(cfg.adapterRoot),
    spec: compiled.spec,
    loraModules: compiled.layout.loraModules,
    maxLoras: cfg.maxLoras,
    maxCpuLoras: cfg.maxCpuLoras,
    maxLoraRank: cfg.maxLoraRank,
    maxAdapterBytes: cfg.maxAdapterBytes,
    slotWriter: engine,
    io: pooledAdapterIo(pool, cfg.adapterRoot),
  });
  metrics.attachAdapters(() => adapters.stats());
  const scheduler = new Scheduler(
    engine,
    adapters,
    tokenizer,
    {
      maxNumSeqs: cfg.maxNumSeqs,
      maxWaiting: cfg.maxWaiting,
      maxModelLen,
      prefillChunk: cfg.prefillChunk,
      eosTokenIds: compiled.spec.eosTokenIds,
      prefixCacheBytes: cfg.prefixCacheBytes,
    },
    (err) => log.error({ err }, 'engine step failed'),
    metrics,
  );
  // Training runs in its own worker thread (its own onnxruntime session and trainThreads), so serving keeps
  // the engine worker and the event loop. The job root is created on the first job, not here.
  const jobs = new JobManager({
    jobRoot: cfg.jobRoot,
    runner: new WorkerRunner({ modelDir: cfg.modelDir, servedModelPath: compiled.modelPath, graphRoot: join(cfg.cacheDir, 'train-graphs'), quant: cfg.quant, threads: cfg.trainThreads, baseModelNameOrPath: modelName(cfg.modelDir) }),
    writeAdapter: (key, adapter) => adapters.create(key, adapter),
    maxQueued: cfg.maxQueuedTrainJobs,
    log,
    onStep: (loss, tps) => metrics.observeTrainStep(loss, tps),
    onRunEnd: () => metrics.observeTrainIdle(),
  });
  metrics.attachTrainJobs(() => jobs.counts());
  const app: App = { cfg, compiled, tokenizer, maxModelLen, adapters, scheduler, jobs, pool };
  rpc.setApp(app);
  rpc.health.setServing(true);
  serving = true;
  log.info({ port }, 'serving');
  try {
    jobs.recover();
  } catch (err) {
    // Serving goes on; the job root's problem shows here and in every Train call.
    log.error({ err, jobRoot: cfg.jobRoot }, 'reading the training jobs failed');
  }

  let closed = false;
  const close = async () => {
    if (closed) return;
    closed = true;
    serving = false;
    rpc.health.setServing(false);
    // The running job stops at its next step and stays `running` on disk: the next start resumes it.
    await jobs.close();
    await scheduler.close();
    rpc.server.forceShutdown();
    await pool.close();
    await engine.close();
    await metricsHttp?.close();
    await httpApi?.close();
  };
  return {
    port,
    app,
    metrics,
    metricsPort: metricsHttp?.port ?? null,
    httpPort,
    reloadApiKeys: () => auth.reload(),
    async drain() {
      serving = false;
      rpc.health.setServing(false);
      rpc.setDraining();
      log.info({ graceSeconds: cfg.drainSeconds }, 'draining');
      await Promise.all([scheduler.drain(cfg.drainSeconds * 1000), jobs.close()]);
      await new Promise<void>((resolve) => rpc.server.tryShutdown(() => resolve()));
      await close();
      log.info('stopped');
    },
    close,
  };
}
