import { availableParallelism, homedir } from 'node:os';
import { join, resolve } from 'node:path';
import type { QuantKind } from '../../kernels/quant/index.js';
import { BUILTIN_MODEL_DIR } from '../models/builtin.js';
import { DEFAULT_LM_HEAD_QUANT, LM_HEAD_QUANTS } from '../models/linear.js';

/**
 * Every `loraplex serve` setting, declared once. Flags, environment variables, config-file keys, `--help`
 * and the README table are all derived from this list, so they cannot drift apart.
 *
 *   name  camelCase: the config-file key (and the ServerConfig field, see toServerConfig in parse.ts)
 *   flag  `--kebab-case` of the name
 *   env   `LORAPLEX_` + UPPER_SNAKE of the name
 */

export type SettingType = 'string' | 'int' | 'number' | 'bool' | 'enum' | 'path';

export type SettingValue = string | number | boolean | null;

/** Where a default may look (only the environment: defaults never read files). */
export type DefaultEnv = Readonly<Record<string, string | undefined>>;

export interface Setting {
  readonly name: string;
  readonly flag: string;
  readonly env: string;
  readonly type: SettingType;
  /** null = unset (the setting is optional); a function when it depends on the machine or the environment. */
  readonly default: SettingValue | ((env: DefaultEnv) => SettingValue);
  /** How --help shows the default when it is computed or null. */
  readonly defaultText?: string;
  /** int / number: inclusive bounds. */
  readonly min?: number;
  readonly max?: number;
  /** enum: the allowed strings; int: the allowed values, when only a few are. */
  readonly values?: readonly (string | number)[];
  /** path: must exist when set (checked at parse time, so a typo fails at start, not at first use). */
  readonly exists?: 'file' | 'dir' | 'file-or-dir';
  readonly description: string;
}

