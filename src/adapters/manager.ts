import { performance } from 'node:perf_hooks';
import { LoraplexError, failedPrecondition, invalidArgument, notFound, resourceExhausted } from '../errors.js';
import type { PeftAdapter } from './peft.js';
import { describeStored, inlineAdapterIo, type AdapterIo, type StoredAdapter } from './io.js';
import { createHash } from 'node:crypto';
import type { LoraModuleInfo } from '../models/graph.js';
import type { ModelSpec } from '../models/spec.js';
import { displayId, parseAdapterKey } from './tenancy.js';
import { AdapterRegistry, toInfo, type AdapterInfo, type AdapterRecord } from './registry.js';
import { SlotTable, type Lease, type SlotWriter } from './slots.js';
import type { AdapterLimits, AdapterStore } from './store.js';

/**
 * Owns the adapters' lifecycle: store (disk) -> memory (LRU of maxCpuLoras) -> slot (LRU of maxLoras among
 * adapters without running requests). Every operation on one adapter id runs after the previous one on that
 * id has finished (a promise chain per id), so concurrent requests never load an adapter twice or put it into
 * two slots. Operations on different ids interleave; whatever they share (slot ownership, the registry) is
 * changed synchronously, between awaits.
 *
 * Adapters are named by their key (tenancy.ts: `id`, or `tenant~id`); the handlers scope the client's id
 * into the caller's namespace before calling in here. Messages show only the id part.
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

const quote = (key: string) => JSON.stringify(displayId(key));

/** The key unchanged once both its parts are valid names (INVALID_ARGUMENT otherwise). */
/** Keys of per-request mixes: '!' can start neither an adapter id nor a tenant, so they never collide. */
const MIX_PREFIX = '!mix-';
const MAX_MIX_RECIPES = 1024;
const validKey = (key: string) => (key.startsWith(MIX_PREFIX) ? key : (parseAdapterKey(key), key));

