import { closeSync, existsSync } from 'node:fs';
import { basename, join } from 'node:path';
import { fillNormal } from '../models/make.js';
import { SafetensorsError, SafetensorsSource, type SafetensorsDtype, writeFileAtomic, writeSafetensors } from '../models/safetensors.js';
import type { ModelSpec, ModelFamily } from '../models/spec.js';
import type { LoraLayerWeights } from '../models/lora.js';
import { FAMILIES, familyOfModule, linearModules, loraModuleNames, moduleOrder } from '../models/families/index.js';
import { RE2JS } from 're2js';
import { writeDirAtomic } from '../files/atomic-dir.js';
import { clipJson, parseJsonCapped, UntrustedJsonError } from '../files/json.js';
import { openUnderRoot, readUnderRoot, UnderRootError, type OpenedFile } from '../files/under-root.js';

const ALL_FAMILIES = Object.keys(FAMILIES) as ModelFamily[];

/** PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors): read, validate, write, make. */

export class PeftFormatError extends Error {
  constructor(
    readonly dir: string,
    readonly file: string | null,
    readonly detail: string,
    /** The parsed adapter_config.json object when the error is about its values (for describing it anyway). */
    readonly config: Record<string, unknown> | null = null,
  ) {
    super(file ? `adapter directory ${dir}: ${file}: ${detail}` : `adapter directory ${dir}: ${detail}`);
    this.name = 'PeftFormatError';
  }
}

export type { LinearModule } from '../models/families/index.js';

export { linearModules };

/** `base_model.model.transformer.h.0.attn.c_attn` -> `h.0.attn.c_attn`; llama paths keep `model.`. */
export function normalizeModulePath(path: string): string {
  let p = path.startsWith('base_model.model.') ? path.slice('base_model.model.'.length) : path;
  if (p.startsWith('transformer.')) p = p.slice('transformer.'.length);
  return p;
}

export interface PeftConfig {
  r: number;
  loraAlpha: number;
  /** As in the file: a list of module names, 'all-linear', or a regex string matched against the full path. */
  targetModules: string[] | string;
  useRslora: boolean;
  baseModelNameOrPath: string | null;
  /** adapter_config.json as read (empty for made adapters). */
  raw: Record<string, unknown>;
}

export interface PeftAdapter {
  config: PeftConfig;
  r: number;
  alpha: number;
  /** Multiplier of B·A: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora. */
  scaling: number;
  modules: LoraLayerWeights[];
}

export function loraScaling(r: number, alpha: number, useRslora: boolean): number {
  return useRslora ? alpha / Math.sqrt(r) : alpha / r;
}

/** A config value for a message, as the old messages showed strings: 'value', cut short. */
const quoted = (v: unknown): string => (typeof v === 'string' ? `'${v.length > 80 ? `${v.slice(0, 80)}...` : v}'` : clipJson(v));

const nonEmpty = (v: unknown): boolean =>
  v !== undefined && v !== null && v !== false && !(Array.isArray(v) && v.length === 0) && !(typeof v === 'object' && !Array.isArray(v) && Object.keys(v as object).length === 0);

/**
 * Options whose effect the engine does not reproduce, each named in its own error. (fan_in_fan_out is not
 * here: PEFT itself forces it to match the layer type, nn.Linear or Conv1D, and it never changes the
 * lora_A [r, in] / lora_B [out, r] layout.)
 */
