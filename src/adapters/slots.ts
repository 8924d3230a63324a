import type { AdapterKey } from '../adapter-key.js';
import type { LoraAdapterWeights } from '../models/lora.js';
import type { PeftAdapter } from './peft.js';
import type { AdapterRecord } from './registry.js';

/**
 * Which loaded adapter sits in which slot of the engine's LoRA pool (slots 1..maxLoras; slot 0 is the base
 * model). A slot changes hands only when its adapter has no running request; among those the least recently
 * used goes first. Requests hold leases: while an adapter has one, its slot is never reassigned.
 */

/** The engine side of a slot: a copy of the weights into the pool, or zeroing it. */
export interface SlotWriter {
  /** Copies the adapter into the slot; its scaling (alpha / r as PEFT defines it) goes with it, once. */
  setSlot(slot: number, adapter: LoraAdapterWeights): Promise<void>;
  clearSlot(slot: number): Promise<void>;
}

/** A request's hold on its adapter's slot. release() is idempotent. */
export interface Lease {
  readonly adapterKey: AdapterKey;
  readonly slot: number;
  release(): void;
}

export class SlotTable {
  /** owner[slot]; index 0 (the base model) is never used. */
  private readonly owner: (AdapterRecord | null)[];
  /** A setSlot / clearSlot is in flight: the slot is nobody's to take until it finishes. */
  private readonly writing: boolean[];
  /** Slots taken from an idle adapter to give to another. */
  evictions = 0;

  constructor(
    readonly maxLoras: number,
    private readonly writer: SlotWriter,
    /** True while an operation on that adapter is in progress (its record must not change under it). */
    private readonly busy: (adapterKey: AdapterKey) => boolean,
  ) {
    this.owner = new Array<AdapterRecord | null>(maxLoras + 1).fill(null);
    this.writing = new Array<boolean>(maxLoras + 1).fill(false);
  }

  /** A free slot, else the LRU slot whose adapter is idle, else null. Changes nothing. */
  private pick(): number | null {
    let best: number | null = null;
    let bestSeq = Infinity;
    for (let s = 1; s <= this.maxLoras; s++) {
      if (this.writing[s]) continue;
      const o = this.owner[s];
      if (!o) return s;
      if (o.activeRequests === 0 && !this.busy(o.adapterKey) && o.useSeq < bestSeq) {
        best = s;
        bestSeq = o.useSeq;
      }
    }
    return best;
  }

  /** Whether assign() could find a slot right now. */
  available(): boolean {
    return this.pick() !== null;
  }

  /**
   * Puts a loaded adapter into a slot (no-op when it has one). False when every slot is held by adapters with
   * running requests: the caller retries later. The slot is claimed synchronously, before the copy is
   * awaited, so concurrent calls never pick the same slot.
   */
  async assign(rec: AdapterRecord): Promise<boolean> {
    if (rec.slot !== null) return true;
    if (!rec.adapter) throw new Error(`adapter ${rec.adapterKey} is not in memory`);
    const slot = this.pick();
    if (slot === null) return false;
    const prev = this.owner[slot];
    if (prev) {
      // Its weights are overwritten by the copy below; it stays loaded and can get a slot again later.
      prev.slot = null;
      prev.state = 'loaded';
      this.evictions++;
    }
    this.owner[slot] = rec;
    this.writing[slot] = true;
    rec.slot = slot;
    try {
      await this.writer.setSlot(slot, rec.adapter);
      rec.state = 'active';
      return true;
    } catch (err) {
      // The pool's contents are unknown now; harmless: setSlot rewrites (or zeroes) every module of a slot.
      this.owner[slot] = null;
      rec.slot = null;
      rec.state = 'loaded';
      throw err;
    } finally {
      this.writing[slot] = false;
    }
  }

  /**
   * Takes an adapter out of its slot and zeroes the slot. The bookkeeping happens synchronously on call (the
   * slot is unavailable until the clear finishes); the returned promise is the engine's clear.
   */
  async vacate(rec: AdapterRecord): Promise<void> {
    const slot = rec.slot;
    if (slot === null) return;
    if (rec.activeRequests > 0) throw new Error(`adapter ${rec.adapterKey} has running requests in slot ${slot}`);
    rec.slot = null;
    if (rec.state === 'active') rec.state = 'loaded';
    this.owner[slot] = null;
    this.writing[slot] = true;
    try {
      await this.writer.clearSlot(slot);
    } finally {
      this.writing[slot] = false;
    }
  }

  /** Pins an active adapter's slot for one request; `onRelease` runs once, when the request lets go. */
  lease(rec: AdapterRecord, onRelease: () => void): Lease {
    if (rec.slot === null || rec.state !== 'active') throw new Error(`adapter ${rec.adapterKey} has no slot`);
    rec.activeRequests++;
    let released = false;
    return {
      adapterKey: rec.adapterKey,
      slot: rec.slot,
      release: () => {
        if (released) return;
        released = true;
        rec.activeRequests--;
        onRelease();
      },
    };
  }

  /** Adapter keys by slot (index 0 is always null), for logs and tests. */
  snapshot(): (AdapterKey | null)[] {
    return this.owner.map((o) => o?.adapterKey ?? null);
  }
}