export class AdapterManager {
  private readonly store: AdapterStore;
  private readonly io: AdapterIo;
  private readonly spec: ModelSpec;
  private readonly limits: AdapterLimits;
  private readonly maxCpuLoras: number;
  private readonly now: () => number;
  private readonly registry = new AdapterRegistry();
  private readonly slots: SlotTable;
  /** Tail of each id's operation chain, and how many operations are queued or running for it. */
  private readonly chains = new Map<string, Promise<void>>();
  private readonly inflight = new Map<string, number>();
  /** lastUsed of adapters no longer in memory, so that listings keep it. */
  private readonly lastUsedOnDisk = new Map<string, number>();
  /** Per-request mixes: key -> sources (scoped keys and weights), least recently defined first. */
  private readonly mixes = new Map<string, { key: string; weight: number }[]>();
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
    this.slots = new SlotTable(opts.maxLoras, opts.slotWriter, (id) => this.inflight.has(id));
  }

  /**
   * Reads and validates an adapter into memory (loadSeconds 0 when it already was). `pin` keeps it in memory
   * until unloaded; a load without pin never unpins. RESOURCE_EXHAUSTED when memory is full of adapters that
   * are pinned or serving requests.
   */
  async load(adapterId: string, opts: { pin?: boolean } = {}): Promise<{ info: AdapterInfo; loadSeconds: number }> {
    const id = validKey(adapterId);
    return this.serial(id, async () => {
      const pin = opts.pin ?? false;
      const existing = this.registry.get(id);
      if (existing) {
        if (pin) existing.pinned = true;
        this.registry.touch(existing, this.now());
        return { info: toInfo(existing), loadSeconds: 0 };
      }
      const loaded = await this.loadLocked(id, pin, 'throw');
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
  async tryAcquire(adapterId: string): Promise<Lease | null> {
    const ready = this.leaseReady(adapterId);
    if (ready) return ready;
    const id = validKey(adapterId);
    return this.serial(id, async () => {
      let rec = this.registry.get(id);
      if (rec && rec.state === 'active') return this.hit(rec);
      if (!rec && !this.exists(id)) throw this.missing(id);
      // Nothing is loaded for a request that could not run now: waiting adapters would otherwise push each
      // other out of memory on every retry.
      if (!this.slots.available()) return null;
      if (!rec) {
        const loaded = await this.loadLocked(id, false, 'null');
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
   * A lease at once when the adapter already sits in a slot and nothing else is going on for its id; null
   * otherwise (then tryAcquire does the slow part). Never waits: the scheduler calls it on its loop.
   */
  leaseReady(adapterId: string): Lease | null {
    const id = validKey(adapterId);
    const hot = this.registry.get(id);
    return hot && hot.state === 'active' && !this.inflight.has(id) ? this.hit(hot) : null;
  }

  /**
   * Drops an adapter from memory and from its slot (and, with deleteFromStore, from the store). Returns its
   * info as it now is: state 'stored' (the last description when it was deleted). FAILED_PRECONDITION while
   * requests use it; NOT_FOUND when it is neither in memory nor in the store.
   */
  async unload(adapterId: string, opts: { deleteFromStore?: boolean } = {}): Promise<AdapterInfo> {
    const id = validKey(adapterId);
    return this.serial(id, async () => {
      const rec = this.registry.get(id);
      if (!rec) {
        const stored = await this.io.describe(id);
        if (!stored) throw this.missing(id);
        if (opts.deleteFromStore) await this.deleteFromStore(id);
        return this.storedInfoOf(stored);
      }
      if (rec.activeRequests > 0) {
        throw failedPrecondition(
          `adapter_id ${quote(id)} has ${rec.activeRequests} running request${rec.activeRequests === 1 ? '' : 's'}; retry when they finish`,
        );
      }
      const cleared = this.drop(rec);
      await cleared;
      const stored = await this.io.describe(id);
      const info = stored ? { ...this.storedInfoOf(stored), lastUsed: rec.lastUsed } : toInfo(rec);
      if (opts.deleteFromStore && stored) await this.deleteFromStore(id);
      return info;
    });
  }

  /**
   * Every adapter in the store or in memory, sorted by id. The store's directory is read fresh each call, by the
   * AdapterIo (off the event loop).
   */
  async list(): Promise<AdapterInfo[]> {
    const stored = new Map((await this.io.listStored()).map((s) => [s.key, s]));
    const ids = new Set(stored.keys());
    for (const r of this.registry.values()) if (!r.adapterId.startsWith(MIX_PREFIX)) ids.add(r.adapterId);
    return [...ids].sort().map((id) => {
      const rec = this.registry.get(id);
      if (rec) return toInfo(rec);
      // Stored when listed, loaded and evicted since: its last use is known here.
      return this.storedInfoOf(stored.get(id)!);
    });
  }

  /** One adapter's info: from memory, or described by the AdapterIo (off the event loop). */
  async info(adapterId: string): Promise<AdapterInfo> {
    const id = validKey(adapterId);
    const rec = this.registry.get(id);
    if (rec) return toInfo(rec);
    const stored = await this.io.describe(id);
    if (!stored) throw this.missing(id);
    return this.storedInfoOf(stored);
  }

  stats(): AdapterStats {
    let loaded = 0;
    let active = 0;
    let memoryBytes = 0;
    for (const r of this.registry.values()) {
      if (r.state === 'active') active++;
      else loaded++;
      memoryBytes += r.bytes;
    }
    const stored = this.store.list().filter((id) => !this.registry.get(id)).length;
    return { stored, loaded, active, memoryBytes, ...this.counters, slotEvictions: this.slots.evictions };
  }

  /** Adapter ids by slot (index 0, the base model, is always null). */
  slotTable(): (string | null)[] {
    return this.slots.snapshot();
  }

  // --- internals -------------------------------------------------------------------------------------

  /**
   * An adapter's tensors for merging or export: from memory, or read from the store (without taking a memory
   * slot of the LRU). Callers must not modify them.
   */
  async tensors(adapterId: string): Promise<PeftAdapter> {
    const id = validKey(adapterId);
    return this.serial(id, async () => {
      const rec = this.registry.get(id);
      if (rec?.adapter) return rec.adapter;
      if (!this.store.has(id)) throw this.missing(id);
      return this.io.read(id, this.spec, this.limits);
    });
  }

  /** Writes a new adapter into the store (atomically; ALREADY_EXISTS when the id is taken) and returns its info. */
  async create(adapterId: string, adapter: PeftAdapter): Promise<AdapterInfo> {
    const id = validKey(adapterId);
    return this.serial(id, async () => {
      if (adapter.r > this.limits.maxLoraRank) {
        throw invalidArgument(`adapter_id ${quote(id)}: rank ${adapter.r} exceeds maxLoraRank ${this.limits.maxLoraRank}`);
      }
      if (this.registry.get(id) || this.store.has(id)) throw new LoraplexError('ALREADY_EXISTS', `adapter_id ${quote(id)} already exists`);
      await this.io.write(id, adapter);
      const stored = await this.io.describe(id);
      if (!stored) throw this.missing(id); // deleted the instant after it was written
      return this.storedInfoOf(stored);
    });
  }

  /**
   * A weighted mix of adapters as one virtual adapter: their exact cat merge (rank = sum of ranks), built when
   * a request first needs it and then held and slotted like any loaded adapter; LRU eviction just drops it
   * (it is rebuilt from the sources on the next use). Never written to the store, never listed. Returns its key.
   */
  defineMix(sources: { key: string; weight: number }[]): string {
    for (const s of sources) validKey(s.key);
    const canonical = [...sources].sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0)).map((s) => `${s.key}\u0000${s.weight}`).join('\u0001');
    const key = `${MIX_PREFIX}${createHash('sha256').update(canonical).digest('hex').slice(0, 24)}`;
    this.mixes.delete(key);
    this.mixes.set(key, sources);
    // Bounded recipes (tiny); the tensors themselves live in the registry under the maxCpuLoras LRU.
    while (this.mixes.size > MAX_MIX_RECIPES) this.mixes.delete(this.mixes.keys().next().value!);
    return key;
  }

  /** Reads a stored adapter, or builds a mix from its sources (from memory when loaded, else the store). */
  private async readAdapter(id: string): Promise<PeftAdapter> {
    const mix = this.mixes.get(id);
    if (!mix) return this.io.read(id, this.spec, this.limits);
    const adapters = await Promise.all(
      mix.map(async (s) => ({ adapterId: s.key, weight: s.weight, adapter: this.registry.get(s.key)?.adapter ?? (await this.io.read(s.key, this.spec, this.limits)) })),
    );
    const merged = await this.io.merge(adapters, { method: 'cat' });
    if (merged.r > this.limits.maxLoraRank) throw invalidArgument(`adapters: the mix has rank ${merged.r} (the sum of the ranks), over maxLoraRank ${this.limits.maxLoraRank}`);
    return merged;
  }

  private exists(id: string): boolean {
    return this.mixes.has(id) || this.store.has(id);
  }

  private serial<T>(id: string, fn: () => Promise<T>): Promise<T> {
    this.inflight.set(id, (this.inflight.get(id) ?? 0) + 1);
    const prev = this.chains.get(id) ?? Promise.resolve();
    const run = prev.then(fn).finally(() => {
      const n = this.inflight.get(id)! - 1;
      if (n > 0) this.inflight.set(id, n);
      else this.inflight.delete(id);
      if (this.chains.get(id) === tail) this.chains.delete(id);
    });
    const tail: Promise<void> = run.then(
      () => undefined,
      () => undefined,
    );
    this.chains.set(id, tail);
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
   * (running requests, not pins). Must run inside serial(id).
   */
  private async loadLocked(id: string, pin: boolean, whenFull: 'throw' | 'null'): Promise<{ rec: AdapterRecord; seconds: number } | null> {
    // Find room first (changing nothing) so that a full memory fails before any read.
    if (!this.victims(id, whenFull)) return null;

    const t0 = performance.now();
    const adapter = await this.readAdapter(id);
    const seconds = (performance.now() - t0) / 1000;

    // Other adapters may have been loaded or leased while this one was read: find room again.
    const victims = this.victims(id, whenFull);
    if (!victims) return null;
    const clears = victims.map((v) => {
      this.counters.evictions++;
      return this.drop(v);
    });
    const rec = this.registry.add(id, adapter, pin, this.now());
    this.counters.loads++;
    this.counters.loadSecondsTotal += seconds;
    await Promise.all(clears);
    return { rec, seconds };
  }

  /**
   * The adapters to evict so that one more fits in memory (none when it fits). When too few are evictable:
   * RESOURCE_EXHAUSTED, or null with whenFull 'null' if the blockage is temporary (running requests, not pins).
   */
  private victims(id: string, whenFull: 'throw' | 'null'): AdapterRecord[] | null {
    const overflow = this.registry.size + 1 - this.maxCpuLoras;
    if (overflow <= 0) return [];
    const candidates = this.evictable();
    if (candidates.length >= overflow) return candidates.slice(0, overflow);
    const allPinned = this.registry.values().every((r) => r.pinned);
    if (whenFull === 'null' && !allPinned) return null;
    throw resourceExhausted(
      allPinned
        ? `adapter_id ${quote(id)}: cannot load, all maxCpuLoras ${this.maxCpuLoras} adapters in memory are pinned; unload one`
        : `adapter_id ${quote(id)}: cannot load, all maxCpuLoras ${this.maxCpuLoras} adapters in memory are pinned or serving requests; retry later`,
    );
  }

  /** Unpinned, idle adapters, those without a slot first, then least recently used first. */
  private evictable(): AdapterRecord[] {
    return this.registry
      .values()
      .filter((r) => !r.pinned && r.activeRequests === 0 && !this.inflight.has(r.adapterId))
      .sort((x, y) => Number(x.slot !== null) - Number(y.slot !== null) || x.useSeq - y.useSeq);
  }

  /**
   * Forgets an adapter synchronously (record, weights, slot ownership), so that once the caller drops the
   * record nothing references its Float32Arrays; the returned promise is the engine's clear of its slot.
   */
  private drop(rec: AdapterRecord): Promise<void> {
    const cleared = this.slots.vacate(rec);
    this.registry.remove(rec);
    if (rec.lastUsed !== null && !rec.adapterId.startsWith(MIX_PREFIX)) this.lastUsedOnDisk.set(rec.adapterId, rec.lastUsed);
    return cleared;
  }

  private async deleteFromStore(id: string): Promise<void> {
    await this.io.delete(id);
    this.lastUsedOnDisk.delete(id);
  }

  /** A stored adapter's record from its listing entry (read here, or in the pool by the AdapterIo). */
  private storedInfoOf(s: StoredAdapter): AdapterInfo {
    const d = s.description;
    return {
      adapterId: s.key,
      state: 'stored',
      rank: d.r ?? 0,
      alpha: d.alpha ?? 0,
      targetModules: d.targetModules,
      bytes: s.bytes,
      lastUsed: this.lastUsedOnDisk.get(s.key) ?? null,
      pinned: false,
      activeRequests: 0,
      slot: null,
      ...(d.invalidReason !== undefined ? { invalidReason: d.invalidReason } : {}),
    };
  }

  private missing(id: string): LoraplexError {
    return notFound(`adapter_id ${quote(id)} is not in the adapter store`);
  }
}
