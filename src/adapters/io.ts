import { LoraplexError } from '../errors.js';
import type { ModelSpec } from '../models/spec.js';
import { mergeAdapters, type MergeOptions, type MergeSource } from './merge.js';
import type { PeftAdapter } from './peft.js';
import type { AdapterDescription, AdapterLimits, AdapterStore } from './store.js';

/** What a listing needs of one stored adapter, read without touching its tensors. */
export interface StoredAdapter {
  key: string;
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
  read(key: string, spec: ModelSpec, limits: AdapterLimits): Promise<PeftAdapter>;
  merge(sources: MergeSource[], opts: MergeOptions): Promise<PeftAdapter>;
  /** store.write without overwrite (ALREADY_EXISTS when taken). The adapter is copied, the caller keeps it. */
  write(key: string, adapter: PeftAdapter): Promise<void>;
  /** Every stored adapter (store.list()) with its description and size. */
  listStored(): Promise<StoredAdapter[]>;
  /** One stored adapter's listing entry, or null when the store does not hold it. */
  describe(key: string): Promise<StoredAdapter | null>;
  /** store.delete: the directory is renamed away at once, then removed (NOT_FOUND when absent). */
  delete(key: string): Promise<void>;
}

/** One stored adapter's listing entry, through the store's public methods. */
export function describeStored(store: AdapterStore, key: string): StoredAdapter {
  let bytes = 0;
  try {
    bytes = store.diskBytes(key);
  } catch (err) {
    if (!(err instanceof LoraplexError)) throw err;
  }
  return { key, description: store.describe(key), bytes };
}

export function inlineAdapterIo(store: AdapterStore): AdapterIo {
  return {
    read: async (key, spec, limits) => store.read(key, spec, limits),
    merge: async (sources, opts) => mergeAdapters(sources, opts),
    write: async (key, adapter) => store.write(key, adapter),
    listStored: async () => store.list().map((key) => describeStored(store, key)),
    describe: async (key) => (store.has(key) ? describeStored(store, key) : null),
    delete: async (key) => store.delete(key),
  };
}