const kebab = (name: string) => name.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`);
const upperSnake = (name: string) => name.replace(/[A-Z]/g, (c) => `_${c}`).toUpperCase();

type SettingSpec = Omit<Setting, 'flag' | 'env'>;

function setting(s: SettingSpec): Setting {
  return { ...s, flag: `--${kebab(s.name)}`, env: `LORAPLEX_${upperSnake(s.name)}` };
}

export const QUANT_KINDS = ['none', 'int4', 'nf4', 'int8'] as const satisfies readonly QuantKind[];
export const AUTH_MODES = ['required', 'disabled'] as const;
export type AuthMode = (typeof AUTH_MODES)[number];
export const EXECUTION_PROVIDERS = ['cpu', 'cuda'] as const;
export type ExecutionProvider = (typeof EXECUTION_PROVIDERS)[number];
export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;

const MIB = 1024 * 1024;

/** The quantization block size when none is set (blockSize's default depends on the kind). */
export function defaultBlockSize(kind: QuantKind): number {
  return kind === 'nf4' ? 64 : 32;
}

/** $XDG_CACHE_HOME/loraplex, or ~/.cache/loraplex. */
export function cacheDirDefault(env: DefaultEnv): string {
  return join(env['XDG_CACHE_HOME'] || join(homedir(), '.cache'), 'loraplex');
}

export const SETTINGS: readonly Setting[] = [
  // --- model and engine
  setting({ name: 'model', type: 'path', default: BUILTIN_MODEL_DIR, defaultText: 'built-in stories260K', description: 'Hugging Face model directory; unset: the built-in stories260K (a 260K-parameter TinyStories llama, src/models/builtin)' }),
  setting({ name: 'servedModelName', type: 'string', default: null, defaultText: "the model's hub id, else its directory's name", description: 'the base model\'s name in the HTTP API\'s `model` field and /v1/models (as vLLM\'s --served-model-name)' }),
  setting({ name: 'quant', type: 'enum', values: QUANT_KINDS, default: 'int4', description: 'weight quantization' }),
  setting({ name: 'blockSize', type: 'int', values: [16, 32, 64, 128, 256], default: null, defaultText: '32 (64 for nf4)', description: 'quantization block size' }),
  setting({ name: 'accuracyLevel', type: 'int', min: 0, max: 4, default: 4, description: 'MatMulNBits accuracy level for int4/int8 (4 = int8 activations, fast; 0 = float32)' }),
  setting({ name: 'lmHeadQuant', type: 'enum', values: LM_HEAD_QUANTS, default: DEFAULT_LM_HEAD_QUANT, description: "the output head's quantization under a quantized base, in serving and training: int8 and int4 are MatMulNBits with the base's block size (int4 = the base's 4 bits); none = float32 (bitsandbytes QLoRA keeps the head float)" }),
  setting({ name: 'asymmetric', type: 'bool', default: false, description: 'asymmetric int4/int8 quantization (with zero points)' }),
  setting({ name: 'executionProvider', type: 'enum', values: EXECUTION_PROVIDERS, default: 'cpu', description: 'onnxruntime execution provider; cuda needs onnxruntime-node installed with its CUDA 12 libraries (ONNXRUNTIME_NODE_INSTALL=cuda12)' }),
  setting({ name: 'threads', type: 'int', min: 1, max: 256, default: () => Math.min(2, availableParallelism()), defaultText: 'min(2, CPUs)', description: 'onnxruntime intra-op threads' }),
  setting({ name: 'cacheDir', type: 'path', default: cacheDirDefault, defaultText: '$XDG_CACHE_HOME/loraplex or ~/.cache/loraplex', description: 'quantized graph cache; training jobs link the served weights from it (train-graphs/)' }),
  setting({ name: 'maxModelLen', type: 'int', min: 2, max: 1 << 20, default: null, defaultText: "the model's", description: 'tokens per sequence (prompt + generated)' }),
  setting({ name: 'maxNumSeqs', type: 'int', min: 1, max: 1024, default: 16, description: 'sequences decoding at once (KV cache rows; their K/V memory is bounded by kvCacheBytes)' }),
  setting({ name: 'prefillChunk', type: 'int', min: 1, max: 1 << 16, default: 64, description: 'prompt tokens per prefill step' }),
  setting({ name: 'kvCacheBytes', type: 'int', min: 1 * MIB, max: Number.MAX_SAFE_INTEGER, default: 1024 * MIB, defaultText: '1073741824 (1 GiB)', description: 'K/V cache of running sequences (capped at maxNumSeqs x maxModelLen): a pool of 64-token blocks that rows take as they grow and give back when they end; a request starts once its prompt + max_new_tokens fit (else it waits). Memory is committed as blocks are first used; 1 GiB holds about 23000 tokens of a 1B llama' }),
  setting({ name: 'prefixCacheBytes', type: 'int', min: 0, max: Number.MAX_SAFE_INTEGER, default: 256 * MIB, defaultText: '268435456 (256 MiB)', description: 'K/V of prompt prefixes kept for reuse by later prompts with the same start and adapter (LRU, blocks of lcm(64, prefillChunk) tokens; 0 = off); 256 MiB holds about 6000 tokens of a 1B llama, most of a few long system prompts' }),
  setting({ name: 'exactBatches', type: 'bool', default: true, description: 'a request gets the same tokens alone as in any batch. On CPUs whose 4-bit kernel treats a lone row differently (AVX2) a lone decode step then runs as a pair, about 30-40 % slower for one stream; false lets it use the faster kernel (tokens alone may then differ from batched)' }),
  setting({ name: 'allowSpinning', type: 'bool', default: false, description: 'let onnxruntime threads spin between steps (a few % faster, burns idle CPU)' }),
  // --- adapters
  setting({ name: 'adapterRoot', type: 'path', default: 'adapters', defaultText: './adapters', description: 'the adapter store (PEFT directories; <root>/<tenant>/<id> with auth)' }),
  setting({ name: 'maxLoras', type: 'int', min: 1, max: 256, default: 4, description: 'adapter slots in one batch' }),
  setting({ name: 'maxCpuLoras', type: 'int', min: 1, max: 4096, default: 16, description: 'adapters held in memory (at least maxLoras)' }),
  setting({ name: 'maxLoraRank', type: 'int', min: 1, max: 1024, default: 16, description: 'largest adapter rank' }),
  setting({ name: 'maxAdapterBytes', type: 'int', min: 1024, max: Number.MAX_SAFE_INTEGER, default: 512 * MIB, defaultText: '536870912 (512 MiB)', description: 'largest adapter directory on disk, in bytes' }),
  setting({ name: 'exportRoot', type: 'path', default: 'exports', defaultText: './exports', description: 'where merged models are exported' }),
  // --- training
  setting({ name: 'dataRoot', type: 'path', default: 'train-data', defaultText: './train-data', description: 'training data files (Train paths are relative to it and never leave it)' }),
  setting({ name: 'jobRoot', type: 'path', default: 'train-jobs', defaultText: './train-jobs', description: 'training jobs (records, checkpoints); jobs found running or queued here resume on start' }),
  setting({ name: 'trainThreads', type: 'int', min: 1, max: 256, default: 1, description: 'onnxruntime intra-op threads of the training worker (serving keeps --threads)' }),
  setting({ name: 'maxQueuedTrainJobs', type: 'int', min: 0, max: 1 << 16, default: 8, description: 'training jobs waiting behind the running one before RESOURCE_EXHAUSTED' }),
  // --- serving
  setting({ name: 'host', type: 'string', default: '0.0.0.0', description: 'gRPC listen address' }),
  setting({ name: 'port', type: 'int', min: 0, max: 65535, default: 50051, description: 'gRPC port (0 picks a free one; the log says which)' }),
  setting({ name: 'httpPort', type: 'int', min: 0, max: 65535, default: 8080, description: 'OpenAI-compatible HTTP API port (/v1/completions, /v1/chat/completions, /v1/models; 0 = off)' }),
  setting({ name: 'maxWaiting', type: 'int', min: 1, max: 1 << 20, default: 256, description: 'queued requests before RESOURCE_EXHAUSTED' }),
  setting({ name: 'maxNewTokensDefault', type: 'int', min: 1, max: 1 << 20, default: 256, description: 'max new tokens when a request sets none' }),
  setting({ name: 'drainSeconds', type: 'number', min: 0, max: 3600, default: 30, description: 'grace period for running streams on SIGTERM' }),
  // --- security
  setting({ name: 'auth', type: 'enum', values: AUTH_MODES, default: 'required', description: 'API keys on every loraplex RPC (health and reflection stay open); disabled: one flat store, everyone admin' }),
  setting({ name: 'apiKeysFile', type: 'path', exists: 'file-or-dir', default: null, description: 'API keys: a JSON/YAML file {keys: [{key, tenant, role}]}, or a directory of such files (a mounted Secret); SIGHUP reloads' }),
  setting({ name: 'tlsCert', type: 'path', exists: 'file', default: null, description: 'TLS certificate chain (PEM); with --tls-key' }),
  setting({ name: 'tlsKey', type: 'path', exists: 'file', default: null, description: 'TLS private key (PEM); with --tls-cert' }),
  setting({ name: 'tlsClientCa', type: 'path', exists: 'file', default: null, description: 'CA (PEM) for client certificates: enables mTLS (client certificates required and verified)' }),
  // --- observability
  setting({ name: 'logLevel', type: 'enum', values: LOG_LEVELS, default: 'info', description: 'pino level; logs are JSON lines on stdout' }),
  setting({ name: 'logPrompts', type: 'bool', default: false, description: 'include prompt and output text in logs' }),
  setting({ name: 'metricsPort', type: 'int', min: 0, max: 65535, default: 9090, description: 'Prometheus /metrics HTTP port (0 = off)' }),
  setting({ name: 'maxTenantLabels', type: 'int', min: 0, max: 10_000, default: 0, description: 'tenants that get their own metrics label (0 = no tenant label)' }),
];

/** The setting that names the config file; not a setting itself (a config file cannot name another). */
export const CONFIG_FLAG = '--config';
export const CONFIG_ENV = 'LORAPLEX_CONFIG';

export const SETTINGS_BY_NAME: ReadonlyMap<string, Setting> = new Map(SETTINGS.map((s) => [s.name, s]));
export const SETTINGS_BY_FLAG: ReadonlyMap<string, Setting> = new Map(SETTINGS.map((s) => [s.flag, s]));

/** The default of a setting, computed when it depends on the environment. */
export function defaultOf(s: Setting, env: DefaultEnv): SettingValue {
  return typeof s.default === 'function' ? s.default(env) : s.default;
}

/** A setting's default as parseConfig would give it (paths resolved against cwd). */
export function settingDefault(name: string, env: DefaultEnv = process.env, cwd = process.cwd()): SettingValue {
  const s = SETTINGS_BY_NAME.get(name);
  if (!s) throw new Error(`no setting ${name}`);
  const d = defaultOf(s, env);
  return s.type === 'path' && typeof d === 'string' ? resolve(cwd, d) : d;
}

/** The rule a value must follow, as error messages and --help state it: `an integer in [1, 256]`. */
export function ruleOf(s: Setting): string {
  switch (s.type) {
    case 'int':
    case 'number': {
      const what = s.type === 'int' ? 'an integer' : 'a number';
      if (s.values) return `one of ${s.values.join(', ')}`;
      if (s.min !== undefined && s.max !== undefined && s.max !== Number.MAX_SAFE_INTEGER) return `${what} in [${s.min}, ${s.max}]`;
      if (s.min !== undefined) return `${what} >= ${s.min}`;
      return what;
    }
    case 'bool':
      return 'true or false';
    case 'enum':
      return `one of ${s.values!.join(', ')}`;
    case 'path':
      return s.exists === 'dir' ? 'an existing directory' : s.exists === 'file' ? 'an existing file' : s.exists ? 'an existing file or directory' : 'a path';
    case 'string':
      return 'a non-empty string';
  }
}
