import { performance } from 'node:perf_hooks';
import { LoraplexError, failedPrecondition, invalidArgument, notFound, resourceExhausted } from '../errors.js';
import type { PeftAdapter } from './peft.js';
import { describeStored, inlineAdapterIo, type AdapterIo, type StoredAdapter } from './io.js';
import { createHash } from 'node:crypto';
import type { LoraModuleInfo } from '../models/graph.js';
import type { ModelSpec } from '../models/spec.js';
import type { AdapterKey } from '../adapter-key.js';
import { displayId } from './tenancy.js';
import { AdapterRegistry, toInfo, type AdapterInfo, type AdapterRecord } from './registry.js';
import { SlotTable, type Lease, type SlotWriter } from './slots.js';
import type { AdapterLimits, AdapterStore } from './store.js';

/**
 * Owns the adapters' lifecycle: store (disk) -> memory (LRU of maxCpuLoras) -> slot (LRU of maxLoras among
 * adapters without running requests). Every operation on one adapter key runs after the previous one on that
 * key has finished (a promise chain per key), so concurrent requests never load an adapter twice or put it into
 * two slots. Operations on different keys interleave; whatever they share (slot ownership, the registry) is
 * changed synchronously, between awaits.
 *
 * Adapters are named by their AdapterKey (tenancy.ts: `id`, or `tenant~id`), which the handlers make (and
 * validate) from the client's id; nothing here checks it again. Messages show only the id part.
 */

export interface AdapterManagerOptions {
  store: AdapterStore;
  spec: ModelSpec;
  /** Modules with a LoRA path in the serving graph. */
  loraModules: LoraModuleInfo[];
  /** Slots in one batch (the engine's pool has maxLoras + 1 slots, slot 0 being the base model). */
  maxLoras: number;
  /** Adapters held in memory; at least maxLoras, since an adapter in a slot stays in memory. */
  maxCpuLoras: number;
  maxLoraRank: number;
  maxAdapterBytes: number;
  slotWriter: SlotWriter;
  /** Where reads, merges and listings run (the server: its worker pool). Default: inline, on this thread. */
  io?: AdapterIo;
  /** Wall clock for lastUsed, in ms. Default Date.now. */
  now?: () => number;
}

export interface AdapterStats {
  /** Adapters by state, as list() reports them: on disk only / in memory without a slot / in a slot. */
  stored: number;
  loaded: number;
  active: number;
  /** Bytes of adapter tensors held in memory. */
  memoryBytes: number;
  /** Reads from the store. */
  loads: number;
  /** Adapters dropped from memory by the LRU (not counting unload). */
  evictions: number;
  /** Slots taken from an idle adapter for another one. */
  slotEvictions: number;
  /** tryAcquire found the adapter already in a slot. */
  hits: number;
  /** tryAcquire had to load it and/or copy it into a slot. */
  misses: number;
  loadSecondsTotal: number;
}

export type { AdapterInfo, Lease, SlotWriter };

const quote = (key: AdapterKey) => JSON.stringify(displayId(key));

/** Keys of per-request mixes: '!' can start neither an adapter id nor a tenant, so they never collide. */
const MIX_PREFIX = '!mix-';
const MAX_MIX_RECIPES = 1024;

/** One source of a per-request mix: an adapter's key and its weight. */
export interface MixSource {
  adapterKey: AdapterKey;
  weight: number;
}

export class AdapterManager {
  private readonly store: AdapterStore;
  private readonly io: AdapterIo;
  private readonly spec: ModelSpec;
  private readonly limits: AdapterLimits;
  private readonly maxCpuLoras: number;
  private readonly now: () => number;
  private readonly registry = new AdapterRegistry();
  private readonly slots: SlotTable;
  /** Tail of each key's operation chain, and how many operations are queued or running for it. */
  private readonly chains = new Map<AdapterKey, Promise<void>>();
  private readonly inflight = new Map<AdapterKey, number>();
  /** lastUsed of adapters no longer in memory, so that listings keep it. */
  private readonly lastUsedOnDisk = new Map<AdapterKey, number>();
  /** Per-request mixes: key -> sources, least recently defined first. */
  private readonly mixes = new Map<AdapterKey, MixSource[]>();
  private counters = { loads: 0, evictions: 0, hits: 0, misses: 0, loadSecondsTotal: 0 };