function checkConfig(dir: string, cfg: Record<string, unknown>): void {
  const fail = (detail: string): never => {
    throw new PeftFormatError(dir, 'adapter_config.json', detail, cfg);
  };
  const peftType = cfg['peft_type'];
  if (peftType !== undefined && peftType !== null && peftType !== 'LORA') fail(`peft_type ${quoted(peftType)} is not supported; only LORA`);
  const task = cfg['task_type'];
  if (task !== undefined && task !== null && task !== 'CAUSAL_LM') fail(`task_type ${quoted(task)} is not supported; only CAUSAL_LM`);
  if (cfg['use_dora'] === true) fail('use_dora true (DoRA) is not supported');
  if (nonEmpty(cfg['modules_to_save'])) fail(`modules_to_save ${clipJson(cfg['modules_to_save'])} is not supported (fully trained extra modules)`);
  if (nonEmpty(cfg['rank_pattern'])) fail(`rank_pattern ${clipJson(cfg['rank_pattern'])} is not supported (per-module ranks)`);
  if (nonEmpty(cfg['alpha_pattern'])) fail(`alpha_pattern ${clipJson(cfg['alpha_pattern'])} is not supported (per-module alphas)`);
  if (nonEmpty(cfg['layers_to_transform'])) fail(`layers_to_transform ${clipJson(cfg['layers_to_transform'])} is not supported`);
  if (cfg['bias'] !== undefined && cfg['bias'] !== null && cfg['bias'] !== 'none') fail(`bias ${quoted(cfg['bias'])} is not supported; only 'none'`);
  if (cfg['lora_bias'] === true) fail('lora_bias true is not supported');
  if (cfg['init_lora_weights'] === 'loftq') fail("init_lora_weights 'loftq' is not supported (LoftQ also changes the base weights)");
  if (nonEmpty(cfg['layer_replication'])) fail('layer_replication is not supported');
  if (nonEmpty(cfg['target_parameters'])) fail('target_parameters is not supported');
  if (nonEmpty(cfg['trainable_token_indices'])) fail('trainable_token_indices is not supported');
  if (nonEmpty(cfg['alora_invocation_tokens'])) fail('alora_invocation_tokens (activated LoRA) is not supported');
  if (cfg['use_qalora'] === true) fail('use_qalora true is not supported');
}

function parseConfig(dir: string, cfg: Record<string, unknown>, family: ModelFamily | null): PeftConfig {
  const fail: (detail: string) => never = (detail) => {
    throw new PeftFormatError(dir, 'adapter_config.json', detail, cfg);
  };
  checkConfig(dir, cfg);
  const r = cfg['r'];
  // The bounds are those of AdapterInfo's uint32 rank and float alpha, so a valid config always serializes.
  if (typeof r !== 'number' || !Number.isSafeInteger(r) || r < 1 || r > MAX_RANK) fail(`r must be a positive integer at most ${MAX_RANK}, got ${clipJson(r, 40)}`);
  // PEFT's default lora_alpha is 8.
  const alpha = cfg['lora_alpha'] ?? 8;
  if (typeof alpha !== 'number' || !Number.isFinite(alpha) || alpha <= 0 || alpha > MAX_ALPHA) {
    fail(`lora_alpha must be a positive number at most ${MAX_ALPHA} (float32), got ${clipJson(alpha, 40)}`);
  }
  const useRslora = cfg['use_rslora'] ?? false;
  if (typeof useRslora !== 'boolean') fail(`use_rslora must be true or false, got ${clipJson(useRslora, 40)}`);
  const tm = cfg['target_modules'];
  let targetModules: string[] | string;
  if (typeof tm === 'string') targetModules = tm;
  else if (Array.isArray(tm) && tm.length > 0 && tm.every((t) => typeof t === 'string')) targetModules = tm as string[];
  else fail(`target_modules must be a non-empty list of names or a regex string, got ${clipJson(tm)}`);
  if (typeof targetModules! === 'string' && targetModules.length > MAX_PATTERN_LENGTH) {
    fail(`target_modules regex is ${targetModules.length} characters; the limit is ${MAX_PATTERN_LENGTH}`);
  }
  if (Array.isArray(targetModules)) {
    const allowed: readonly string[] = family ? loraModuleNames(family) : ALL_FAMILIES.flatMap(loraModuleNames);
    for (const t of targetModules) {
      const last = t.slice(t.lastIndexOf('.') + 1);
      if (t !== 'all-linear' && !allowed.includes(last)) {
        fail(`target_modules entry ${quoted(t)} is not supported; supported: ${allowed.join(', ')} (or all-linear)`);
      }
    }
  }
  const base = cfg['base_model_name_or_path'];
  return {
    r: r as number,
    loraAlpha: alpha as number,
    targetModules: targetModules!,
    useRslora: useRslora as boolean,
    baseModelNameOrPath: typeof base === 'string' ? base : null,
    raw: cfg,
  };
}

