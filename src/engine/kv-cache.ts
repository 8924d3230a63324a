import { ATTENTION_BLOCK } from '../../kernels/ops/nn.js';

/** Positions per cache block: the attention's block, so a window is always whole blocks. */
export const KV_BLOCK = ATTENTION_BLOCK;

/** Thrown when a step needs more blocks than the pool has free (the scheduler's reservation makes this a bug). */
export class KvCacheFull extends Error {}

/**
 * The KV cache as a pool of fixed blocks (vLLM's paged attention), owned by JS in the engine worker. Per layer,
 * K and V are each one Float32Array [numBlocks, KV_BLOCK, kvDim], fed to the graph whole (no copy) together
 * with each row's block table; the graph returns only the new keys/values, which `append` writes in place.
 *
 * Memory on demand: the pool is allocated zeroed and untouched, so the kernel commits a page only when a block
 * on it is first written; blocks are handed out as a row grows and come back when it ends. Freed blocks are
 * handed out again first (a LIFO stack), so the resident set stays at the high-water mark of blocks in use.
 *
 * Block 0 is never handed out: it stays all zeros and pads the tables of rows shorter than the step's window.
 *
 * Exactness: the attention window reaches past a row's own keys (whole blocks), where the graph masks
 * additively. Masking cannot hide a stale NaN or Inf (NaN + -inf is NaN, 0 * Inf is NaN), so every position a
 * row has not written in this life must hold exact zeros when a step reads it: `prepare` clears what a block's
 * previous owner (or a longer past of the same row) left, and `written` says how far each block was ever
 * written, so the clear costs only what was left behind.
 */
export class KvCache {
  readonly keys: Float32Array[] = [];
  readonly values: Float32Array[] = [];
  /** Per block: positions [0, written) may hold data; everything after is zero. */
  private readonly written: Uint8Array;
  /** Free blocks; the top (end) is handed out next. */
  private readonly free: number[] = [];
  /** Per row: its blocks, in position order. */
  private readonly tables: number[][];

  constructor(
    readonly numLayers: number,
    readonly rows: number,
    /** Including the zero block 0. */
    readonly numBlocks: number,
    readonly kvDim: number,
  ) {
    if (numBlocks < 2) throw new RangeError(`a KV cache needs at least 2 blocks (the zero block and one to use), got ${numBlocks}`);
    this.written = new Uint8Array(numBlocks);
    this.tables = Array.from({ length: rows }, () => []);
    // Lowest first: a fresh pool fills from its start.
    for (let b = numBlocks - 1; b >= 1; b--) this.free.push(b);
    const perLayer = numBlocks * KV_BLOCK * kvDim;
    for (let l = 0; l < numLayers; l++) {
      this.keys.push(new Float32Array(perLayer));
      this.values.push(new Float32Array(perLayer));
    }
  }

  /** Bytes of K and V one block holds over all layers. */
  static blockBytes(numLayers: number, kvDim: number): number {
    return 2 * numLayers * KV_BLOCK * kvDim * Float32Array.BYTES_PER_ELEMENT;
  }

  /** Blocks the cache can hand out (the zero block excluded). */
  get usableBlocks(): number {
    return this.numBlocks - 1;
  }

  get usedBlocks(): number {
    return this.numBlocks - 1 - this.free.length;
  }

  /** Address space of the pool; only blocks ever used are resident. */
  get bytes(): number {
    return this.numBlocks * KvCache.blockBytes(this.numLayers, this.kvDim);
  }

  /** Blocks a row holds now. */
  blocksOf(row: number): readonly number[] {
    return this.tables[row]!;
  }

  /**
   * Readies a row for a step that reads positions [0, end) and keeps [0, pastLen): blocks past `end` go back
   * to the pool, what the kept blocks hold from pastLen on is zeroed, and new (zeroed) blocks cover the rest.
   */
  prepare(row: number, pastLen: number, end: number): void {
    const table = this.tables[row]!;
    const need = Math.ceil(end / KV_BLOCK);
    while (table.length > need) this.free.push(table.pop()!);
    for (let i = Math.floor(pastLen / KV_BLOCK); i < table.length; i++) this.clear(table[i]!, Math.max(0, pastLen - i * KV_BLOCK));
    if (need - table.length > this.free.length) {
      throw new KvCacheFull(`KV cache full: row ${row} needs ${need - table.length} more blocks of ${KV_BLOCK} positions, ${this.free.length} of ${this.usableBlocks} are free (kvCacheBytes)`);
    }
    while (table.length < need) {
      const b = this.free.pop()!;
      this.clear(b, 0);
      table.push(b);
    }
  }

