import ort from 'onnxruntime-node';
import { LoraplexError, type ErrorCode } from '../errors.js';
import { KV_BLOCK, KvCache, KvCacheFull } from './kv-cache.js';
import { LoraPool } from './lora-pool.js';
import { PrefixStore, type PrefixOps } from './prefix-cache.js';
import type { LoraAdapterWeights } from '../models/lora.js';
import type { ServingLayout } from '../models/graph.js';

/** The only module that imports onnxruntime. Runs inside the engine worker (session.run blocks its thread). */

export interface RuntimeOptions {
  modelPath: string;
  layout: ServingLayout;
  /** Cache rows = sequences that can be in flight at once (maxNumSeqs). */
  maxNumSeqs: number;
  /** Tokens per row (maxModelLen). */
  maxModelLen: number;
  /**
   * Bytes of K/V cache blocks (address space; pages are committed as blocks are first used). Absent: enough for
   * every row at maxModelLen. Never more than that either: more could not be used.
   */
  kvCacheBytes?: number;
  /** Adapter slots including slot 0 (the base model): maxLoras + 1. */
  slots: number;
  maxLoraRank: number;
  intraOpThreads: number;
  /**
   * Let idle intra-op threads spin instead of sleeping: about 10 % faster decode on a 2-vCPU VM (thread wake-ups
   * are slow there) at the price of a busy core while the server idles. Off by default.
   */
  allowSpinning?: boolean;
  /** Default true. false: no probe, a lone row takes the CPU's own M = 1 kernel (see pairsSingleRows). */
  exactBatches?: boolean;
  executionProviders?: string[];
}

export interface StepRow {
  kvRow: number;
  slot: number;
  pastLen: number;
  tokens: number[];
  /** Multiplier of the slot's adapter delta for this row (a request's adapter_scale); default 1. */
  loraScale?: number;
}

export interface StepResult {
  /** [batch, vocab] logits of each row's last new token. */
  logits: Float32Array;
  runMs: number;
  /** KV cache blocks held by rows after the step. */
  kvBlocksUsed: number;
}

/** Float32 elements of one typed array: V8's limit for a pool of one layer's keys. */
const MAX_POOL_ELEMENTS = 2 ** 31;

/** Cache blocks (the zero block included) for the options: the byte budget, capped by what rows could ever hold. */
export function kvCacheBlocks(opts: Pick<RuntimeOptions, 'kvCacheBytes' | 'maxNumSeqs' | 'maxModelLen'>, layout: Pick<ServingLayout, 'numLayers' | 'kvDim'>): number {
  const useful = opts.maxNumSeqs * Math.ceil(opts.maxModelLen / KV_BLOCK);
  const budget = opts.kvCacheBytes === undefined ? useful : Math.floor(opts.kvCacheBytes / KvCache.blockBytes(layout.numLayers, layout.kvDim));
  if (budget < 1) throw new EngineError(`kvCacheBytes ${opts.kvCacheBytes}: less than one cache block of ${KV_BLOCK} positions (${KvCache.blockBytes(layout.numLayers, layout.kvDim)} bytes for this model)`, 'INVALID_ARGUMENT');
  return 1 + Math.min(budget, useful, Math.floor(MAX_POOL_ELEMENTS / (KV_BLOCK * layout.kvDim)) - 1);
}

/** An engine failure with its domain code; crosses the worker boundary as { message, code }. */
export class EngineError extends LoraplexError {
  constructor(message: string, code: ErrorCode) {
    super(code, message);
    this.name = 'EngineError';
  }
}

export class Runtime {
  private constructor(
    private readonly session: ort.InferenceSession,
    readonly opts: RuntimeOptions,
    readonly cache: KvCache,
    readonly pool: LoraPool,
  ) {
    // The pools are fed whole every step: one tensor per layer, made once.
    for (let l = 0; l < cache.numLayers; l++) {
      const dims = [cache.numBlocks, KV_BLOCK, cache.kvDim];
      this.poolTensors.push(new ort.Tensor('float32', cache.keys[l]!, dims), new ort.Tensor('float32', cache.values[l]!, dims));
    }
  }

  /** past_key.L and past_value.L for every layer, in that order. */
  private readonly poolTensors: ort.Tensor[] = [];

  /** Prompt-prefix K/V blocks kept between requests (empty unless the scheduler saves some). */
  readonly prefixes = new PrefixStore();

  /**
   * Whether one-token steps of one row run as a pair of identical rows. Some CPU kernels give a lone row other
   * numbers than the same row among others: onnxruntime's 4-bit MatMulNBits on AVX2 takes a dedicated M = 1 path
   * that sums in another order than its M >= 2 path (AVX-512 has no such path). A request decoding alone would
   * then not match itself in a batch. `create` finds out on the real graph, so no CPU list has to be kept.
   */
  pairsSingleRows = false;

