import type { KvCache } from './kv-cache.js';

/**
 * What one engine step does with cached prompt prefixes besides its forward pass (the scheduler decides, see
 * src/scheduler/prefix-index.ts). Blocks are `blockTokens` positions long and named by the scheduler's hash chain.
 */
export interface PrefixOps {
  blockTokens: number;
  /** Before the step: blocks copied, in order, into positions [0, ids.length * blockTokens) of a row. */
  restore?: { kvRow: number; ids: string[] }[];
  /** After the step: positions [start, start + blockTokens) of a row kept as a block. */
  save?: { kvRow: number; start: number; id: string }[];
  /** Blocks the scheduler evicted. */
  drop?: string[];
}

/**
 * Copies of prompt-prefix K/V blocks, owned by the engine worker next to the KV cache. A block is one
 * Float32Array laid out [layer][k|v][position][kvDim] (KvCache.read / write). The store holds no policy: which blocks exist, and when
 * they go, is the scheduler's index (so admission can look up hits without a round trip to the worker).
 */
export class PrefixStore {
  private readonly blocks = new Map<string, Float32Array>();

  get size(): number {
    return this.blocks.size;
  }

  get bytes(): number {
    let n = 0;
    for (const b of this.blocks.values()) n += b.byteLength;
    return n;
  }

  has(id: string): boolean {
    return this.blocks.has(id);
  }

  save(cache: KvCache, kvRow: number, start: number, blockTokens: number, id: string): void {
    if (this.blocks.has(id)) return;
    const block = new Float32Array(cache.numLayers * 2 * blockTokens * cache.kvDim);
    cache.read(kvRow, start, blockTokens, block);
    this.blocks.set(id, block);
  }

  /**
   * Writes the blocks into the row from position 0 (taking cache blocks for them); a missing block is a
   * scheduler bug, so it throws before the row changes.
   */
  restore(cache: KvCache, kvRow: number, ids: readonly string[], blockTokens: number): void {
    const blocks = ids.map((id) => {
      const b = this.blocks.get(id);
      if (!b) throw new Error(`prefix block ${id} is not in the engine's store`);
      return b;
    });
    cache.prepare(kvRow, 0, ids.length * blockTokens);
    blocks.forEach((block, i) => cache.write(kvRow, i * blockTokens, blockTokens, block));
  }

  drop(ids: readonly string[]): void {
    for (const id of ids) this.blocks.delete(id);
  }
}
