import type { AdapterKey } from '../adapter-key.js';
import { LoraplexError } from '../errors.js';
import type { ModelSpec } from '../models/spec.js';
import { mergeAdapters, type MergeOptions, type MergeSource } from './merge.js';
import type { PeftAdapter } from './peft.js';
import type { AdapterDescription, AdapterLimits, AdapterStore } from './store.js';

/** What a listing needs of one stored adapter, read without touching its tensors. */
export interface StoredAdapter {
  adapterKey: AdapterKey;
  description: AdapterDescription;
  /** Bytes on disk; 0 when the directory vanished meanwhile. */
  bytes: number;
}

/**
 * The adapters' slow work: disk reads, parsing, validation, merges. The server runs it in its worker pool
 * (src/workers/tasks.ts) so that it never stalls the event loop; inlineAdapterIo runs it on the calling thread
 * (tests, tools).
 */
export interface AdapterIo {
  read(adapterKey: AdapterKey, spec: ModelSpec, limits: AdapterLimits): Promise<PeftAdapter>;
  merge(sources: MergeSource[], opts: MergeOptions): Promise<PeftAdapter>;
  /** store.write without overwrite (ALREADY_EXISTS when taken). The adapter is copied, the caller keeps it. */
  write(adapterKey: AdapterKey, adapter: PeftAdapter): Promise<void>;
  /** Every stored adapter (store.list()) with its description and size. */
  listStored(): Promise<StoredAdapter[]>;
  /** The keys of the stored adapters (store.list()), without reading their configs. */
  listKeys(): Promise<AdapterKey[]>;
  /** One stored adapter's listing entry, or null when the store does not hold it. */
  describe(adapterKey: AdapterKey): Promise<StoredAdapter | null>;
  /** store.delete: the directory is renamed away at once, then removed (NOT_FOUND when absent). */
  delete(adapterKey: AdapterKey): Promise<void>;
}

/** One stored adapter's listing entry, through the store's public methods. */
export function describeStored(store: AdapterStore, adapterKey: AdapterKey): StoredAdapter {
  let bytes = 0;
  try {
    bytes = store.diskBytes(adapterKey);
  } catch (err) {
    if (!(err instanceof LoraplexError)) throw err;
  }
  return { adapterKey, description: store.describe(adapterKey), bytes };
}

export function inlineAdapterIo(store: AdapterStore): AdapterIo {
  return {
    read: async (adapterKey, spec, limits) => store.read(adapterKey, spec, limits),
    merge: async (sources, opts) => mergeAdapters(sources, opts),
    write: async (adapterKey, adapter) => store.write(adapterKey, adapter),
    listStored: async () => store.list().map((adapterKey) => describeStored(store, adapterKey)),
    listKeys: async () => store.list(),
    describe: async (adapterKey) => (store.has(adapterKey) ? describeStored(store, adapterKey) : null),
    delete: async (adapterKey) => store.delete(adapterKey),
  };
}