  constructor(opts: AdapterManagerOptions) {
    const positive = (name: string, v: number) => {
      if (!Number.isSafeInteger(v) || v < 1) throw new RangeError(`${name} must be a positive integer, got ${v}`);
    };
    positive('maxLoras', opts.maxLoras);
    positive('maxCpuLoras', opts.maxCpuLoras);
    positive('maxLoraRank', opts.maxLoraRank);
    positive('maxAdapterBytes', opts.maxAdapterBytes);
    if (opts.maxCpuLoras < opts.maxLoras) {
      throw new RangeError(`maxCpuLoras ${opts.maxCpuLoras} must be at least maxLoras ${opts.maxLoras} (an adapter in a slot stays in memory)`);
    }
    this.store = opts.store;
    this.io = opts.io ?? inlineAdapterIo(opts.store);
    this.spec = opts.spec;
    this.limits = { maxLoraRank: opts.maxLoraRank, maxAdapterBytes: opts.maxAdapterBytes, loraModules: opts.loraModules };
    this.maxCpuLoras = opts.maxCpuLoras;
    this.now = opts.now ?? Date.now;
    this.slots = new SlotTable(opts.maxLoras, opts.slotWriter, (key) => this.inflight.has(key));
  }

  /**
   * Reads and validates an adapter into memory (loadSeconds 0 when it already was). `pin` keeps it in memory
   * until unloaded; a load without pin never unpins. RESOURCE_EXHAUSTED when memory is full of adapters that
   * are pinned or serving requests.
   */
  async load(adapterKey: AdapterKey, opts: { pin?: boolean } = {}): Promise<{ info: AdapterInfo; loadSeconds: number }> {
    return this.serial(adapterKey, async () => {
      const pin = opts.pin ?? false;
      const existing = this.registry.get(adapterKey);
      if (existing) {
        if (pin) existing.pinned = true;
        this.registry.touch(existing, this.now());
        return { info: toInfo(existing), loadSeconds: 0 };
      }
      const loaded = await this.loadLocked(adapterKey, pin, 'throw');
      return { info: toInfo(loaded!.rec), loadSeconds: loaded!.seconds };
    });
  }

  /**
   * A slot for one request: loads the adapter on first use (the store is looked at on every miss, so an
   * adapter copied or trained into it works without a restart) and copies it into a slot when needed.
   * Null when no slot (or no memory) can be freed right now because other adapters have running requests:
   * the caller keeps the request waiting and tries again later. NOT_FOUND when it is neither in memory nor
   * in the store; INVALID_ARGUMENT when the stored adapter is unusable.
   */
  async tryAcquire(adapterKey: AdapterKey): Promise<Lease | null> {
    const ready = this.leaseReady(adapterKey);
    if (ready) return ready;
    return this.serial(adapterKey, async () => {
      let rec = this.registry.get(adapterKey);
      if (rec && rec.state === 'active') return this.hit(rec);
      if (!rec && !this.exists(adapterKey)) throw this.missing(adapterKey);
      // Nothing is loaded for a request that could not run now: waiting adapters would otherwise push each
      // other out of memory on every retry.
      if (!this.slots.available()) return null;
      if (!rec) {
        const loaded = await this.loadLocked(adapterKey, false, 'null');
        if (!loaded) return null;
        rec = loaded.rec;
      }
      if (!(await this.slots.assign(rec))) return null;
      this.counters.misses++;
      this.registry.touch(rec, this.now());
      return this.lease(rec);
    });
  }

  /**
   * A lease at once when the adapter already sits in a slot and nothing else is going on for its key; null
   * otherwise (then tryAcquire does the slow part). Never waits: the scheduler calls it on its loop.
   */
  leaseReady(adapterKey: AdapterKey): Lease | null {
    const hot = this.registry.get(adapterKey);
    return hot && hot.state === 'active' && !this.inflight.has(adapterKey) ? this.hit(hot) : null;
  }

