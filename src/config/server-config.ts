import type { ModelQuant } from '../models/linear.js';
import { basename } from 'node:path';
import { settingDefault, type AuthMode, type ExecutionProvider } from './schema.js';

/** What the engine needs to start (src/engine/start.ts); `loraplex generate` builds it from its own flags. */
export interface EngineSettings {
  modelDir: string;
  quant: ModelQuant;
  threads: number;
  cacheDir: string;
  maxModelLen: number | null;
  maxNumSeqs: number;
  maxLoras: number;
  maxLoraRank: number;
  prefillChunk: number;
  allowSpinning: boolean;
  /** Default true: alone == batched even where a lone row needs a pair (see Runtime.pairsSingleRows). */
  exactBatches?: boolean;
  /** Bytes of the K/V cache of running sequences (a pool of 64-token blocks); absent: enough for maxNumSeqs rows at maxModelLen. */
  kvCacheBytes?: number | undefined;
  /** Default cpu. */
  executionProvider?: ExecutionProvider;
}

/** `loraplex serve`'s settings, as parseConfig (parse.ts) builds them from the schema. */
export interface ServerConfig extends EngineSettings {
  host: string;
  /** 0 picks a free port (tests). */
  port: number;
  /** The OpenAI-compatible HTTP API's port; 0 = off. */
  httpPort: number;
  /** The base model's name in the HTTP API (`model`, /v1/models); default the model's hub id, else its directory's name (models/model-name.ts). */
  servedModelName: string;
  adapterRoot: string;
  maxCpuLoras: number;
  maxWaiting: number;
  maxAdapterBytes: number;
  maxNewTokensDefault: number;
  /** Grace period for running streams on SIGTERM. */
  drainSeconds: number;
  /** Shown by GetModelInfo: the model directory. */
  source: string;
  /** Where merged models are exported. */
  exportRoot: string;
  /** 'required': every loraplex RPC needs an API key from apiKeysFile; 'disabled': everyone is LOCAL_PRINCIPAL. */
  auth: AuthMode;
  /** A JSON/YAML keys file, or a directory of them (a mounted Secret); see src/rpc/auth.ts. */
  apiKeysFile: string | null;
  /** PEM files; cert + key = TLS, + clientCa = mutual TLS. */
  tlsCert: string | null;
  tlsKey: string | null;
  tlsClientCa: string | null;
  logLevel: string;
  /** Include prompt and output text in logs. */
  logPrompts: boolean;
  /** Prometheus /metrics HTTP port; 0 = off. */
  metricsPort: number;
  /** How many tenants get their own metrics label (0 = none). */
  maxTenantLabels: number;
  /** Training data files; Train paths are relative to it and never leave it. */
  dataRoot: string;
  /** Training job records and checkpoints; jobs found running or queued here resume on start. */
  jobRoot: string;
  /** onnxruntime intra-op threads of the training worker. */
  trainThreads: number;
  /** Jobs waiting behind the running one before Train says RESOURCE_EXHAUSTED. */
  maxQueuedTrainJobs: number;
  /** Bytes of prompt-prefix K/V kept for reuse; 0 = off. */
  prefixCacheBytes: number;
}

/** Settings added after the first release: callers that build a ServerConfig by hand may leave them out. */
const ADDED_SETTINGS = ['exportRoot', 'auth', 'apiKeysFile', 'tlsCert', 'tlsKey', 'tlsClientCa', 'logLevel', 'logPrompts', 'metricsPort', 'maxTenantLabels', 'dataRoot', 'jobRoot', 'trainThreads', 'maxQueuedTrainJobs', 'prefixCacheBytes', 'servedModelName', 'httpPort', 'kvCacheBytes'] as const satisfies readonly (keyof ServerConfig)[];
type AddedSettings = (typeof ADDED_SETTINGS)[number];

/** What startServer takes: a ServerConfig whose later settings default as in the schema. */
export type ServerConfigInput = Omit<ServerConfig, AddedSettings> & Partial<Pick<ServerConfig, AddedSettings>>;

/** Fills the added settings left out with the schema's defaults (auth 'required' included: it needs apiKeysFile). */
export function withDefaults(cfg: ServerConfigInput): ServerConfig {
  const out: Record<string, unknown> = { ...cfg };
  for (const name of ADDED_SETTINGS) if (out[name] === undefined) out[name] = settingDefault(name);
  if (out['servedModelName'] === null) out['servedModelName'] = basename(cfg.modelDir);
  return out as unknown as ServerConfig;
}