/**
 * Whether PEFT would have adapted this module given target_modules (fullPath as in the base model). A regex
 * is matched by RE2 (linear time: the pattern comes from a file others write, and a backtracking engine
 * takes exponential time on patterns like `(\d+)+$`). A construct RE2 does not have (lookaround,
 * backreferences) leaves the tensors present as the ground truth, as PEFT's own choice was made with it.
 */
function targeted(targetModules: string[] | string, fullPath: string): boolean {
  if (typeof targetModules === 'string') {
    if (targetModules === 'all-linear') return true;
    // PEFT: a string target_modules is a regex that must match the whole module path (re.fullmatch).
    let re: RE2JS;
    try {
      re = RE2JS.compile(targetModules);
    } catch {
      return true;
    }
    return re.matches(fullPath);
  }
  return targetModules.some((t) => t === 'all-linear' || fullPath === t || fullPath.endsWith(`.${t}`));
}

/** Index of the first NaN/Inf, or -1: an all-ones exponent in the float32 bits (integer ops, fast on big tensors). */
function firstNonFinite(t: Float32Array): number {
  const bits = new Uint32Array(t.buffer, t.byteOffset, t.length);
  for (let i = 0; i < bits.length; i++) if ((bits[i]! & 0x7f800000) === 0x7f800000) return i;
  return -1;
}

const TENSOR_RE = /^base_model\.model\.(.+)\.(lora_A|lora_B)(?:\.([^.]+))?\.weight$/;

/** AdapterInfo.rank is a uint32. */
export const MAX_RANK = 0xffffffff;
/** AdapterInfo.alpha is a float: the largest finite float32. */
export const MAX_ALPHA = 3.4028234663852886e38;
/** A target_modules regex longer than this is refused (real ones are tens of characters). */
export const MAX_PATTERN_LENGTH = 1024;

const CONFIG_FILE = 'adapter_config.json';
const WEIGHTS_FILE = 'adapter_model.safetensors';
/** adapter_config.json is about 1 KB; the cap leaves room for long regexes and lists without inviting abuse. */
export const MAX_CONFIG_BYTES = 1024 * 1024;
const MAX_CONFIG_DEPTH = 16;

/** Where an adapter's files are read from: `relDir` under `root`, opened by the under-root rule. */
export interface PeftLocation {
  root: string;
  /** The adapter directory relative to root ('' for the root itself). */
  relDir: string;
}

const label = (loc: PeftLocation): string => (loc.relDir === '' ? loc.root : loc.relDir);

function underRootFailure(dir: string, err: unknown): never {
  if (err instanceof UnderRootError) {
    const file = basename(err.file);
    if (err.problem === 'missing' && (file === CONFIG_FILE || file === WEIGHTS_FILE)) throw new PeftFormatError(dir, null, `${file} is missing`);
    throw new PeftFormatError(dir, file, err.detail);
  }
  throw err;
}

/** adapter_config.json read once (bounded, not a symlink or FIFO), parsed with caps and validated. */
export function readPeftConfig(loc: PeftLocation, family: ModelFamily | null = null): { config: PeftConfig; bytesRead: number } {
  const dir = label(loc);
  let bytes: Uint8Array;
  try {
    bytes = readUnderRoot(loc.root, join(loc.relDir, CONFIG_FILE), MAX_CONFIG_BYTES);
  } catch (err) {
    underRootFailure(dir, err);
  }
  return { config: parsePeftConfigBytes(dir, bytes!, family), bytesRead: bytes!.length };
}

