import { readFileSync, statSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { parse as parseYaml } from 'yaml';
import type { QuantOptions } from '../../kernels/quant/index.js';
import type { LmHeadQuant, ModelQuant } from '../models/linear.js';
import { modelName } from '../models/model-name.js';
import type { ServerConfig } from './server-config.js';
import { UsageError } from './usage-error.js';
import {
  CONFIG_ENV,
  CONFIG_FLAG,
  SETTINGS,
  SETTINGS_BY_FLAG,
  SETTINGS_BY_NAME,
  defaultBlockSize,
  defaultOf,
  ruleOf,
  settingDefault,
  type DefaultEnv,
  type ExecutionProvider,
  type Setting,
  type SettingValue,
} from './schema.js';

/** Every problem found in one pass over all sources, one line each: `--max-loras 0 (flag): must be ...`. */
export class ConfigError extends UsageError {
  constructor(readonly problems: readonly string[]) {
    super(problems.join('\n'));
    this.name = 'ConfigError';
  }
}

export type SourceKind = 'default' | 'file' | 'env' | 'flag';

/** One setting's value and where it came from (for messages and the startup log). */
export interface Resolved {
  readonly value: SettingValue;
  readonly source: SourceKind;
  /** As the user wrote it (flag/env/file), for messages. */
  readonly raw: unknown;
}

export interface ParseConfigInput {
  /** The arguments after `serve`. */
  argv: readonly string[];
  env?: DefaultEnv;
  /** Reads the config file (tests inject one); default: fs.readFileSync(path, 'utf8'). */
  fileReader?: (path: string) => string;
  /** Base of relative paths given by flags and env (default: process.cwd()); file paths are relative to the file. */
  cwd?: string;
}

export interface ParsedConfig {
  config: ServerConfig;
  /** The config file read, if any. */
  configFile: string | null;
  settings: ReadonlyMap<string, Resolved>;
}

/** defaults < config file < env < flags, validated; throws one ConfigError listing every problem. */
export function parseConfig(input: ParseConfigInput): ServerConfig {
  return resolveConfig(input).config;
}

/** parseConfig, also saying where each value came from. */
export function resolveConfig(input: ParseConfigInput): ParsedConfig {
  const env = input.env ?? process.env;
  const cwd = input.cwd ?? process.cwd();
  const problems: string[] = [];
  const { flags, configFlag } = splitArgv(input.argv, problems);

  const configPath = configFlag ?? nonEmpty(env[CONFIG_ENV]);
  const configFile = configPath === undefined ? null : resolve(cwd, configPath);
  const fileValues = configFile === null ? new Map<string, unknown>() : readConfigFile(configFile, configFlag !== undefined ? `${CONFIG_FLAG} ${configPath} (flag)` : `${CONFIG_ENV}=${configPath} (env)`, input.fileReader, problems);

  const settings = new Map<string, Resolved>();
  for (const s of SETTINGS) {
    const candidates: { source: SourceKind; raw: unknown; base: string }[] = [];
    if (fileValues.has(s.name) && fileValues.get(s.name) !== null) candidates.push({ source: 'file', raw: fileValues.get(s.name), base: dirname(configFile!) });
    const fromEnv = nonEmpty(env[s.env]);
    if (fromEnv !== undefined) candidates.push({ source: 'env', raw: fromEnv, base: cwd });
    if (flags.has(s.flag)) candidates.push({ source: 'flag', raw: flags.get(s.flag), base: cwd });
    const chosen = candidates.at(-1);
    if (!chosen) {
      settings.set(s.name, { value: settingDefault(s.name, env, cwd), source: 'default', raw: defaultOf(s, env) });
      continue;
    }
    // Only the winning source is checked: an overridden value is how one fixes a bad one (e.g. the
    // LORAPLEX_PORT=tcp://... that Kubernetes service links inject, overridden by --port).
    const got = coerce(s, chosen.raw, chosen.base);
    if ('value' in got) settings.set(s.name, { value: got.value, source: chosen.source, raw: chosen.raw });
    else problems.push(`${where(s, chosen.source, chosen.raw, configFile)}: must be ${got.error}${chosen.source === 'env' && SERVICE_LINK_RE.test(String(chosen.raw)) ? SERVICE_LINK_HINT : ''}`);
  }
  if (problems.length) throw new ConfigError(problems);

  const config = toServerConfig(settings, configFile, problems);
  if (problems.length) throw new ConfigError(problems);
  return { config, configFile, settings };
}

/** `--help`: true when argv asks for the usage instead of a server. */
export function wantsHelp(argv: readonly string[]): boolean {
  return argv.some((a) => a === '--help' || a === '-h');
}

// --- sources ----------------------------------------------------------------------------------------

/** Kubernetes injects `<SERVICE>_PORT=tcp://10.0.0.1:50051` for every Service: one named loraplex collides. */
const SERVICE_LINK_RE = /^(tcp|udp|sctp):\/\//;
const SERVICE_LINK_HINT = ' (this looks like a Kubernetes service-link variable: set enableServiceLinks: false in the pod spec, or pass the flag)';

const nonEmpty = (v: string | undefined) => (v === undefined || v === '' ? undefined : v);

/** `--flag value`, `--flag=value`, and bare `--flag` for booleans; the last of a repeated flag wins. */
function splitArgv(argv: readonly string[], problems: string[]): { flags: Map<string, string | true>; configFlag: string | undefined } {
  const flags = new Map<string, string | true>();
  let configFlag: string | undefined;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (!arg.startsWith('--') || arg === '--') {
      problems.push(`unexpected argument ${show(arg)}: settings are flags (--name value); see loraplex serve --help`);
      continue;
    }
    const eq = arg.indexOf('=');
    const flag = eq < 0 ? arg : arg.slice(0, eq);
    let value: string | true | undefined = eq < 0 ? undefined : arg.slice(eq + 1);
    const s = SETTINGS_BY_FLAG.get(flag);
    if (flag !== CONFIG_FLAG && !s) {
      problems.push(`unknown flag ${flag}${suggest(flag, [CONFIG_FLAG, ...SETTINGS_BY_FLAG.keys()])}; see loraplex serve --help`);
      if (value === undefined && argv[i + 1] !== undefined && !argv[i + 1]!.startsWith('--')) i++; // skip its value
      continue;
    }
    if (value === undefined) {
      if (s?.type === 'bool') value = true;
      else if (argv[i + 1] !== undefined && !argv[i + 1]!.startsWith('--')) value = argv[++i]!;
      else {
        problems.push(`${flag} (flag): needs a value (${s ? ruleOf(s) : 'a file'})`);
        continue;
      }
    }
    if (flag === CONFIG_FLAG) {
      if (value === true || value === '') problems.push(`${CONFIG_FLAG} (flag): needs a file`);
      else configFlag = value;
    } else flags.set(flag, value);
  }
  return { flags, configFlag };
}