  /** Blocks `prepare(row, ·, end)` would take from the pool (before any it would give back). */
  shortfall(row: number, end: number): number {
    return Math.max(0, Math.ceil(end / KV_BLOCK) - this.tables[row]!.length);
  }

  /** The row's blocks go back to the pool (its sequence ended). */
  freeRow(row: number): void {
    const table = this.tables[row]!;
    while (table.length) this.free.push(table.pop()!);
  }

  /** Block tables of a step's rows, [batch, nblocks], padded with the zero block. */
  blockTable(kvRows: readonly number[], nblocks: number): BigInt64Array {
    const out = new BigInt64Array(kvRows.length * nblocks);
    kvRows.forEach((row, b) => this.tables[row]!.forEach((block, i) => i < nblocks && (out[b * nblocks + i] = BigInt(block))));
    return out;
  }

  /** Zeroes positions [from, written) of a block in every layer. */
  private clear(block: number, from: number): void {
    const end = this.written[block]!;
    if (from >= end) return;
    const { kvDim } = this;
    const a = (block * KV_BLOCK + from) * kvDim;
    const z = (block * KV_BLOCK + end) * kvDim;
    for (let l = 0; l < this.numLayers; l++) {
      this.keys[l]!.fill(0, a, z);
      this.values[l]!.fill(0, a, z);
    }
    this.written[block] = from;
  }

  /**
   * Calls `run(layer, data, at, position, count)` for positions [start, start + len) of a row, split into runs
   * that are contiguous in the pool (one per block); `data` is keys or values, `at` the pool offset of `position`.
   */
  private eachRun(row: number, start: number, len: number, layer: number, kind: 0 | 1, run: (data: Float32Array, at: number, position: number, count: number) => void): void {
    const table = this.tables[row]!;
    const data = kind === 0 ? this.keys[layer]! : this.values[layer]!;
    for (let p = start; p < start + len; ) {
      const block = table[Math.floor(p / KV_BLOCK)]!;
      const inBlock = p % KV_BLOCK;
      const count = Math.min(KV_BLOCK - inBlock, start + len - p);
      run(data, (block * KV_BLOCK + inBlock) * this.kvDim, p, count);
      p += count;
    }
  }

  private markWritten(row: number, start: number, len: number): void {
    const table = this.tables[row]!;
    for (let p = start; p < start + len; ) {
      const i = Math.floor(p / KV_BLOCK);
      const until = Math.min((i + 1) * KV_BLOCK, start + len);
      const block = table[i]!;
      this.written[block] = Math.max(this.written[block]!, until - i * KV_BLOCK);
      p = until;
    }
  }

  /**
   * Appends the step's new keys/values. newKv is [2*layers, batch, seq, kvDim] (k then v for each layer);
   * batch row b goes to cache row kvRows[b] at positions pastLens[b] .. pastLens[b]+seq-1 (prepared blocks).
   */
  append(newKv: Float32Array, kvRows: readonly number[], pastLens: readonly number[], seq: number): void {
    const { kvDim } = this;
    const batch = kvRows.length;
    const perLayer = batch * seq * kvDim;
    for (let l = 0; l < this.numLayers; l++) {
      for (const kind of [0, 1] as const) {
        const src = (2 * l + kind) * perLayer;
        kvRows.forEach((row, b) => {
          const past = pastLens[b]!;
          this.eachRun(row, past, seq, l, kind, (data, at, p, count) => {
            const from = src + (b * seq + p - past) * kvDim;
            data.set(newKv.subarray(from, from + count * kvDim), at);
          });
        });
      }
    }
    kvRows.forEach((row, b) => this.markWritten(row, pastLens[b]!, seq));
  }

  /** Copies positions [start, start + len) of a row into dst, laid out [layer][k|v][position][kvDim]. */
  read(row: number, start: number, len: number, dst: Float32Array): void {
    this.copy(row, start, len, dst, 'out');
  }

  /** Writes positions [start, start + len) of a row (blocks already prepared) from src, laid out as `read` gives. */
  write(row: number, start: number, len: number, src: Float32Array): void {
    this.copy(row, start, len, src, 'in');
    this.markWritten(row, start, len);
  }

  private copy(row: number, start: number, len: number, buf: Float32Array, dir: 'in' | 'out'): void {
    const { kvDim } = this;
    for (let l = 0; l < this.numLayers; l++) {
      for (const kind of [0, 1] as const) {
        const base = (2 * l + kind) * len * kvDim;
        this.eachRun(row, start, len, l, kind, (data, at, p, count) => {
          const off = base + (p - start) * kvDim;
          if (dir === 'out') buf.set(data.subarray(at, at + count * kvDim), off);
          else data.set(buf.subarray(off, off + count * kvDim), at);
        });
      }
    }
  }
}
