import { createHash } from 'node:crypto';
import { ATTENTION_BLOCK } from '../../kernels/ops/nn.js';

/**
 * The scheduler's index of cached prompt-prefix blocks (vLLM's automatic prefix caching). The K/V copies live in
 * the engine worker (src/engine/prefix-cache.ts); this side decides which exist, so admission finds hits without
 * asking the worker.
 *
 * Exactness: a restored block must be bit-identical to what a fresh prefill computes. A prompt is prefilled in
 * `prefillChunk` pieces at fixed positions, and the attention window grows in ATTENTION_BLOCK steps, so a block
 * is lcm(ATTENTION_BLOCK, prefillChunk) tokens: every position in it was computed by the same full chunks with
 * the same windows, whoever computed it. A block's id hashes its parent's id, the adapter identity (key, the
 * slot's load of its weights, the request's scale) and its tokens: a chain, so one id names the whole prefix.
 */
export class PrefixIndex {
  readonly blockTokens: number;
  readonly blockBytes: number;
  /** id -> nothing; Map order is the LRU order (first = least recently used). */
  private readonly blocks = new Map<string, true>();
  queries = 0;
  hits = 0;
  hitTokens = 0;

  constructor(
    prefillChunk: number,
    kvBytesPerToken: number,
    /** Memory budget of the engine's copies; 0 = off. */
    readonly budgetBytes: number,
  ) {
    this.blockTokens = lcm(ATTENTION_BLOCK, prefillChunk);
    this.blockBytes = this.blockTokens * kvBytesPerToken;
  }

  get enabled(): boolean {
    return this.budgetBytes >= this.blockBytes;
  }

  get bytes(): number {
    return this.blocks.size * this.blockBytes;
  }

  /** The chain ids of a prompt's full blocks (the ones a prefill can save). */
  chain(identity: string, promptIds: readonly number[]): string[] {
    const ids: string[] = [];
    let parent = identity;
    for (let end = this.blockTokens; end <= promptIds.length; end += this.blockTokens) {
      const h = createHash('sha256').update(parent).update('\0');
      h.update(new Uint8Array(Int32Array.from(promptIds.slice(end - this.blockTokens, end)).buffer));
      parent = h.digest('base64url');
      ids.push(parent);
    }
    return ids;
  }

  /**
   * The longest cached run of `chain` that still leaves a prompt token to prefill (the step that yields the
   * first logits); counts the query and touches what it returns.
   */
  lookup(chain: readonly string[], promptLength: number): string[] {
    const usable = Math.min(chain.length, Math.floor((promptLength - 1) / this.blockTokens));
    let n = 0;
    while (n < usable && this.blocks.has(chain[n]!)) n++;
    this.queries++;
    if (n > 0) {
      this.hits++;
      this.hitTokens += n * this.blockTokens;
    }
    // Touch from the last block to the first, so a chain's tail is evicted before its head (a tail without its
    // head can never be found).
    for (let i = n - 1; i >= 0; i--) this.touch(chain[i]!);
    return chain.slice(0, n);
  }

  has(id: string): boolean {
    return this.blocks.has(id);
  }

  /**
   * Records block `at` of a chain, which the engine is about to save; returns the ids evicted (least recently
   * used first) to fit it under the budget, or null when it does not fit without evicting its own ancestors
   * (a block is only found through them, so that trade would keep nothing usable).
   */
  add(chain: readonly string[], at: number): string[] | null {
    const id = chain[at]!;
    if (!this.enabled || this.blocks.has(id)) return null;
    const ancestors = new Set(chain.slice(0, at));
    const free = Math.floor(this.budgetBytes / this.blockBytes) - this.blocks.size;
    const evicted: string[] = [];
    for (const old of this.blocks.keys()) {
      if (evicted.length >= 1 - free) break;
      if (!ancestors.has(old)) evicted.push(old);
    }
    if (evicted.length < 1 - free) return null;
    for (const old of evicted) this.blocks.delete(old);
    // The new tail is older than its just-used ancestors, the head newest: tails are evicted first.
    this.blocks.set(id, true);
    for (let i = at - 1; i >= 0; i--) if (this.blocks.has(chain[i]!)) this.touch(chain[i]!);
    return evicted;
  }

  /** Forgets blocks the engine did not save (its step failed). */
  forget(ids: readonly string[]): void {
    for (const id of ids) this.blocks.delete(id);
  }

  private touch(id: string): void {
    this.blocks.delete(id);
    this.blocks.set(id, true);
  }
}

function gcd(a: number, b: number): number {
  return b === 0 ? a : gcd(b, a % b);
}

export function lcm(a: number, b: number): number {
  return (a / gcd(a, b)) * b;
}
