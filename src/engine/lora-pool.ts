import type { LoraModuleInfo } from '../models/graph.js';

/** One adapter's weights for one module, in PEFT layout. */
export interface SlotModuleWeights {
  module: string;
  /** [r, in] */
  a: Float32Array;
  /** [out, r] */
  b: Float32Array;
  r: number;
  /** lora_alpha / r (or / sqrt(r) with rsLoRA) times the request's adapter weight. */
  scale: number;
}

/**
 * Pooled adapter tensors, fed to every step as graph inputs: per module A [maxRank, slots, in] and
 * B [maxRank, slots, out] with the scale folded into B; ranks below maxRank are zero-padded. Rank-major, so a
 * batch without adapters feeds only the first plane as one contiguous view and pays for rank 1, not maxRank. Slot 0 stays zero (the base model). Loading an
 * adapter into a slot is a copy into that slot's rows; nothing is reallocated.
 */
export class LoraPool {
  readonly a = new Map<string, Float32Array>();
  readonly b = new Map<string, Float32Array>();
  private readonly info = new Map<string, LoraModuleInfo>();
  /** Rank of the adapter in each slot (0 = empty). */
  private readonly ranks: number[];

  constructor(
    modules: LoraModuleInfo[],
    readonly slots: number,
    readonly maxRank: number,
  ) {
    this.ranks = new Array<number>(slots).fill(0);
    for (const m of modules) {
      this.info.set(m.module, m);
      this.a.set(m.module, new Float32Array(slots * m.inFeatures * maxRank));
      this.b.set(m.module, new Float32Array(slots * maxRank * m.outFeatures));
    }
  }

  get modules(): LoraModuleInfo[] {
    return [...this.info.values()];
  }

  get bytes(): number {
    let n = 0;
    for (const t of this.a.values()) n += t.byteLength;
    for (const t of this.b.values()) n += t.byteLength;
    return n;
  }

  /** Writes an adapter into a slot (1..slots-1); modules it does not name are zeroed. */
  load(slot: number, weights: SlotModuleWeights[]): void {
    if (!Number.isInteger(slot) || slot < 1 || slot >= this.slots) throw new RangeError(`slot ${slot}: must be in 1..${this.slots - 1}`);
    this.clear(slot);
    const seen = new Set<string>();
    for (const w of weights) {
      if (seen.has(w.module)) throw new RangeError(`module ${w.module} given twice for slot ${slot}`);
      seen.add(w.module);
      const m = this.info.get(w.module);
      if (!m) throw new RangeError(`module ${w.module} has no LoRA path in the serving graph`);
      if (w.r > this.maxRank) throw new RangeError(`rank ${w.r} of ${w.module}: exceeds maxLoraRank ${this.maxRank}`);
      if (w.a.length !== w.r * m.inFeatures || w.b.length !== m.outFeatures * w.r) {
        throw new RangeError(`${w.module}: A/B sizes do not match rank ${w.r} and shape [${m.outFeatures}, ${m.inFeatures}]`);
      }
      const { inFeatures: inF, outFeatures: outF } = m;
      const poolA = this.a.get(w.module)!;
      const poolB = this.b.get(w.module)!;
      for (let j = 0; j < w.r; j++) {
        poolA.set(w.a.subarray(j * inF, (j + 1) * inF), (j * this.slots + slot) * inF);
        const bBase = (j * this.slots + slot) * outF;
        for (let o = 0; o < outF; o++) poolB[bBase + o] = w.b[o * w.r + j]! * w.scale;
      }
      this.ranks[slot] = Math.max(this.ranks[slot]!, w.r);
    }
  }

  /**
   * The rank planes a step feeds: 1 when no row uses an adapter (slot 0 rows get exact zeros either way), else
   * maxRank. Never the largest rank in the step: the inner dim of the LoRA matmuls would then depend on which
   * other requests share the batch, and a different summation length changes float rounding, so a request
   * would not give the same tokens alone and in a mixed batch.
   */
  stepRank(slots: Iterable<number>): number {
    for (const s of slots) if ((this.ranks[s] ?? 0) > 0) return this.maxRank;
    return 1;
  }

  clear(slot: number): void {
    for (const [module, m] of this.info) {
      const a = this.a.get(module)!;
      const b = this.b.get(module)!;
      for (let j = 0; j < this.maxRank; j++) {
        a.fill(0, (j * this.slots + slot) * m.inFeatures, (j * this.slots + slot + 1) * m.inFeatures);
        b.fill(0, (j * this.slots + slot) * m.outFeatures, (j * this.slots + slot + 1) * m.outFeatures);
      }
    }
    this.ranks[slot] = 0;
  }
}
