import type { LoraModuleInfo } from '../models/graph.js';
import type { LoraAdapterWeights } from '../models/lora.js';

/**
 * Copies the tensors (the caller keeps its own) so they can be transferred to the worker without a clone.
 * `take(n)` supplies recycled buffers of n floats, so repeated loads do not fault in fresh pages.
 */
export function packSlot(adapter: LoraAdapterWeights, take: (n: number) => Float32Array = (n) => new Float32Array(n)): LoraAdapterWeights {
  const copy = (t: Float32Array) => {
    const out = take(t.length);
    out.set(t);
    return out;
  };
  return { scaling: adapter.scaling, modules: adapter.modules.map((w) => ({ module: w.module, r: w.r, a: copy(w.a), b: copy(w.b) })) };
}

/**
 * Pooled adapter tensors, fed to steps that use adapters: per module A [slots, maxRank, in] and
 * B [slots, out, maxRank], each slot in PEFT's own layout (zero-padded to maxRank), so loading an adapter is
 * a plain copy into its slot; the graph multiplies by A^T / B^T through transposes that onnxruntime fuses into
 * the matmuls. The adapter's scaling is not folded in: it travels per row with the request's adapter_scale.
 * Slot 0 stays zero (the base model). Steps where no row uses an adapter are fed tiny zero tensors instead
 * (rank 1, one slot), so the base model pays almost nothing for the LoRA path.
 */
export class LoraPool {
  readonly a = new Map<string, Float32Array>();
  readonly b = new Map<string, Float32Array>();
  private readonly info = new Map<string, LoraModuleInfo>();
  /** Rank and scaling of the adapter in each slot (0 = empty). */
  private readonly ranks: number[];
  private readonly scales: number[];

  constructor(
    modules: LoraModuleInfo[],
    readonly slots: number,
    readonly maxRank: number,
  ) {
    this.ranks = new Array<number>(slots).fill(0);
    this.scales = new Array<number>(slots).fill(0);
    for (const m of modules) {
      this.info.set(m.module, m);
      this.a.set(m.module, new Float32Array(slots * maxRank * m.inFeatures));
      this.b.set(m.module, new Float32Array(slots * m.outFeatures * maxRank));
    }
    // Touch every page now: a cold adapter load should pay for a copy, not for the kernel's page faults.
    for (const t of [...this.a.values(), ...this.b.values()]) t.fill(0);
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

  /** Copies an adapter into a slot (1..slots-1); modules it does not name are zeroed. */
  load(slot: number, adapter: LoraAdapterWeights): void {
    if (!Number.isInteger(slot) || slot < 1 || slot >= this.slots) throw new RangeError(`slot ${slot}: must be in 1..${this.slots - 1}`);
    const byModule = new Map<string, LoraAdapterWeights['modules'][number]>();
    for (const w of adapter.modules) {
      const m = this.info.get(w.module);
      if (!m) throw new RangeError(`module ${w.module} has no LoRA path in the serving graph`);
      if (byModule.has(w.module)) throw new RangeError(`module ${w.module} given twice for slot ${slot}`);
      if (w.r > this.maxRank) throw new RangeError(`rank ${w.r} of ${w.module}: exceeds maxLoraRank ${this.maxRank}`);
      if (w.a.length !== w.r * m.inFeatures || w.b.length !== m.outFeatures * w.r) {
        throw new RangeError(`${w.module}: A/B sizes do not match rank ${w.r} and shape [${m.outFeatures}, ${m.inFeatures}]`);
      }
      byModule.set(w.module, w);
    }
    const R = this.maxRank;
    let rank = 0;
    for (const [module, m] of this.info) {
      const w = byModule.get(module);
      const a = this.a.get(module)!;
      const b = this.b.get(module)!;
      const aAt = slot * R * m.inFeatures;
      const bAt = slot * m.outFeatures * R;
      if (!w) {
        a.fill(0, aAt, aAt + R * m.inFeatures);
        b.fill(0, bAt, bAt + m.outFeatures * R);
        continue;
      }
      // A [r, in] is the first r rows of the slot's [R, in]; B [out, r] pads each row to R.
      a.set(w.a, aAt);
      a.fill(0, aAt + w.r * m.inFeatures, aAt + R * m.inFeatures);
      if (w.r === R) b.set(w.b, bAt);
      else {
        b.fill(0, bAt, bAt + m.outFeatures * R);
        for (let o = 0; o < m.outFeatures; o++) b.set(w.b.subarray(o * w.r, (o + 1) * w.r), bAt + o * R);
      }
      rank = Math.max(rank, w.r);
    }
    this.ranks[slot] = rank;
    this.scales[slot] = adapter.scaling;
  }

  clear(slot: number): void {
    const R = this.maxRank;
    for (const [module, m] of this.info) {
      this.a.get(module)!.fill(0, slot * R * m.inFeatures, (slot + 1) * R * m.inFeatures);
      this.b.get(module)!.fill(0, slot * m.outFeatures * R, (slot + 1) * m.outFeatures * R);
    }
    this.ranks[slot] = 0;
    this.scales[slot] = 0;
  }

  /** True when any of these slots holds an adapter (the step needs the real pool). */
  inUse(slots: Iterable<number>): boolean {
    for (const s of slots) if ((this.ranks[s] ?? 0) > 0) return true;
    return false;
  }

  /** The adapter's own scaling (lora_alpha / r) of a slot; 0 for an empty slot. */
  scale(slot: number): number {
    return this.scales[slot] ?? 0;
  }
}