  /**
   * Drops an adapter from memory and from its slot (and, with deleteFromStore, from the store). Returns its
   * info as it now is: state 'stored' (the last description when it was deleted). FAILED_PRECONDITION while
   * requests use it; NOT_FOUND when it is neither in memory nor in the store.
   */
  async unload(adapterKey: AdapterKey, opts: { deleteFromStore?: boolean } = {}): Promise<AdapterInfo> {
    return this.serial(adapterKey, async () => {
      const rec = this.registry.get(adapterKey);
      if (!rec) {
        const stored = await this.io.describe(adapterKey);
        if (!stored) throw this.missing(adapterKey);
        if (opts.deleteFromStore) await this.deleteFromStore(adapterKey);
        return this.storedInfoOf(stored);
      }
      if (rec.activeRequests > 0) {
        throw failedPrecondition(
          `adapter_id ${quote(adapterKey)} has ${rec.activeRequests} running request${rec.activeRequests === 1 ? '' : 's'}; retry when they finish`,
        );
      }
      const cleared = this.drop(rec);
      await cleared;
      const stored = await this.io.describe(adapterKey);
      const info = stored ? { ...this.storedInfoOf(stored), lastUsed: rec.lastUsed } : toInfo(rec);
      if (opts.deleteFromStore && stored) await this.deleteFromStore(adapterKey);
      return info;
    });
  }

  /**
   * Every adapter in the store or in memory, sorted by key. The store's directory is read fresh each call, by the
   * AdapterIo (off the event loop).
   */
  async list(): Promise<AdapterInfo[]> {
    const stored = new Map((await this.io.listStored()).map((s) => [s.adapterKey, s]));
    const keys = new Set(stored.keys());
    for (const r of this.registry.values()) if (!r.adapterKey.startsWith(MIX_PREFIX)) keys.add(r.adapterKey);
    return [...keys].sort().map((adapterKey) => {
      const rec = this.registry.get(adapterKey);
      if (rec) return toInfo(rec);
      // Stored when listed, loaded and evicted since: its last use is known here.
      return this.storedInfoOf(stored.get(adapterKey)!);
    });
  }

  /** One adapter's info: from memory, or described by the AdapterIo (off the event loop). */
  async info(adapterKey: AdapterKey): Promise<AdapterInfo> {
    const rec = this.registry.get(adapterKey);
    if (rec) return toInfo(rec);
    const stored = await this.io.describe(adapterKey);
    if (!stored) throw this.missing(adapterKey);
    return this.storedInfoOf(stored);
  }

  /** Counters and adapters by state; the store's directory is listed by the AdapterIo (off the event loop). */
  async stats(): Promise<AdapterStats> {
    const storedKeys = await this.io.listKeys();
    let loaded = 0;
    let active = 0;
    let memoryBytes = 0;
    for (const r of this.registry.values()) {
      if (r.state === 'active') active++;
      else loaded++;
      memoryBytes += r.bytes;
    }
    const stored = storedKeys.filter((adapterKey) => !this.registry.get(adapterKey)).length;
    return { stored, loaded, active, memoryBytes, ...this.counters, slotEvictions: this.slots.evictions };
  }

  /** Adapter keys by slot (index 0, the base model, is always null). */
  slotTable(): (AdapterKey | null)[] {
    return this.slots.snapshot();
  }

  // --- internals -------------------------------------------------------------------------------------

  /**
   * An adapter's tensors for merging or export: from memory, or read from the store (without taking a memory
   * slot of the LRU). Callers must not modify them.
   */
  async tensors(adapterKey: AdapterKey): Promise<PeftAdapter> {
    return this.serial(adapterKey, async () => {
      const rec = this.registry.get(adapterKey);
      if (rec?.adapter) return rec.adapter;
      if (!this.store.has(adapterKey)) throw this.missing(adapterKey);
      return this.io.read(adapterKey, this.spec, this.limits);
    });
  }

