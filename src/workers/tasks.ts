import type { AdapterKey } from '../adapter-key.js';
import { describeStored, type AdapterIo } from '../adapters/io.js';
import { exportMergedModel, type ExportSource } from '../adapters/export.js';
import { mergeAdapters, type MergeOptions, type MergeSource } from '../adapters/merge.js';
import type { PeftAdapter } from '../adapters/peft.js';
import { AdapterStore, type AdapterLimits } from '../adapters/store.js';
import type { ModelSpec } from '../models/spec.js';
import { loadTrainData as readTrainData, type DataLimits, type DataSourceInput } from '../train/data.js';
import { loadTokenizer, type Tokenizer } from '../tokenizer/index.js';
import { promptIds, type FieldNames, type PromptInput, type PromptLimits } from '../validate/generate.js';
import type { ModelQuant } from '../models/linear.js';
import { diskFullAs } from '../errors.js';
import { stageTrainData } from '../train/jobs.js';
import type { WorkerPool } from './pool.js';

/**
 * The heavy tasks the server runs in its worker pool (src/workers/task-worker.ts runs them). Each takes plain,
 * cloneable input; adapter results come back in SharedArrayBuffers (shared, not copied).
 */

// A worker's own handles, made on first use. Its store never sweeps: the main thread's owns the root.
const stores = new Map<string, AdapterStore>();
const storeAt = (root: string) => stores.get(root) ?? stores.set(root, new AdapterStore(root, { sweep: false })).get(root)!;
const tokenizers = new Map<string, Promise<Tokenizer>>();
const tokenizerAt = (modelDir: string) => tokenizers.get(modelDir) ?? tokenizers.set(modelDir, loadTokenizer(modelDir)).get(modelDir)!;

/**
 * The adapter with its tensors moved into SharedArrayBuffers (copied here, in the pool). The main thread then never
 * copies them: handing them to the engine worker (slot loads) or back to the pool (merges, writes) shares the
 * memory instead of cloning tens of MB on the event loop.
 */
function shared(adapter: PeftAdapter): PeftAdapter {
  const share = (t: Float32Array) => {
    const out = new Float32Array(new SharedArrayBuffer(t.byteLength));
    out.set(t);
    return out;
  };
  return { ...adapter, modules: adapter.modules.map((m) => ({ ...m, a: share(m.a), b: share(m.b) })) };
}

/** A SharedArrayBuffer of `bytes` with every page written once, so that its first real use takes no page faults. */
function prefaulted(bytes: number): SharedArrayBuffer {
  const buffer = new SharedArrayBuffer(bytes);
  const u8 = new Uint8Array(buffer);
  for (let i = 0; i < bytes; i += 4096) u8[i] = 0;
  return buffer;
}

