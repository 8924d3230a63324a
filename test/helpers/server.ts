import assert from 'node:assert/strict';
import * as grpc from '@grpc/grpc-js';
import { pino } from 'pino';
import type { ServerConfig } from '../../src/config/server-config.js';
import { startServer, type RunningServer } from '../../src/main.js';
import { makeClient } from '../../src/rpc/bridge.js';
import { AdapterService } from '../../src/gen/loraplex/v1/adapters_pb.js';
import { InferenceService, type GenerateResponse } from '../../src/gen/loraplex/v1/inference_pb.js';
import { TrainService } from '../../src/gen/loraplex/v1/train_pb.js';
import type { ModelQuant } from '../../src/models/linear.js';
import { STORIES, tempDir } from './engine.js';

export interface TestServer {
  server: RunningServer;
  address: string;
  adapterRoot: string;
  inference: ReturnType<typeof makeClient<(typeof InferenceService)['method']>>;
  adapters: ReturnType<typeof makeClient<(typeof AdapterService)['method']>>;
  train: ReturnType<typeof makeClient<(typeof TrainService)['method']>>;
  /** The HTTP API's base URL (`http://127.0.0.1:<port>/v1`) when options.httpApi asked for it. */
  httpUrl: string | null;
  /** The training roots (temporary unless overridden). */
  dataRoot: string;
  jobRoot: string;
  /** The quantized graph cache (temporary unless overridden). */
  cacheDir: string;
  close(): Promise<void>;
}

export interface TestServerOptions {
  /** For the typed clients (default: plaintext); e.g. TLS with the test CA. */
  credentials?: grpc.ChannelCredentials;
  /** e.g. grpc.ssl_target_name_override. */
  channelOptions?: grpc.ChannelOptions;
  /** Also serve the OpenAI-compatible HTTP API (on a free port: TestServer.httpUrl). */
  httpApi?: boolean;
  /** Collects the server's log lines (info and up), parsed; without it the server logs nothing. */
  logLines?: Record<string, unknown>[];
}

/**
 * A real loraplex server on 127.0.0.1 (a free port) with the real engine, and typed clients. Auth is disabled
 * unless overrides say otherwise (then the clients must send keys themselves).
 */
export async function startTestServer(
  overrides: Partial<ServerConfig> = {},
  quant: ModelQuant = { kind: 'int4', blockSize: 32, accuracyLevel: 4 },
  options: TestServerOptions = {},
): Promise<TestServer> {
  const adapterRoot = overrides.adapterRoot ?? tempDir('adapters');
  const cfg: ServerConfig = {
    modelDir: STORIES,
    quant,
    threads: 1,
    cacheDir: tempDir('server-cache'),
    maxModelLen: 256,
    maxNumSeqs: 8,
    maxLoras: 4,
    maxLoraRank: 16,
    prefillChunk: 16,
    allowSpinning: false,
    host: '127.0.0.1',
    port: 0,
    adapterRoot,
    maxCpuLoras: 8,
    maxWaiting: 64,
    maxAdapterBytes: 64 * 1024 * 1024,
    maxNewTokensDefault: 32,
    drainSeconds: 5,
    source: STORIES,
    exportRoot: tempDir('exports'),
    auth: 'disabled',
    apiKeysFile: null,
    tlsCert: null,
    tlsKey: null,
    tlsClientCa: null,
    logLevel: 'silent',
    logPrompts: false,
    metricsPort: 0,
    // Off unless a test asks (options.httpApi).
    httpPort: 0,
    servedModelName: 'stories260K',
    maxTenantLabels: 0,
    dataRoot: tempDir('train-data'),
    jobRoot: tempDir('train-jobs'),
    trainThreads: 1,
    maxQueuedTrainJobs: 8,
    // Off unless a test asks: prefix reuse has its own tests (test/server/prefix-cache.test.ts).
    prefixCacheBytes: 0,
    ...overrides,
  };
  const lines = options.logLines;
  const log = lines ? pino({ level: 'info' }, { write: (line: string) => void lines.push(JSON.parse(line) as Record<string, unknown>) }) : pino({ level: 'silent' });
  const server = await startServer(cfg, log, options.httpApi ? { httpPort: 0 } : {});
  const address = `127.0.0.1:${server.port}`;
  const clientOptions = { ...(options.credentials ? { credentials: options.credentials } : {}), ...(options.channelOptions ? { channelOptions: options.channelOptions } : {}) };
  const inference = makeClient(InferenceService, address, clientOptions);
  const adapters = makeClient(AdapterService, address, clientOptions);
  const train = makeClient(TrainService, address, clientOptions);
  return {
    server,
    address,
    adapterRoot,
    inference,
    adapters,
    train,
    httpUrl: server.httpPort === null ? null : `http://127.0.0.1:${server.httpPort}/v1`,
    dataRoot: cfg.dataRoot,
    jobRoot: cfg.jobRoot,
    cacheDir: cfg.cacheDir,
    async close() {
      inference.close();
      adapters.close();
      train.close();
      await server.close();
    },
  };
}

export interface Collected {
  tokenIds: number[];
  text: string;
  finished: Extract<GenerateResponse['event'], { case: 'finished' }>['value'] | null;
  messages: number;
}

export async function collect(stream: AsyncIterable<GenerateResponse>): Promise<Collected> {
  const out: Collected = { tokenIds: [], text: '', finished: null, messages: 0 };
  for await (const m of stream) {
    out.messages++;
    if (m.event.case === 'delta') {
      out.tokenIds.push(...m.event.value.tokenIds);
      out.text += m.event.value.text;
    } else if (m.event.case === 'finished') out.finished = m.event.value;
  }
  return out;
}

/** The status of a call that must fail. */
export async function failure(p: Promise<unknown>): Promise<{ code: grpc.status; details: string }> {
  try {
    await p;
  } catch (e) {
    const err = e as grpc.ServiceError;
    return { code: err.code, details: err.details };
  }
  assert.fail('the call succeeded');
}