  /** Writes a new adapter into the store (atomically; ALREADY_EXISTS when the id is taken) and returns its info. */
  async create(adapterKey: AdapterKey, adapter: PeftAdapter): Promise<AdapterInfo> {
    return this.serial(adapterKey, async () => {
      if (adapter.r > this.limits.maxLoraRank) {
        throw invalidArgument(`adapter_id ${quote(adapterKey)}: rank ${adapter.r} exceeds maxLoraRank ${this.limits.maxLoraRank}`);
      }
      if (this.registry.get(adapterKey) || this.store.has(adapterKey)) throw new LoraplexError('ALREADY_EXISTS', `adapter_id ${quote(adapterKey)} already exists`);
      await this.io.write(adapterKey, adapter);
      const stored = await this.io.describe(adapterKey);
      if (!stored) throw this.missing(adapterKey); // deleted the instant after it was written
      return this.storedInfoOf(stored);
    });
  }

  /**
   * A weighted mix of adapters as one virtual adapter: their exact cat merge (rank = sum of ranks), built when
   * a request first needs it and then held and slotted like any loaded adapter; LRU eviction just drops it
   * (it is rebuilt from the sources on the next use). Never written to the store, never listed. Returns its key.
   */
  defineMix(sources: MixSource[]): AdapterKey {
    const canonical = [...sources]
      .sort((a, b) => (a.adapterKey < b.adapterKey ? -1 : a.adapterKey > b.adapterKey ? 1 : 0))
      .map((s) => `${s.adapterKey}\u0000${s.weight}`)
      .join('\u0001');
    const key = `${MIX_PREFIX}${createHash('sha256').update(canonical).digest('hex').slice(0, 24)}` as AdapterKey;
    this.mixes.delete(key);
    this.mixes.set(key, sources);
    // Bounded recipes (tiny); the tensors themselves live in the registry under the maxCpuLoras LRU.
    while (this.mixes.size > MAX_MIX_RECIPES) this.mixes.delete(this.mixes.keys().next().value!);
    return key;
  }

  /** Reads a stored adapter, or builds a mix from its sources (from memory when loaded, else the store). */
  private async readAdapter(adapterKey: AdapterKey): Promise<PeftAdapter> {
    const mix = this.mixes.get(adapterKey);
    if (!mix) return this.io.read(adapterKey, this.spec, this.limits);
    const adapters = await Promise.all(
      mix.map(async (s) => ({
        adapterId: displayId(s.adapterKey),
        weight: s.weight,
        adapter: this.registry.get(s.adapterKey)?.adapter ?? (await this.io.read(s.adapterKey, this.spec, this.limits)),
      })),
    );
    const merged = await this.io.merge(adapters, { method: 'cat' });
    if (merged.r > this.limits.maxLoraRank) throw invalidArgument(`adapters: the mix has rank ${merged.r} (the sum of the ranks), over maxLoraRank ${this.limits.maxLoraRank}`);
    return merged;
  }

  private exists(adapterKey: AdapterKey): boolean {
    return this.mixes.has(adapterKey) || this.store.has(adapterKey);
  }

  private serial<T>(adapterKey: AdapterKey, fn: () => Promise<T>): Promise<T> {
    this.inflight.set(adapterKey, (this.inflight.get(adapterKey) ?? 0) + 1);
    const prev = this.chains.get(adapterKey) ?? Promise.resolve();
    const run = prev.then(fn).finally(() => {
      const n = this.inflight.get(adapterKey)! - 1;
      if (n > 0) this.inflight.set(adapterKey, n);
      else this.inflight.delete(adapterKey);
      if (this.chains.get(adapterKey) === tail) this.chains.delete(adapterKey);
    });
    const tail: Promise<void> = run.then(
      () => undefined,
      () => undefined,
    );
    this.chains.set(adapterKey, tail);
    return run;
  }

  private hit(rec: AdapterRecord): Lease {
    this.counters.hits++;
    this.registry.touch(rec, this.now());
    return this.lease(rec);
  }

  private lease(rec: AdapterRecord): Lease {
    // Released adapters become the most recently used: the slot LRU then keeps what was just served.
    return this.slots.lease(rec, () => this.registry.touch(rec, this.now()));
  }