function readConfigFile(path: string, given: string, reader: ((path: string) => string) | undefined, problems: string[]): Map<string, unknown> {
  const out = new Map<string, unknown>();
  let text: string;
  try {
    text = (reader ?? ((p: string) => readFileSync(p, 'utf8')))(path);
  } catch (err) {
    problems.push(`${given}: cannot read the config file (${(err as NodeJS.ErrnoException).code ?? String(err)})`);
    return out;
  }
  let doc: unknown;
  try {
    doc = parseYaml(text); // YAML 1.2 is a superset of JSON: one parser for both
  } catch (err) {
    problems.push(`config file ${path}: not valid YAML or JSON: ${(err instanceof Error ? err.message : String(err)).split('\n')[0]}`);
    return out;
  }
  if (doc === null || doc === undefined) return out; // an empty file sets nothing
  if (typeof doc !== 'object' || Array.isArray(doc)) {
    problems.push(`config file ${path}: must be a mapping of setting names (camelCase) to values`);
    return out;
  }
  for (const [key, value] of Object.entries(doc)) {
    if (!SETTINGS_BY_NAME.has(key)) {
      problems.push(`config file ${path}: unknown key ${JSON.stringify(key)}${suggest(key, [...SETTINGS_BY_NAME.keys()])}`);
      continue;
    }
    out.set(key, value);
  }
  return out;
}

