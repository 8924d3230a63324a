import { existsSync, lstatSync, mkdirSync, readdirSync, realpathSync, rmSync, statSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { dirname, join, relative, resolve } from 'node:path';
import { LoraplexError, invalidArgument, notFound } from '../errors.js';
import { checkLoraEffect, type SumSquares } from './effect-bound.js';
import type { LoraModuleInfo } from '../models/graph.js';
import type { ModelSpec } from '../models/spec.js';
import { validateAdapterId } from './ids.js';
import type { AdapterKey } from '../adapter-key.js';
import { adapterKeyPath, displayId, isTenantName, parseAdapterKey, storedAdapterKey } from './tenancy.js';
import { installDir, removeDirAtomic } from '../files/atomic-dir.js';
import { MAX_ALPHA, MAX_PATTERN_LENGTH, MAX_RANK, PeftFormatError, readPeftConfig, decodePeftWeights, writePeftAdapter, type PeftAdapter, type TensorAlloc, type PeftConfig, type PeftLocation } from './peft.js';
import { isUnder } from '../files/under-root.js';

/**
 * The adapter store: one PEFT directory per adapter under a root, `<root>/<id>/adapter_config.json +
 * adapter_model.safetensors`. The ONLY module that touches adapter files. Nothing is cached: the directory is
 * the truth, so an adapter copied in (or written by a training job) is visible to the very next call.
 *
 * Adapters are named by their key (tenancy.ts): `id` lives at `<root>/<id>/`, `tenant~id` at
 * `<root>/<tenant>/<id>/`. A root directory with an adapter_config.json is an adapter, never a tenant's
 * namespace. Messages show only the id part, so they read the same in every namespace.
 *
 * Tenants may write into their folders, so every file is opened by the rule of files/under-root.ts (nothing
 * outside the root, no symlinked files, FIFOs or devices), once per load and bounded by maxAdapterBytes.
 */

export interface AdapterLimits {
  /** Largest LoRA rank the slot pool holds. */
  maxLoraRank: number;
  /** Largest adapter directory, in bytes on disk, checked before any tensor is read. */
  maxAdapterBytes: number;
  /** The modules that have a LoRA path in the serving graph; an adapter may target only these. */
  loraModules: LoraModuleInfo[];
}

/** What adapter_config.json says, read without touching the tensors (for listings). */
export interface AdapterDescription {
  /** A positive integer that fits a uint32, or null. */
  r: number | null;
  /** A positive number that fits a float32, or null. */
  alpha: number | null;
  /** PEFT short names (q_proj, ...), or the config's string as is ('all-linear' or a regex). */
  targetModules: string[];
  /** Why the adapter cannot be loaded as its config stands (the file and the rule); absent when it can. */
  invalidReason?: string;
}

// Our own scratch names under the root. They start with '.', which no valid adapter id can.
const TMP_PREFIX = '.tmp-';
const TOMBSTONE_PREFIX = '.deleted-';
const CONFIG = 'adapter_config.json';
const WEIGHTS = 'adapter_model.safetensors';

const tag = () => `${process.pid}-${randomBytes(4).toString('hex')}`;
const errno = (err: unknown): string | undefined => (err as NodeJS.ErrnoException | null)?.code;

/** Sum of file sizes under dir (symlinks are not followed; a loop, not recursion, so depth cannot overflow). */
function treeBytes(dir: string): number {
  let n = 0;
  const pending = [dir];
  for (let next = pending.pop(); next !== undefined; next = pending.pop()) {
    for (const e of readdirSync(next, { withFileTypes: true })) {
      const p = join(next, e.name);
      if (e.isDirectory()) pending.push(p);
      else if (e.isFile()) n += lstatSync(p).size;
    }
  }
  return n;
}

const inRange = (v: unknown, max: number): v is number => typeof v === 'number' && Number.isFinite(v) && v > 0 && v <= max;

export class AdapterStore {
  readonly root: string;

  /** `sweep: false` for a second handle on a root in use (a worker thread): a sweep would remove live writes. */
  constructor(root: string, opts: { sweep?: boolean } = {}) {
    this.root = resolve(root);
    mkdirSync(this.root, { recursive: true });
    // Leftovers of a crash mid-write or mid-delete: never adapters, safe to drop at startup.
    if (opts.sweep !== false) for (const name of readdirSync(this.root)) {
      if (name.startsWith(TMP_PREFIX) || name.startsWith(TOMBSTONE_PREFIX) || name.startsWith(`.${TMP_PREFIX}`)) {
        rmSync(join(this.root, name), { recursive: true, force: true });
      }
    }
  }

  /** The directory of an adapter key (always inside the root). It may not exist. */
  dir(adapterKey: AdapterKey): string {
    return adapterKeyPath(this.root, adapterKey);
  }

  /**
   * Keys of every adapter (a directory holding an adapter_config.json) in the flat layout and in every
   * tenant's namespace, sorted. Read fresh each call.
   */
  list(): AdapterKey[] {
    const keys: AdapterKey[] = [];
    for (const name of this.childDirs(this.root)) {
      if (existsSync(join(this.root, name, CONFIG))) keys.push(storedAdapterKey('', name));
      else if (isTenantName(name)) {
        for (const id of this.childDirs(join(this.root, name))) {
          if (existsSync(join(this.root, name, id, CONFIG))) keys.push(storedAdapterKey(name, id));
        }
      }
    }
    return keys.sort();
  }

  /** Names of the subdirectories of dir that are valid adapter ids (scratch names start with '.'). */
  private childDirs(dir: string): string[] {
    let entries;
    try {
      entries = readdirSync(dir, { withFileTypes: true });
    } catch (err) {
      if (dir !== this.root && (errno(err) === 'ENOENT' || errno(err) === 'ENOTDIR')) return []; // a tenant dir removed meanwhile
      throw err;
    }
    return entries
      .filter((e) => (e.isDirectory() || e.isSymbolicLink()) && !e.name.startsWith('.'))
      .map((e) => e.name)
      .filter((name) => {
        try {
          validateAdapterId(name);
          return true;
        } catch {
          return false; // names a client could never ask for
        }
      });
  }

  has(adapterKey: AdapterKey): boolean {
    return this.namespaceUsable(adapterKey) && existsSync(join(this.dir(adapterKey), CONFIG));
  }

  /** False when the key's tenant directory is itself an (un-namespaced) adapter: it holds no tenant's adapters. */
  private namespaceUsable(adapterKey: AdapterKey): boolean {
    const { tenant } = parseAdapterKey(adapterKey);
    return tenant === '' || !existsSync(join(this.root, tenant, CONFIG));
  }

  /**
   * Bytes on disk of the adapter's directory; NOT_FOUND when it is not in the store. 0 for a directory that
   * resolves outside the root: it is never read, so it is not walked either.
   */
  diskBytes(adapterKey: AdapterKey): number {
    const dir = this.dir(adapterKey);
    try {
      if (!isUnder(realpathSync(this.root), realpathSync(dir))) return 0;
      return treeBytes(dir);
    } catch (err) {
      if (errno(err) === 'ENOENT' || errno(err) === 'ENOTDIR') throw this.missing(adapterKey);
      throw err;
    }
  }

  /**
   * The config's rank, alpha and target modules, each only when in range (they go into responses as they
   * are), and why the config is invalid when it is. Never throws for a bad file: list() must not fail.
   */
  describe(adapterKey: AdapterKey): AdapterDescription {
    let raw: Record<string, unknown> = {};
    let invalidReason: string | null = null;
    try {
      raw = readPeftConfig(this.location(adapterKey)).config.raw;
    } catch (err) {
      // Anything else (an I/O error) is for the log of a load; a listing only says the file cannot be read.
      invalidReason = err instanceof PeftFormatError ? `${err.file ? `${err.file}: ` : ''}${err.detail}` : `${CONFIG}: cannot be read`;
      raw = (err instanceof PeftFormatError && err.config) || {};
    }
    const r = raw['r'];
    // PEFT's default lora_alpha is 8.
    const alpha = raw['lora_alpha'] ?? 8;
    const tm = raw['target_modules'];
    const names = typeof tm === 'string' ? [tm] : Array.isArray(tm) ? [...new Set(tm.filter((t): t is string => typeof t === 'string').map(shortName))] : [];
    return {
      r: inRange(r, MAX_RANK) && Number.isSafeInteger(r) ? r : null,
      alpha: inRange(alpha, MAX_ALPHA) ? alpha : null,
      targetModules: names.filter((t) => t.length <= MAX_PATTERN_LENGTH),
      ...(invalidReason !== null ? { invalidReason } : {}),
    };
  }

  /** Where the adapter's files are read: relative to the root, so nothing outside it is ever opened. */
  private location(adapterKey: AdapterKey): PeftLocation {
    return { root: this.root, relDir: relative(this.root, this.dir(adapterKey)) };
  }

  /**
   * Reads and validates an adapter for `spec` within `limits`. Cheap checks (rank in the config, size on
   * disk) come before any tensor is read. Every rejection is INVALID_ARGUMENT naming adapter_id and the rule;
   * an adapter that is not there is NOT_FOUND. The tensors are decoded into one buffer from `alloc` (default: a
   * fresh one).
   */
  read(adapterKey: AdapterKey, spec: ModelSpec, limits: AdapterLimits, alloc?: TensorAlloc): PeftAdapter {
    const dir = this.dir(adapterKey);
    // An overwrite swaps the directory between our reads of the config and of the tensors; reading again
    // when the directory changed under us avoids mixing an old config with new tensors.
    for (let attempt = 0; ; attempt++) {
      const before = this.inode(adapterKey, dir);
      const adapter = this.readOnce(adapterKey, dir, spec, limits, alloc);
      if (this.inode(adapterKey, dir) === before || attempt >= 2) return adapter;
    }
  }

  private inode(adapterKey: AdapterKey, dir: string): number {
    try {
      return statSync(dir).ino;
    } catch (err) {
      if (errno(err) === 'ENOENT' || errno(err) === 'ENOTDIR') throw this.missing(adapterKey);
      throw err;
    }
  }

  private readOnce(adapterKey: AdapterKey, dir: string, spec: ModelSpec, limits: AdapterLimits, alloc?: TensorAlloc): PeftAdapter {
    const name = `adapter_id ${JSON.stringify(displayId(adapterKey))}`;
    if (!this.has(adapterKey)) throw this.missing(adapterKey);
    const loc = this.location(adapterKey);
    const clientError = (err: unknown): unknown => {
      if (!(err instanceof PeftFormatError)) return err;
      if (!this.has(adapterKey)) return this.missing(adapterKey); // deleted while we read it
      // Client-visible: the file and the rule, never the server's paths.
      const detail = err.detail.split(dir + '/').join('').split(dir).join(displayId(adapterKey));
      return invalidArgument(`${name}: ${err.file ? `${err.file}: ` : ''}${detail}`, err);
    };

    let config: PeftConfig;
    let configBytes: number;
    try {
      ({ config, bytesRead: configBytes } = readPeftConfig(loc, spec.family));
    } catch (err) {
      throw clientError(err);
    }
    if (config.r > limits.maxLoraRank) {
      throw invalidArgument(`rank ${config.r} of ${name}: exceeds maxLoraRank ${limits.maxLoraRank}`);
    }
    const bytes = this.diskBytes(adapterKey);
    if (bytes > limits.maxAdapterBytes) {
      throw invalidArgument(`${name}: ${bytes} bytes on disk exceeds maxAdapterBytes ${limits.maxAdapterBytes}`);
    }

    let adapter: PeftAdapter;
    let sumSquares: SumSquares;
    try {
      // What is read counts, not what the directory listing shows (a symlink or a growing file).
      ({ adapter, sumSquares } = decodePeftWeights(loc, config, spec, limits.maxAdapterBytes - configBytes, alloc));
    } catch (err) {
      throw clientError(err);
    }

    if (adapter.r > limits.maxLoraRank) {
      throw invalidArgument(`rank ${adapter.r} of ${name}: exceeds maxLoraRank ${limits.maxLoraRank}`);
    }
    const served = new Set(limits.loraModules.map((m) => m.module));
    const bad = adapter.modules.find((m) => !served.has(m.module));
    if (bad) {
      const valid = [...new Set(limits.loraModules.map((m) => shortName(m.module)))];
      throw invalidArgument(
        `${name}: target module ${shortName(bad.module)} (${bad.module}) has no LoRA path in the served model; ` +
          `valid target_modules: ${valid.join(', ')}`,
      );
    }
    checkLoraEffect(name, adapter, limits.loraModules, sumSquares);
    return adapter;
  }

  /**
   * Writes an adapter atomically: into a temp directory in the root, then one rename. Without overwrite an
   * existing adapter is ALREADY_EXISTS (rename(2) refuses a non-empty target, so two writers cannot both
   * win). With overwrite the old directory is moved aside first; a reader in that instant sees NOT_FOUND,
   * never half a directory.
   */
  write(adapterKey: AdapterKey, adapter: PeftAdapter, opts: { overwrite?: boolean } = {}): void {
    const dir = this.dir(adapterKey);
    if (!this.namespaceUsable(adapterKey)) {
      throw new LoraplexError('FAILED_PRECONDITION', `tenant ${JSON.stringify(parseAdapterKey(adapterKey).tenant)}: the adapter root holds an un-namespaced adapter of that name; move it away`);
    }
    // Never replace a flat-layout directory that is not an adapter: it may be a tenant's whole namespace.
    const mayReplace = () => opts.overwrite === true && (parseAdapterKey(adapterKey).tenant !== '' || existsSync(join(dir, CONFIG)));
    if (existsSync(dir) && !mayReplace()) throw this.exists(adapterKey);
    // Temp files stay in the root (same file system, so the rename is atomic; startup sweeps them).
    const tmp = join(this.root, `${TMP_PREFIX}${adapterKey}-${tag()}`);
    mkdirSync(dirname(dir), { recursive: true });
    try {
      writePeftAdapter(tmp, adapter);
      if (!installDir(tmp, dir, { replace: mayReplace, aside: () => this.tombstone(), syncDirs: this.syncDirs(dir) })) throw this.exists(adapterKey);
    } finally {
      rmSync(tmp, { recursive: true, force: true });
    }
  }

  /** Removes an adapter: renamed to a tombstone first (atomic), then deleted. NOT_FOUND when absent. */
  delete(adapterKey: AdapterKey): void {
    const dir = this.dir(adapterKey);
    // Only adapters: in the flat layout a directory without a config may be a tenant's namespace.
    if (!this.has(adapterKey)) throw this.missing(adapterKey);
    if (!this.moveAsideAndRemove(dir)) throw this.missing(adapterKey);
  }

  /** False when dir vanished meanwhile. */
  private moveAsideAndRemove(dir: string): boolean {
    return removeDirAtomic(dir, this.tombstone(), this.syncDirs(dir));
  }

  /** Where a deleted or replaced adapter goes before it is removed (startup sweeps leftovers). */
  private tombstone(): string {
    return join(this.root, `${TOMBSTONE_PREFIX}${tag()}`);
  }

  /** The directories a rename under the root changes: the adapter's parent, and the root above a tenant's. */
  private syncDirs(dir: string): string[] {
    return dirname(dir) === this.root ? [this.root] : [dirname(dir), this.root];
  }

  private missing(adapterKey: AdapterKey): LoraplexError {
    return notFound(`adapter_id ${JSON.stringify(displayId(adapterKey))} is not in the adapter store`);
  }

  private exists(adapterKey: AdapterKey): LoraplexError {
    return new LoraplexError('ALREADY_EXISTS', `adapter_id ${JSON.stringify(displayId(adapterKey))} already exists in the adapter store`);
  }
}

/** 'model.layers.0.self_attn.q_proj' -> 'q_proj' (PEFT's target_modules names). */
export function shortName(module: string): string {
  return module.slice(module.lastIndexOf('.') + 1);
}

export { WEIGHTS as ADAPTER_WEIGHTS_FILE, CONFIG as ADAPTER_CONFIG_FILE };