/** The config from its file's bytes: JSON within caps (errors give a position, never the content), validated. */
export function parsePeftConfigBytes(dir: string, bytes: Uint8Array, family: ModelFamily | null): PeftConfig {
  let raw: unknown;
  try {
    raw = parseJsonCapped(bytes, { maxBytes: MAX_CONFIG_BYTES, maxDepth: MAX_CONFIG_DEPTH, what: CONFIG_FILE });
  } catch (err) {
    if (err instanceof UntrustedJsonError) throw new PeftFormatError(dir, CONFIG_FILE, err.detail);
    throw err;
  }
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) throw new PeftFormatError(dir, CONFIG_FILE, 'is not a JSON object');
  return parseConfig(dir, raw as Record<string, unknown>, family);
}

/**
 * Reads a PEFT LoRA adapter directory: each file opened once, by the under-root rule (`dir` itself is the
 * root unless `loc` says otherwise), at most maxBytes in all. With a spec, every module must be a linear of
 * that model with matching in/out features. Unsupported options and malformed tensors throw PeftFormatError.
 */
export function readPeftAdapter(dir: string, spec?: ModelSpec, opts: { loc?: PeftLocation; maxBytes?: number } = {}): PeftAdapter {
  const loc = opts.loc ?? { root: dir, relDir: '' };
  const maxBytes = opts.maxBytes ?? Number.MAX_SAFE_INTEGER;
  const { config, bytesRead } = readPeftConfig(loc, spec?.family ?? null);
  if (bytesRead > maxBytes) throw new PeftFormatError(label(loc), CONFIG_FILE, `${bytesRead} bytes exceed maxAdapterBytes ${maxBytes}`);
  return readPeftWeights(loc, config, spec, maxBytes - bytesRead);
}

/** Where decoded tensors go: `floats` values in one buffer (e.g. shared memory the caller has ready). */
export type TensorAlloc = (floats: number) => Float32Array;

/** An adapter as read, with each module's sums of squares (||A||_F^2, ||B||_F^2 in float64) from the decode. */
export interface DecodedPeft {
  adapter: PeftAdapter;
  sumSquares: Map<string, { a: number; b: number }>;
}

/** adapter_model.safetensors read once, at most maxBytes; then checked against config and spec. */
export function readPeftWeights(loc: PeftLocation, config: PeftConfig, spec: ModelSpec | undefined, maxBytes: number): PeftAdapter {
  return decodePeftWeights(loc, config, spec, maxBytes).adapter;
}

/**
 * readPeftWeights, decoding every tensor straight into one buffer from `alloc` (lora_A then lora_B of each module,
 * in module order) in one pass that also sums squares: non-finite values and the effect bound need no pass of
 * their own. The file is opened once and read tensor by tensor; the shapes are all checked before `alloc` runs.
 */
export function decodePeftWeights(loc: PeftLocation, config: PeftConfig, spec: ModelSpec | undefined, maxBytes: number, alloc: TensorAlloc = (n) => new Float32Array(n)): DecodedPeft {
  const dir = label(loc);
  const file = WEIGHTS_FILE;
  let opened: OpenedFile;
  try {
    opened = openUnderRoot(loc.root, join(loc.relDir, file), maxBytes);
  } catch (err) {
    if (err instanceof UnderRootError && err.problem === 'missing') {
      const bin = existsSync(join(loc.root, loc.relDir, 'adapter_model.bin'));
      throw new PeftFormatError(dir, null, `${file} is missing${bin ? ' (adapter_model.bin found; only safetensors is supported)' : ''}`);
    }
    if (err instanceof UnderRootError && err.problem === 'too-large') {
      throw new PeftFormatError(dir, file, `${err.detail} (maxAdapterBytes less adapter_config.json)`);
    }
    underRootFailure(dir, err);
  }
  try {
    return decodeOpened(dir, opened!, config, spec, alloc);
  } catch (err) {
    if (err instanceof SafetensorsError) throw new PeftFormatError(dir, file, err.message.replace(`${file}: `, ''));
    throw err;
  } finally {
    closeSync(opened!.fd);
  }
}