  /**
   * Reads `id` from the store into memory, evicting the LRU evictable adapter when memory is full. When
   * nothing is evictable: RESOURCE_EXHAUSTED, or null with whenFull 'null' if the blockage is temporary
   * (running requests, not pins). Must run inside serial(adapterKey).
   */
  private async loadLocked(adapterKey: AdapterKey, pin: boolean, whenFull: 'throw' | 'null'): Promise<{ rec: AdapterRecord; seconds: number } | null> {
    // Find room first (changing nothing) so that a full memory fails before any read.
    if (!this.victims(adapterKey, whenFull)) return null;

    const t0 = performance.now();
    const adapter = await this.readAdapter(adapterKey);
    const seconds = (performance.now() - t0) / 1000;

    // Other adapters may have been loaded or leased while this one was read: find room again.
    const victims = this.victims(adapterKey, whenFull);
    if (!victims) return null;
    const clears = victims.map((v) => {
      this.counters.evictions++;
      return this.drop(v);
    });
    const rec = this.registry.add(adapterKey, adapter, pin, this.now());
    this.counters.loads++;
    this.counters.loadSecondsTotal += seconds;
    await Promise.all(clears);
    return { rec, seconds };
  }

  /**
   * The adapters to evict so that one more fits in memory (none when it fits). When too few are evictable:
   * RESOURCE_EXHAUSTED, or null with whenFull 'null' if the blockage is temporary (running requests, not pins).
   */
  private victims(adapterKey: AdapterKey, whenFull: 'throw' | 'null'): AdapterRecord[] | null {
    const overflow = this.registry.size + 1 - this.maxCpuLoras;
    if (overflow <= 0) return [];
    const candidates = this.evictable();
    if (candidates.length >= overflow) return candidates.slice(0, overflow);
    const allPinned = this.registry.values().every((r) => r.pinned);
    if (whenFull === 'null' && !allPinned) return null;
    throw resourceExhausted(
      allPinned
        ? `adapter_id ${quote(adapterKey)}: cannot load, all maxCpuLoras ${this.maxCpuLoras} adapters in memory are pinned; unload one`
        : `adapter_id ${quote(adapterKey)}: cannot load, all maxCpuLoras ${this.maxCpuLoras} adapters in memory are pinned or serving requests; retry later`,
    );
  }

  /** Unpinned, idle adapters, those without a slot first, then least recently used first. */
  private evictable(): AdapterRecord[] {
    return this.registry
      .values()
      .filter((r) => !r.pinned && r.activeRequests === 0 && !this.inflight.has(r.adapterKey))
      .sort((x, y) => Number(x.slot !== null) - Number(y.slot !== null) || x.useSeq - y.useSeq);
  }

  /**
   * Forgets an adapter synchronously (record, weights, slot ownership), so that once the caller drops the
   * record nothing references its Float32Arrays; the returned promise is the engine's clear of its slot.
   */
  private drop(rec: AdapterRecord): Promise<void> {
    const cleared = this.slots.vacate(rec);
    this.registry.remove(rec);
    if (rec.lastUsed !== null && !rec.adapterKey.startsWith(MIX_PREFIX)) this.lastUsedOnDisk.set(rec.adapterKey, rec.lastUsed);
    return cleared;
  }

  private async deleteFromStore(adapterKey: AdapterKey): Promise<void> {
    await this.io.delete(adapterKey);
    this.lastUsedOnDisk.delete(adapterKey);
  }

  /** A stored adapter's record from its listing entry (read here, or in the pool by the AdapterIo). */
  private storedInfoOf(s: StoredAdapter): AdapterInfo {
    const d = s.description;
    return {
      adapterKey: s.adapterKey,
      state: 'stored',
      rank: d.r ?? 0,
      alpha: d.alpha ?? 0,
      targetModules: d.targetModules,
      bytes: s.bytes,
      lastUsed: this.lastUsedOnDisk.get(s.adapterKey) ?? null,
      pinned: false,
      activeRequests: 0,
      slot: null,
      ...(d.invalidReason !== undefined ? { invalidReason: d.invalidReason } : {}),
    };
  }

  private missing(adapterKey: AdapterKey): LoraplexError {
    return notFound(`adapter_id ${quote(adapterKey)} is not in the adapter store`);
  }
}