  static async create(opts: RuntimeOptions): Promise<Runtime> {
    const providers = opts.executionProviders ?? ['cpu'];
    let session: ort.InferenceSession;
    try {
      session = await ort.InferenceSession.create(opts.modelPath, {
        executionProviders: providers,
        intraOpNumThreads: opts.intraOpThreads,
        interOpNumThreads: 1,
        graphOptimizationLevel: 'all',
        executionMode: 'sequential',
        enableCpuMemArena: true,
        enableMemPattern: true,
        // An idle intra-op pool spins a whole core by default; serving is mostly idle between steps.
        extra: { session: { intra_op: { allow_spinning: opts.allowSpinning ? '1' : '0' } } },
      });
    } catch (e) {
      const msg = e instanceof Error ? e.message : String(e);
      if (/shared library|provider/i.test(msg) && providers.some((p) => p !== 'cpu')) {
        throw new EngineError(`execution provider ${providers.join(',')} could not be loaded (${msg}); install onnxruntime-node with ONNXRUNTIME_NODE_INSTALL=cuda12 and the CUDA 12 libraries, or use the cpu provider`, 'FAILED_PRECONDITION');
      }
      throw e;
    }
    const { layout } = opts;
    const cache = new KvCache(layout.numLayers, opts.maxNumSeqs, kvCacheBlocks(opts, layout), layout.kvDim);
    const pool = new LoraPool(layout.loraModules, opts.slots, opts.maxLoraRank);
    const fed = /^(input_ids|past_len|kv_blocks|slot|lora_scale|past_key\.\d+|past_value\.\d+|lora_[ab]\..+)$/;
    const missing = session.inputNames.filter((n) => !fed.test(n));
    if (missing.length) throw new EngineError(`serving graph has inputs the runtime does not feed: ${missing.join(', ')}`, 'INTERNAL');
    const runtime = new Runtime(session, opts, cache, pool);
    runtime.pairsSingleRows = opts.exactBatches !== false && (await runtime.loneRowDiffers());
    return runtime;
  }

  /** One token on row 0, alone and then as a pair: do the logits differ in any bit? Leaves row 0 free. */
  private async loneRowDiffers(): Promise<boolean> {
    const row: StepRow = { kvRow: 0, slot: 0, pastLen: 0, tokens: [Math.min(1, this.opts.layout.vocabSize - 1)] };
    const alone = (await this.forward([row], undefined, false)).logits.slice();
    const paired = (await this.forward([row], undefined, true)).logits;
    this.cache.freeRow(0);
    return alone.some((v, i) => !Object.is(v, paired[i]));
  }

  setSlot(slot: number, adapter: LoraAdapterWeights): void {
    this.pool.load(slot, adapter);
  }

  clearSlot(slot: number): void {
    this.pool.clear(slot);
  }

  /**
   * One forward step. Either one row with a chunk of tokens (prefill) or many rows with one token each (decode):
   * rows in a batch must all carry the same number of tokens. `freeRows` (sequences that ended) give their cache
   * blocks back first, whatever else happens. `prefix` restores cached blocks into rows before the pass and saves
   * blocks after it; its drops happen whatever the step's outcome, so the store never keeps a block the scheduler
   * has forgotten.
   */
  async step(rows: StepRow[], prefix?: PrefixOps, freeRows?: readonly number[]): Promise<StepResult> {
    try {
      for (const row of freeRows ?? []) if (row >= 0 && row < this.opts.maxNumSeqs) this.cache.freeRow(row);
      // Only giving blocks back (the scheduler went idle).
      if (rows.length === 0 && freeRows?.length && !prefix) return { logits: new Float32Array(0), runMs: 0, kvBlocksUsed: this.cache.usedBlocks };
      return await this.forward(rows, prefix);
    } catch (e) {
      if (e instanceof KvCacheFull) throw new EngineError(e.message, 'RESOURCE_EXHAUSTED');
      throw e;
    } finally {
      if (prefix?.drop) this.prefixes.drop(prefix.drop);
    }
  }