function decodeOpened(dir: string, opened: OpenedFile, config: PeftConfig, spec: ModelSpec | undefined, alloc: TensorAlloc): DecodedPeft {
  const file = WEIGHTS_FILE;
  const src = SafetensorsSource.fromFd(opened.fd, opened.size, file);
  const fail: (detail: string) => never = (detail) => {
    throw new PeftFormatError(dir, file, detail);
  };

  // Group lora_A / lora_B tensors by module.
  const byModule = new Map<string, { fullPath: string; a?: string; b?: string }>();
  let adapterName: string | undefined | null = null;
  for (const name of src.names()) {
    const m = TENSOR_RE.exec(name);
    if (!m) {
      if (/lora_embedding_[AB]/.test(name)) fail(`${clipJson(name)}: LoRA on embeddings is not supported`);
      if (/lora_magnitude_vector/.test(name)) fail(`${clipJson(name)}: DoRA magnitude vectors are not supported`);
      fail(`unexpected tensor ${clipJson(name)} (expected base_model.model.<module>.lora_A.weight / lora_B.weight)`);
    }
    const [, fullPath, kind, adapter] = m!;
    // One file holds one adapter; keys with two different adapter names would be ambiguous.
    if (adapterName !== null && adapterName !== adapter) fail(`tensors for more than one adapter name (${adapterName ?? '(none)'}, ${adapter ?? '(none)'})`);
    adapterName = adapter;
    const module = normalizeModulePath(fullPath!);
    const entry = byModule.get(module) ?? { fullPath: fullPath! };
    if (entry.fullPath !== fullPath) fail(`module ${module} appears as both ${entry.fullPath} and ${fullPath}`);
    if (kind === 'lora_A') entry.a = name;
    else entry.b = name;
    byModule.set(module, entry);
  }
  if (byModule.size === 0) fail('holds no LoRA tensors');

  const known = spec ? new Map(linearModules(spec).map((l) => [l.module, l])) : null;
  const planned: { module: string; aName: string; bName: string; r: number; inFeatures: number; outFeatures: number }[] = [];
  for (const [module, e] of byModule) {
    if (!e.a || !e.b) fail(`module ${module} has ${e.a ? 'lora_A' : 'lora_B'} but no ${e.a ? 'lora_B' : 'lora_A'}`);
    const family = familyOfModule(module);
    if (!family) fail(`module ${module} is not a supported LoRA target (${ALL_FAMILIES.map((f) => `${f}: ${loraModuleNames(f).join(', ')}`).join('; ')})`);
    if (spec && family !== spec.family) fail(`module ${module} belongs to a ${family} model, but the base model is ${spec.modelType}`);
    if (!targeted(config.targetModules, e.fullPath)) fail(`module ${module} has weights but is not in target_modules ${clipJson(config.targetModules)}`);
    const aShape = src.shape(e.a!);
    const bShape = src.shape(e.b!);
    if (aShape.length !== 2 || bShape.length !== 2) fail(`module ${module}: lora_A ${clipJson(aShape, 40)} and lora_B ${clipJson(bShape, 40)} must be 2-D`);
    const [r, inF] = aShape as [number, number];
    const [outF, rB] = bShape as [number, number];
    if (r !== rB) fail(`module ${module}: lora_A ${clipJson(aShape, 40)} and lora_B ${clipJson(bShape, 40)} disagree on the rank`);
    if (r !== config.r) fail(`module ${module} has rank ${r}, but adapter_config.json says r = ${config.r}`);
    if (known) {
      const lin = known.get(module);
      if (!lin) fail(`module ${module} does not exist in the base model (${spec!.numLayers} layers)`);
      if (lin!.inFeatures !== inF || lin!.outFeatures !== outF) {
        fail(
          `module ${module}: lora_A ${clipJson(aShape, 40)} / lora_B ${clipJson(bShape, 40)} imply ${inF} -> ${outF} features, ` +
            `but the base model's ${module} is ${lin!.inFeatures} -> ${lin!.outFeatures} (adapter for a different model?)`,
        );
      }
    }
    planned.push({ module, aName: e.a!, bName: e.b!, r, inFeatures: inF, outFeatures: outF });
  }
  // linearModules' order (by layer, then as in the forward pass), with or without a spec.
  planned.sort((x, y) => moduleOrder(x.module) - moduleOrder(y.module));
  const all = alloc(planned.reduce((n, p) => n + p.r * (p.inFeatures + p.outFeatures), 0));
  const sumSquares = new Map<string, { a: number; b: number }>();
  const modules: LoraLayerWeights[] = [];
  let at = 0;
  const take = (n: number) => all.subarray(at, (at += n));
  for (const p of planned) {
    const a = take(p.r * p.inFeatures);
    const b = take(p.outFeatures * p.r);
    const sums = { a: src.decodeInto(p.aName, a), b: src.decodeInto(p.bName, b) };
    for (const [label, t, sum] of [['lora_A', a, sums.a], ['lora_B', b, sums.b]] as const) {
      if (Number.isFinite(sum)) continue;
      const i = firstNonFinite(t);
      fail(`module ${p.module}: ${label} holds a non-finite value (${t[i]}) at index ${i}`);
    }
    sumSquares.set(p.module, sums);
    modules.push({ module: p.module, a, b, r: p.r, inFeatures: p.inFeatures, outFeatures: p.outFeatures });
  }
  return { adapter: { config, r: config.r, alpha: config.loraAlpha, scaling: loraScaling(config.r, config.loraAlpha, config.useRslora), modules }, sumSquares };
}