// --- values -----------------------------------------------------------------------------------------

const INT_RE = /^[+-]?\d+$/;
const TRUE = new Set(['true', '1', 'yes', 'on']);
const FALSE = new Set(['false', '0', 'no', 'off']);

/** A raw value (flag/env text, or a file's typed value) -> the setting's value, or the rule it broke. */
function coerce(s: Setting, raw: unknown, base: string): { value: SettingValue } | { error: string } {
  const fail = { error: ruleOf(s) };
  switch (s.type) {
    case 'int':
    case 'number': {
      let v: number;
      if (typeof raw === 'number') v = raw;
      else if (typeof raw === 'string' && raw.trim() !== '' && (s.type === 'number' || INT_RE.test(raw.trim()))) v = Number(raw);
      else return fail;
      if (!Number.isFinite(v) || (s.type === 'int' && !Number.isSafeInteger(v))) return fail;
      if (s.values && !s.values.includes(v)) return fail;
      if ((s.min !== undefined && v < s.min) || (s.max !== undefined && v > s.max)) return fail;
      return { value: v };
    }
    case 'bool':
      if (raw === true || raw === false) return { value: raw };
      if (typeof raw === 'string' && TRUE.has(raw.toLowerCase())) return { value: true };
      if (typeof raw === 'string' && FALSE.has(raw.toLowerCase())) return { value: false };
      return fail;
    case 'enum':
      return typeof raw === 'string' && s.values!.includes(raw) ? { value: raw } : fail;
    case 'string':
      return typeof raw === 'string' && raw !== '' ? { value: raw } : fail;
    case 'path': {
      if (typeof raw !== 'string' || raw === '') return fail;
      const p = resolve(base, raw);
      if (s.exists) {
        const kind = statKind(p);
        const ok = kind !== null && (s.exists === 'file-or-dir' || kind === s.exists);
        if (!ok) return { error: `${ruleOf(s)}${kind === null ? ' (not found or not readable)' : ` (it is a ${kind === 'dir' ? 'directory' : 'file'})`}` };
      }
      return { value: p };
    }
  }
}

function statKind(p: string): 'file' | 'dir' | null {
  try {
    const st = statSync(p);
    return st.isDirectory() ? 'dir' : st.isFile() ? 'file' : null;
  } catch {
    return null;
  }
}

/** How a value was given, for messages: `--max-loras 0 (flag)`, `LORAPLEX_MAX_LORAS=0 (env)`, ... */
function where(s: Setting, source: SourceKind, raw: unknown, configFile: string | null): string {
  switch (source) {
    case 'flag':
      return raw === true ? `${s.flag} (flag)` : `${s.flag} ${show(raw)} (flag)`;
    case 'env':
      return `${s.env}=${show(raw)} (env)`;
    case 'file':
      return `${s.name} ${show(raw)} (config file ${configFile})`;
    case 'default':
      return `${s.name} ${show(raw)} (default)`;
  }
}