export const tasks = {
  /**
   * Reads an adapter with its tensors decoded straight into shared memory: into `into` (prefaulted, see
   * prefault) when it is exactly the size needed, else into a fresh buffer. `spare` gives `into` back when unused.
   */
  readAdapter(input: { root: string; adapterKey: AdapterKey; spec: ModelSpec; limits: AdapterLimits; into?: SharedArrayBuffer | null }): { adapter: PeftAdapter; spare: SharedArrayBuffer | null } {
    let spare = input.into ?? null;
    const alloc = (floats: number) => {
      const bytes = floats * Float32Array.BYTES_PER_ELEMENT;
      const buffer = spare?.byteLength === bytes ? spare : new SharedArrayBuffer(bytes);
      if (buffer === spare) spare = null;
      return new Float32Array(buffer);
    };
    const adapter = storeAt(input.root).read(input.adapterKey, input.spec, input.limits, alloc);
    return { adapter, spare };
  },

  /** Shared memory for the next adapter read, its pages faulted in here rather than during that read. */
  prefault(input: { bytes: number }): SharedArrayBuffer {
    return prefaulted(input.bytes);
  },

  writeAdapter(input: { root: string; adapterKey: AdapterKey; adapter: PeftAdapter }) {
    try {
      storeAt(input.root).write(input.adapterKey, input.adapter);
    } catch (err) {
      throw diskFullAs(err, 'adapter root'); // errno codes do not cross the pool's boundary; this status does
    }
  },

  listKeys(input: { root: string }) {
    return storeAt(input.root).list();
  },

  listStored(input: { root: string }) {
    const store = storeAt(input.root);
    return store.list().map((adapterKey) => describeStored(store, adapterKey));
  },

  describeStored(input: { root: string; adapterKey: AdapterKey }) {
    const store = storeAt(input.root);
    return store.has(input.adapterKey) ? describeStored(store, input.adapterKey) : null;
  },

  deleteAdapter(input: { root: string; adapterKey: AdapterKey }) {
    storeAt(input.root).delete(input.adapterKey);
  },

  mergeAdapters(input: { sources: MergeSource[]; options: MergeOptions }) {
    return shared(mergeAdapters(input.sources, input.options));
  },

  exportMergedModel(input: { modelDir: string; quant: ModelQuant; sources: ExportSource[]; exportRoot: string; outputName: string; dtype: 'F16' | 'F32' }) {
    try {
      return exportMergedModel(input.modelDir, input.quant, input.sources, input.exportRoot, input.outputName, input.dtype);
    } catch (err) {
      throw diskFullAs(err, 'export root');
    }
  },

  async tokenizePrompt(input: { modelDir: string; prompt: PromptInput; limits: PromptLimits; names?: FieldNames }) {
    return promptIds(input.prompt, await tokenizerAt(input.modelDir), input.limits, input.names);
  },

  /** Reads and validates a Train request's data, and stages it in the job root as the job's future data.json. */
  loadTrainData(input: { source: DataSourceInput; limits: DataLimits; jobRoot: string }) {
    const data = readTrainData(input.source, input.limits);
    return { stagedFile: stageTrainData(input.jobRoot, data), trainExamples: data.train.length, evalExamples: data.eval?.length ?? null };
  },
};

export type Tasks = typeof tasks;
export type TaskPool = WorkerPool<Tasks>;

/** The adapter's tensor bytes (its modules share one buffer when read by readAdapter). */
const tensorBytes = (adapter: PeftAdapter) => adapter.modules.reduce((n, m) => n + m.a.byteLength + m.b.byteLength, 0);

/**
 * The adapter manager's slow work, in the pool. Reads decode into a prefaulted buffer the size of the last adapter
 * read (adapters served together mostly share a shape), refilled in the pool after each use: the kernel's zeroing
 * of tens of MB of fresh pages, which costs more than the decode, stays off the path of a cold load. One adapter's
 * tensors of memory wait there.
 */
export function pooledAdapterIo(pool: TaskPool, root: string): AdapterIo {
  let reserve: SharedArrayBuffer | null = null;
  let refilling = false;
  const refill = (bytes: number) => {
    if (refilling || reserve?.byteLength === bytes) return;
    refilling = true;
    pool.run('prefault', { bytes }).then(
      (buffer) => ((reserve = buffer), (refilling = false)),
      () => (refilling = false),
    );
  };
  return {
    read: async (adapterKey, spec, limits) => {
      const into = reserve;
      reserve = null;
      let result: Awaited<ReturnType<Tasks['readAdapter']>>;
      try {
        result = await pool.run('readAdapter', { root, adapterKey, spec, limits, into });
      } catch (err) {
        reserve ??= into;
        throw err;
      }
      reserve ??= result.spare;
      refill(tensorBytes(result.adapter));
      return result.adapter;
    },
    merge: (sources, options) => pool.run('mergeAdapters', { sources, options }),
    write: (adapterKey, adapter) => pool.run('writeAdapter', { root, adapterKey, adapter }),
    listStored: () => pool.run('listStored', { root }),
    listKeys: () => pool.run('listKeys', { root }),
    describe: (adapterKey) => pool.run('describeStored', { root, adapterKey }),
    delete: (adapterKey) => pool.run('deleteAdapter', { root, adapterKey }),
  };
}