export interface WritePeftOptions {
  /** Tensor dtype in adapter_model.safetensors. Default F32. */
  dtype?: SafetensorsDtype;
}

/**
 * Writes adapter_config.json + adapter_model.safetensors as PEFT's save_pretrained would, atomically: into
 * a sibling temp directory first, then renamed over `dir` (an existing adapter there is replaced whole).
 */
export function writePeftAdapter(dir: string, adapter: PeftAdapter, opts: WritePeftOptions = {}): void {
  if (adapter.modules.length === 0) throw new Error('writePeftAdapter: adapter has no modules');
  const families = new Set(adapter.modules.map((m) => familyOfModule(m.module)));
  if (families.has(null) || families.size !== 1) {
    throw new Error(`writePeftAdapter: modules must all be llama or all gpt2 linears: ${adapter.modules.map((m) => m.module).join(', ')}`);
  }
  const family = [...families][0]!;
  for (const m of adapter.modules) {
    if (m.a.length !== m.r * m.inFeatures || m.b.length !== m.outFeatures * m.r || m.r !== adapter.r) {
      throw new Error(`writePeftAdapter: module ${m.module} tensors do not match r ${adapter.r}, ${m.inFeatures} -> ${m.outFeatures}`);
    }
  }
  // GPT2LMHeadModel's body lives under `transformer.`; PEFT keys include it.
  const full = (m: string) => (family === 'gpt2' ? `transformer.${m}` : m);
  const config = {
    alpha_pattern: {},
    auto_mapping: null,
    base_model_name_or_path: adapter.config.baseModelNameOrPath,
    bias: 'none',
    fan_in_fan_out: family === 'gpt2',
    inference_mode: true,
    init_lora_weights: true,
    layer_replication: null,
    layers_pattern: null,
    layers_to_transform: null,
    loftq_config: {},
    lora_alpha: adapter.alpha,
    // Training-time only (serving ignores it), kept so the file says how the adapter was trained.
    lora_dropout: typeof adapter.config.raw['lora_dropout'] === 'number' ? adapter.config.raw['lora_dropout'] : 0.0,
    megatron_config: null,
    megatron_core: 'megatron.core',
    modules_to_save: null,
    peft_type: 'LORA',
    r: adapter.r,
    rank_pattern: {},
    revision: null,
    target_modules: adapter.config.targetModules,
    task_type: 'CAUSAL_LM',
    use_dora: false,
    use_rslora: adapter.config.useRslora,
  };
  const tensors = adapter.modules.flatMap((m) => [
    { name: `base_model.model.${full(m.module)}.lora_A.weight`, shape: [m.r, m.inFeatures], data: m.a },
    { name: `base_model.model.${full(m.module)}.lora_B.weight`, shape: [m.outFeatures, m.r], data: m.b },
  ]);

  writeDirAtomic(
    dir,
    (tmp) => {
      writeFileAtomic(join(tmp, 'adapter_config.json'), JSON.stringify(config, null, 2) + '\n');
      writeSafetensors(join(tmp, 'adapter_model.safetensors'), tensors, opts.dtype ?? 'F32', { format: 'pt' });
    },
    { replace: true },
  );
}

