import type { AdapterKey } from '../adapter-key.js';
import type { PeftAdapter } from './peft.js';
import { shortName } from './store.js';
import type { SeenByClient } from './tenancy.js';

/**
 * key -> record of every adapter held in memory. States: 'stored' (only on disk: never a record here, built on
 * demand for listings), 'loaded' (validated, in CPU memory), 'active' (also in a slot of the engine's pool).
 */
export type AdapterState = 'stored' | 'loaded' | 'active';

export interface AdapterRecord {
  adapterKey: AdapterKey;
  state: AdapterState;
  /** The weights while in memory; undefined once dropped, so nothing here keeps them alive. */
  adapter: PeftAdapter | undefined;
  /** Bytes of its tensors in memory (or on disk when only stored). */
  bytes: number;
  rank: number;
  alpha: number;
  /** PEFT short names (q_proj, v_proj, ...). */
  targetModules: string[];
  /** Wall-clock ms of the last load or acquire; null when never used by this process. */
  lastUsed: number | null;
  /** Monotonic use counter: the LRU order (ties in lastUsed would make it ambiguous). */
  useSeq: number;
  /** Never evicted from memory by the LRU (still gives up its slot when idle). */
  pinned: boolean;
  /** Running requests holding a lease on its slot. */
  activeRequests: number;
  slot: number | null;
}

/** What the API reports about an adapter, still under its key (asSeenBy turns it into a ClientAdapterInfo). */
export interface AdapterInfo {
  adapterKey: AdapterKey;
  state: AdapterState;
  rank: number;
  alpha: number;
  targetModules: string[];
  bytes: number;
  lastUsed: number | null;
  pinned: boolean;
  activeRequests: number;
  /** Its slot while active, else null (for logs and tests; the API does not expose slots). */
  slot: number | null;
  /** Why a stored adapter cannot be loaded (its config breaks a rule); absent when it can. */
  invalidReason?: string;
}

/** AdapterInfo as its owner sees it: the client's id instead of the key. */
export type ClientAdapterInfo = SeenByClient<AdapterInfo>;

export function adapterBytes(adapter: PeftAdapter): number {
  let n = 0;
  for (const m of adapter.modules) n += m.a.byteLength + m.b.byteLength;
  return n;
}

export class AdapterRegistry {
  private readonly records = new Map<AdapterKey, AdapterRecord>();
  private seq = 0;

  get size(): number {
    return this.records.size;
  }

  get(key: AdapterKey): AdapterRecord | undefined {
    return this.records.get(key);
  }

  values(): AdapterRecord[] {
    return [...this.records.values()];
  }

  /** Records a freshly loaded adapter. */
  add(adapterKey: AdapterKey, adapter: PeftAdapter, pinned: boolean, now: number): AdapterRecord {
    const rec: AdapterRecord = {
      adapterKey,
      state: 'loaded',
      adapter,
      bytes: adapterBytes(adapter),
      rank: adapter.r,
      alpha: adapter.alpha,
      targetModules: [...new Set(adapter.modules.map((m) => shortName(m.module)))],
      lastUsed: now,
      useSeq: ++this.seq,
      pinned,
      activeRequests: 0,
      slot: null,
    };
    this.records.set(adapterKey, rec);
    return rec;
  }

  touch(rec: AdapterRecord, now: number): void {
    rec.lastUsed = now;
    rec.useSeq = ++this.seq;
  }

  /** Forgets a record and its weights (the caller has already taken it out of its slot). */
  remove(rec: AdapterRecord): void {
    // Drop the reference from the record too: a caller may still hold the record object itself.
    rec.adapter = undefined;
    rec.state = 'stored';
    rec.slot = null;
    rec.pinned = false;
    this.records.delete(rec.adapterKey);
  }
}

export function toInfo(rec: AdapterRecord): AdapterInfo {
  return {
    adapterKey: rec.adapterKey,
    state: rec.state,
    rank: rec.rank,
    alpha: rec.alpha,
    targetModules: [...rec.targetModules],
    bytes: rec.bytes,
    lastUsed: rec.lastUsed,
    pinned: rec.pinned,
    activeRequests: rec.activeRequests,
    slot: rec.slot,
  };
}
