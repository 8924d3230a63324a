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

/** One module of an adapter in the pool's layout: rank-major A [r, in] and B^T [r, out] with the scale folded in. */
export interface PackedModule {
  module: string;
  r: number;
  a: Float32Array;
  bT: Float32Array;
}

/**
 * Converts PEFT-layout weights to the pool's layout. Runs on the caller's thread (the main thread), so the
 * engine worker only copies contiguous planes and the buffers can be transferred to it without a copy.
 */
export function packSlot(weights: SlotModuleWeights[]): PackedModule[] {
  return weights.map((w) => {
    const outF = w.b.length / w.r;
    const bT = new Float32Array(w.b.length);
    for (let o = 0; o < outF; o++) {
      const row = o * w.r;
      for (let j = 0; j < w.r; j++) bT[j * outF + o] = w.b[row + j]! * w.scale;
    }
    return { module: w.module, r: w.r, a: w.a.slice(), bT };
  });
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
    this.loadPacked(slot, packSlot(weights));
  }

  /** Writes packed weights into a slot: plane copies only; unused planes and modules are zeroed. */
  loadPacked(slot: number, modules: PackedModule[]): void {
    if (!Number.isInteger(slot) || slot < 1 || slot >= this.slots) throw new RangeError(`slot ${slot}: must be in 1..${this.slots - 1}`);
    const byModule = new Map<string, PackedModule>();
    for (const w of modules) {
      const m = this.info.get(w.module);
      if (!m) throw new RangeError(`module ${w.module} has no LoRA path in the serving graph`);
      if (byModule.has(w.module)) throw new RangeError(`module ${w.module} given twice for slot ${slot}`);
      if (w.r > this.maxRank) throw new RangeError(`rank ${w.r} of ${w.module}: exceeds maxLoraRank ${this.maxRank}`);
      if (w.a.length !== w.r * m.inFeatures || w.bT.length !== m.outFeatures * w.r) {
        throw new RangeError(`${w.module}: A/B sizes do not match rank ${w.r} and shape [${m.outFeatures}, ${m.inFeatures}]`);
      }
      byModule.set(w.module, w);
    }
    let rank = 0;
    for (const [module, m] of this.info) {
      const w = byModule.get(module);
      const r = w?.r ?? 0;
      const a = this.a.get(module)!;
      const b = this.b.get(module)!;
      for (let j = 0; j < this.maxRank; j++) {
        const aAt = (j * this.slots + slot) * m.inFeatures;
        const bAt = (j * this.slots + slot) * m.outFeatures;
        if (j < r) {
          a.set(w!.a.subarray(j * m.inFeatures, (j + 1) * m.inFeatures), aAt);
          b.set(w!.bT.subarray(j * m.outFeatures, (j + 1) * m.outFeatures), bAt);
        } else {
          a.fill(0, aAt, aAt + m.inFeatures);
          b.fill(0, bAt, bAt + m.outFeatures);
        }
      }
      rank = Math.max(rank, r);
    }
    this.ranks[slot] = rank;
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
