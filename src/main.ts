import { mkdirSync } from 'node:fs';
import * as grpc from '@grpc/grpc-js';
import { AdapterManager } from './adapters/manager.js';
import { AdapterStore } from './adapters/store.js';
import { startEngine, type EngineSettings, type LoadedEngine } from './cli/common.js';
import type { Logger } from './obs/logger.js';
import { createRpcServer, type App } from './rpc/server.js';
import { Scheduler } from './scheduler/scheduler.js';

/** The composition root: config -> engine -> adapters -> scheduler -> rpc. No logic of its own. */
export interface ServerConfig extends EngineSettings {
  host: string;
  /** 0 picks a free port (tests). */
  port: number;
  adapterRoot: string;
  maxCpuLoras: number;
  maxWaiting: number;
  maxAdapterBytes: number;
  maxNewTokensDefault: number;
  /** Grace period for running streams on SIGTERM. */
  drainSeconds: number;
  /** Shown by GetModelInfo: the model directory, or 'demo'. */
  source: string;
}

export interface RunningServer {
  port: number;
  app: App;
  /** Health NOT_SERVING, finish running streams within drainSeconds, then stop. */
  drain(): Promise<void>;
  /** Immediate stop (tests). */
  close(): Promise<void>;
}

export async function startServer(cfg: ServerConfig, log: Logger): Promise<RunningServer> {
  // The port answers at once (health NOT_SERVING, RPCs UNAVAILABLE) while the model loads.
  const rpc = createRpcServer(log);
  const port = await new Promise<number>((resolve, reject) =>
    rpc.server.bindAsync(`${cfg.host}:${cfg.port}`, grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))),
  );
  log.info({ port, host: cfg.host }, 'listening; loading the model');
  let loaded: LoadedEngine;
  try {
    loaded = await startEngine(cfg);
  } catch (e) {
    rpc.server.forceShutdown();
    throw e;
  }
  const { engine, compiled, tokenizer, maxModelLen } = loaded;
  log.info({ model: cfg.source, quant: cfg.quant.kind, cached: compiled.cached, startSeconds: +loaded.startSeconds.toFixed(2), kvCacheBytes: engine.info.kvCacheBytes, loraPoolBytes: engine.info.loraPoolBytes }, 'model ready');
  mkdirSync(cfg.adapterRoot, { recursive: true });
  const adapters = new AdapterManager({
    store: new AdapterStore(cfg.adapterRoot),
    spec: compiled.spec,
    loraModules: compiled.layout.loraModules,
    maxLoras: cfg.maxLoras,
    maxCpuLoras: cfg.maxCpuLoras,
    maxLoraRank: cfg.maxLoraRank,
    maxAdapterBytes: cfg.maxAdapterBytes,
    slotWriter: engine,
  });
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
    },
    (err) => log.error({ err }, 'engine step failed'),
  );
  const app: App = { cfg, compiled, tokenizer, maxModelLen, adapters, scheduler };
  rpc.setApp(app);
  rpc.health.setServing(true);
  log.info({ port }, 'serving');

  let closed = false;
  const close = async () => {
    if (closed) return;
    closed = true;
    rpc.health.setServing(false);
    await scheduler.close();
    rpc.server.forceShutdown();
    await engine.close();
  };
  return {
    port,
    app,
    async drain() {
      rpc.health.setServing(false);
      rpc.setDraining();
      log.info({ graceSeconds: cfg.drainSeconds }, 'draining');
      await scheduler.drain(cfg.drainSeconds * 1000);
      await new Promise<void>((resolve) => rpc.server.tryShutdown(() => resolve()));
      await close();
      log.info('stopped');
    },
    close,
  };
}