/** A value for a message: short, quoted when it would be ambiguous, never megabytes. */
function show(raw: unknown): string {
  let text = typeof raw === 'string' ? raw : JSON.stringify(raw) ?? String(raw);
  if (text.length > 60) text = `${text.slice(0, 60)}...`;
  return typeof raw === 'string' && (raw === '' || /[\s"'\\]/.test(raw) || /[\x00-\x1f]/.test(raw)) ? JSON.stringify(text) : text;
}

/** ` (did you mean --max-loras?)` when a known name is close. */
function suggest(name: string, known: readonly string[]): string {
  // Flags in a file (max-loras) and env names (MAX_LORAS) are common slips: compare without case and dashes.
  const norm = (x: string) => x.replace(/^-+/, '').replace(/[-_]/g, '').toLowerCase();
  let best: string | null = null;
  let bestD = Infinity;
  for (const k of known) {
    const d = norm(k) === norm(name) ? 0 : editDistance(norm(k), norm(name));
    if (d < bestD) [best, bestD] = [k, d];
  }
  return best !== null && bestD <= Math.max(1, Math.floor(norm(name).length / 4)) ? ` (did you mean ${best}?)` : '';
}

function editDistance(a: string, b: string): number {
  let prev = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const cur = [i];
    for (let j = 1; j <= b.length; j++) cur[j] = Math.min(prev[j]! + 1, cur[j - 1]! + 1, prev[j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1));
    prev = cur;
  }
  return prev[b.length]!;
}

// --- ServerConfig -----------------------------------------------------------------------------------

/** Settings -> ServerConfig, with the rules that involve more than one setting. */
function toServerConfig(settings: ReadonlyMap<string, Resolved>, configFile: string | null, problems: string[]): ServerConfig {
  const r = (name: string) => settings.get(name)!;
  const v = <T extends SettingValue>(name: string) => r(name).value as T;
  const at = (name: string) => {
    const x = r(name);
    return where(SETTINGS_BY_NAME.get(name)!, x.source, x.raw, configFile);
  };
  const set = (name: string) => r(name).source !== 'default';

  if (v('auth') === 'required' && v('apiKeysFile') === null) {
    problems.push('auth: required needs --api-keys-file (or set --auth disabled for local use)');
  }
  if ((v('tlsCert') === null) !== (v('tlsKey') === null)) {
    const [given, missing] = v('tlsCert') === null ? ['tlsKey', '--tls-cert'] : ['tlsCert', '--tls-key'];
    problems.push(`${at(given)}: needs ${missing} too (give both or neither)`);
  }
  if (v('tlsClientCa') !== null && (v('tlsCert') === null || v('tlsKey') === null)) {
    problems.push(`${at('tlsClientCa')}: mTLS needs --tls-cert and --tls-key (the server's own certificate)`);
  }
  if (v<number>('maxCpuLoras') < v<number>('maxLoras')) {
    problems.push(`${at('maxCpuLoras')}: must be >= maxLoras, here ${at('maxLoras')} (an adapter in a slot stays in memory)`);
  }
  if (v<number>('metricsPort') !== 0 && v('metricsPort') === v('port')) {
    problems.push(`${at('metricsPort')}: must differ from port, here ${at('port')}`);
  }
  if (v<number>('httpPort') !== 0 && (v('httpPort') === v('port') || v('httpPort') === v('metricsPort'))) {
    problems.push(`${at('httpPort')}: must differ from port and metricsPort, here ${at('port')} and ${at('metricsPort')}`);
  }

  const kind = v<QuantOptions['kind']>('quant');
  const quant: ModelQuant = { kind };
  if (kind === 'none') {
    for (const name of ['blockSize', 'asymmetric', 'accuracyLevel', 'lmHeadQuant']) if (set(name)) problems.push(`${at(name)}: only applies to quantized weights, and ${at('quant')}`);
  } else {
    quant.blockSize = v<number | null>('blockSize') ?? defaultBlockSize(kind);
    quant.lmHead = v<LmHeadQuant>('lmHeadQuant');
  }
  if (kind === 'int4' || kind === 'int8') {
    quant.accuracyLevel = v<number>('accuracyLevel');
    quant.symmetric = !v<boolean>('asymmetric');
  } else if (kind === 'nf4') {
    for (const name of ['asymmetric', 'accuracyLevel']) if (set(name)) problems.push(`${at(name)}: only applies to int4 and int8, and ${at('quant')}`);
  }

  const cacheDir = v<string>('cacheDir');
  const model = v<string>('model');
  return {
    modelDir: model,
    source: model,
    servedModelName: v<string | null>('servedModelName') ?? modelName(model),
    quant,
    threads: v('threads'),
    executionProvider: v<ExecutionProvider>('executionProvider'),
    cacheDir,
    maxModelLen: v('maxModelLen'),
    maxNumSeqs: v('maxNumSeqs'),
    maxLoras: v('maxLoras'),
    maxLoraRank: v('maxLoraRank'),
    prefillChunk: v('prefillChunk'),
    allowSpinning: v('allowSpinning'),
    exactBatches: v<boolean>('exactBatches'),
    host: v('host'),
    port: v('port'),
    httpPort: v('httpPort'),
    adapterRoot: v('adapterRoot'),
    maxCpuLoras: v('maxCpuLoras'),
    maxWaiting: v('maxWaiting'),
    maxAdapterBytes: v('maxAdapterBytes'),
    maxNewTokensDefault: v('maxNewTokensDefault'),
    drainSeconds: v('drainSeconds'),
    exportRoot: v('exportRoot'),
    auth: v('auth'),
    apiKeysFile: v('apiKeysFile'),
    tlsCert: v('tlsCert'),
    tlsKey: v('tlsKey'),
    tlsClientCa: v('tlsClientCa'),
    logLevel: v('logLevel'),
    logPrompts: v('logPrompts'),
    metricsPort: v('metricsPort'),
    maxTenantLabels: v('maxTenantLabels'),
    dataRoot: v('dataRoot'),
    jobRoot: v('jobRoot'),
    trainThreads: v('trainThreads'),
    maxQueuedTrainJobs: v('maxQueuedTrainJobs'),
    prefixCacheBytes: v('prefixCacheBytes'),
    kvCacheBytes: v<number>('kvCacheBytes'),
  };
}

// --- help -------------------------------------------------------------------------------------------

/** ` N`, ` PATH`, ` int4|nf4|...`: what follows a setting's flag in help text. */
export function placeholder(s: Setting): string {
  if (s.type === 'bool') return '';
  if (s.type === 'int' || s.type === 'number') return ' N';
  if (s.type === 'path') return ' PATH';
  const values = s.values?.join('|');
  // Long value lists (log levels) are spelled out in the description instead.
  return ` ${values && values.length <= 24 ? values : s.flag.slice(s.flag.lastIndexOf('-') + 1).toUpperCase()}`;
}

export function defaultText(s: Setting): string {
  if (s.defaultText) return s.defaultText;
  const d = typeof s.default === 'function' ? null : s.default;
  return d === null ? 'unset' : String(d);
}

/** The rule, where the placeholder does not already say it. */
function ruleNote(s: Setting): string {
  if (s.type === 'path' || s.type === 'bool' || s.type === 'string') return '';
  if (s.type === 'enum' && placeholder(s).includes('|')) return '';
  return `; ${ruleOf(s)}`;
}

/** `loraplex serve --help`: generated from the schema. */
export function serveUsage(): string {
  const rows = SETTINGS.map((s) => [s.name, `${s.flag}${placeholder(s)}`, s.env, defaultText(s)] as const);
  const width = [0, 1, 2].map((i) => Math.max(...rows.map((r) => r[i]!.length)));
  const lines = [
    'Usage: loraplex serve [--config FILE] [--SETTING VALUE]...',
    '',
    'Each setting comes from, lowest to highest precedence: its default, a config file (--config FILE or',
    `${CONFIG_ENV}; JSON or YAML, keys as in the first column, paths relative to the file), its environment`,
    'variable, its flag. Boolean flags take no value (--log-prompts) or =true / =false.',
    '',
    `${'setting'.padEnd(width[0]!)}  ${'flag'.padEnd(width[1]!)}  ${'env'.padEnd(width[2]!)}  default`,
  ];
  SETTINGS.forEach((s, i) => {
    const r = rows[i]!;
    lines.push(`${r[0].padEnd(width[0]!)}  ${r[1].padEnd(width[1]!)}  ${r[2].padEnd(width[2]!)}  ${r[3]}`);
    lines.push(`    ${s.description}${ruleNote(s)}`);
  });
  return `${lines.join('\n')}\n`;
}

/** The settings as a Markdown table (for the README). */
export function settingsMarkdown(): string {
  const esc = (x: string) => x.replace(/\|/g, '\\|');
  const lines = ['| setting | flag | env | default | meaning |', '|---|---|---|---|---|'];
  for (const s of SETTINGS) {
    const rule = s.type === 'path' || s.type === 'bool' || s.type === 'string' ? '' : `; ${ruleOf(s)}`; // no placeholder column here
    lines.push(`| \`${s.name}\` | \`${s.flag}\` | \`${s.env}\` | ${esc(defaultText(s))} | ${esc(s.description + rule)} |`);
  }
  return `${lines.join('\n')}\n`;
}