export interface RandomAdapterOptions {
  r: number;
  alpha: number;
  /** PEFT names (q_proj, c_attn, ...) or ['all-linear']. */
  targetModules: string[];
  seed: number;
  /** Std of lora_B; non-zero so that the adapter visibly changes outputs. Default 0.02. */
  bStd?: number;
  /** Std of lora_A. Default 1/sqrt(inFeatures) (about PEFT's kaiming-uniform scale). */
  aStd?: number;
  useRslora?: boolean;
  baseModelNameOrPath?: string | null;
}

/** A deterministic random adapter for tests and benchmarks (unlike PEFT's init, B is non-zero). */
export function makeRandomAdapter(spec: ModelSpec, opts: RandomAdapterOptions): PeftAdapter {
  if (!Number.isSafeInteger(opts.r) || opts.r < 1) throw new Error(`r must be a positive integer, got ${opts.r}`);
  const allowed = loraModuleNames(spec.family);
  const all = opts.targetModules.includes('all-linear');
  for (const t of opts.targetModules) {
    if (t !== 'all-linear' && !allowed.includes(t)) throw new Error(`target module '${t}' is not a ${spec.family} linear; supported: ${allowed.join(', ')}`);
  }
  const modules: LoraLayerWeights[] = [];
  for (const lin of linearModules(spec)) {
    if (!all && !opts.targetModules.includes(lin.peftName)) continue;
    const a = fillNormal(new Float32Array(opts.r * lin.inFeatures), opts.seed, `${lin.module}.lora_A`, opts.aStd ?? 1 / Math.sqrt(lin.inFeatures));
    const b = fillNormal(new Float32Array(lin.outFeatures * opts.r), opts.seed, `${lin.module}.lora_B`, opts.bStd ?? 0.02);
    modules.push({ module: lin.module, a, b, r: opts.r, inFeatures: lin.inFeatures, outFeatures: lin.outFeatures });
  }
  const useRslora = opts.useRslora ?? false;
  return {
    config: {
      r: opts.r,
      loraAlpha: opts.alpha,
      // Expanded as PEFT saves it: a list entry 'all-linear' would otherwise name no module.
      targetModules: all ? [...new Set(linearModules(spec).map((l) => l.peftName))] : [...opts.targetModules],
      useRslora,
      baseModelNameOrPath: opts.baseModelNameOrPath ?? null,
      raw: {},
    },
    r: opts.r,
    alpha: opts.alpha,
    scaling: loraScaling(opts.r, opts.alpha, useRslora),
    modules,
  };
}