  private async forward(asked: StepRow[], prefix: PrefixOps | undefined, pair = this.pairsSingleRows): Promise<StepResult> {
    const { opts, cache } = this;
    // A lone one-token row runs beside a copy of itself (see pairsSingleRows). The copy writes the same keys and
    // values to the same place, and only the first row's logits are returned.
    const rows = pair && asked.length === 1 && asked[0]!.tokens.length === 1 ? [asked[0]!, asked[0]!] : asked;
    if (rows.length === 0) throw new EngineError('step with no rows', 'INVALID_ARGUMENT');
    const seq = rows[0]!.tokens.length;
    const seen = new Set<number>();
    for (const r of asked) {
      if (r.tokens.length !== seq || seq === 0) throw new EngineError('every row of a step must carry the same, non-zero number of tokens', 'INVALID_ARGUMENT');
      if (r.kvRow < 0 || r.kvRow >= opts.maxNumSeqs || seen.has(r.kvRow)) throw new EngineError(`kvRow ${r.kvRow}: must be a distinct row in 0..${opts.maxNumSeqs - 1}`, 'INVALID_ARGUMENT');
      seen.add(r.kvRow);
      if (r.slot < 0 || r.slot >= opts.slots) throw new EngineError(`slot ${r.slot}: must be in 0..${opts.slots - 1}`, 'INVALID_ARGUMENT');
      const vocab = opts.layout.vocabSize;
      if (r.tokens.some((t) => !Number.isInteger(t) || t < 0 || t >= vocab)) throw new EngineError(`row ${r.kvRow}: token ids must be integers in 0..${vocab - 1}`, 'INVALID_ARGUMENT');
      if (r.pastLen < 0 || r.pastLen + seq > opts.maxModelLen) throw new EngineError(`row ${r.kvRow}: ${r.pastLen} cached + ${seq} new tokens exceed maxModelLen ${opts.maxModelLen}`, 'RESOURCE_EXHAUSTED');
    }
    for (const r of prefix?.restore ?? []) this.prefixes.restore(cache, r.kvRow, r.ids, prefix!.blockTokens);
    // Blocks for every new position, and exact zeros after each row's own keys (see KvCache). All or nothing:
    // a step the pool cannot hold changes no row.
    const short = asked.reduce((n, r) => n + cache.shortfall(r.kvRow, r.pastLen + seq), 0);
    if (short > cache.usableBlocks - cache.usedBlocks) throw new KvCacheFull(`KV cache full: the step needs ${short} more blocks of ${KV_BLOCK} positions, ${cache.usableBlocks - cache.usedBlocks} of ${cache.usableBlocks} are free (kvCacheBytes)`);
    for (const r of asked) cache.prepare(r.kvRow, r.pastLen, r.pastLen + seq);
    const batch = rows.length;
    const ids = new BigInt64Array(batch * seq);
    rows.forEach((r, b) => r.tokens.forEach((t, s) => (ids[b * seq + s] = BigInt(t))));
    const i64 = (f: (r: StepRow) => number) => new ort.Tensor('int64', BigInt64Array.from(rows, (r) => BigInt(f(r))), [batch]);
    // The window covers every row's past and new tokens in whole blocks (see ATTENTION_BLOCK).
    const nblocks = Math.ceil(Math.max(...rows.map((r) => r.pastLen + seq)) / KV_BLOCK);
    const feeds: Record<string, ort.Tensor> = {
      input_ids: new ort.Tensor('int64', ids, [batch, seq]),
      past_len: i64((r) => r.pastLen),
      kv_blocks: new ort.Tensor('int64', cache.blockTable(rows.map((r) => r.kvRow), nblocks), [batch, nblocks]),
      // A row whose slot is empty reads slot 0 (zeros either way), so adapter-free steps can use the small zero pool.
      slot: i64((r) => (this.pool.inUse([r.slot]) ? r.slot : 0)),
      // Each row's delta scale: the adapter's own scaling (lora_alpha / r) times the request's adapter_scale.
      lora_scale: new ort.Tensor('float32', Float32Array.from(rows, (r) => this.pool.scale(r.slot) * (r.loraScale ?? 1)), [batch]),
    };
    const withAdapters = this.pool.inUse(rows.map((r) => r.slot));
    for (const m of opts.layout.loraModules) {
      if (withAdapters) {
        feeds[`lora_a.${m.module}`] = new ort.Tensor('float32', this.pool.a.get(m.module)!, [opts.slots, opts.maxLoraRank, m.inFeatures]);
        feeds[`lora_b.${m.module}`] = new ort.Tensor('float32', this.pool.b.get(m.module)!, [opts.slots, m.outFeatures, opts.maxLoraRank]);
      } else {
        // Every row is slot 0: one zero slot of rank 1 gives the same exact zeros at a fraction of the cost.
        feeds[`lora_a.${m.module}`] = new ort.Tensor('float32', this.zeros(m.inFeatures), [1, 1, m.inFeatures]);
        feeds[`lora_b.${m.module}`] = new ort.Tensor('float32', this.zeros(m.outFeatures), [1, m.outFeatures, 1]);
      }
    }
    for (let l = 0; l < cache.numLayers; l++) {
      feeds[`past_key.${l}`] = this.poolTensors[2 * l]!;
      feeds[`past_value.${l}`] = this.poolTensors[2 * l + 1]!;
    }
    const t0 = performance.now();
    const out = await this.session.run(feeds);
    const runMs = performance.now() - t0;
    const newKv = out['new_kv']!.data as Float32Array;
    cache.append(newKv, rows.map((r) => r.kvRow), rows.map((r) => r.pastLen), seq);
    for (const b of prefix?.save ?? []) this.prefixes.save(cache, b.kvRow, b.start, prefix!.blockTokens, b.id);
    const logits = out['logits']!.data as Float32Array;
    return { logits: rows === asked ? logits : logits.subarray(0, opts.layout.vocabSize), runMs, kvBlocksUsed: cache.usedBlocks };
  }

  private readonly zeroBuffers = new Map<number, Float32Array>();

  private zeros(n: number): Float32Array {
    let z = this.zeroBuffers.get(n);
    if (!z) this.zeroBuffers.set(n, (z = new Float32Array(n)));
    return z;
  }

  async release(): Promise<void> {
    await this.session.release();
  }
}
