import type { AdapterKey } from '../adapter-key.js';
import type { AdapterLease, AdapterLeaser } from './types.js';

/**
 * Makes adapters ready in the background (LoRAX's loader: the batch only admits ready adapters). take() never
 * waits: it hands out a lease a background load left, or one at once when the adapter sits in a slot, or starts
 * the load and returns null. When a load settles `wake` runs: with a lease kept for the next take(), with nothing
 * (no slot free yet; the next turn tries again), or after `failed`, which ends the requests waiting for it.
 */
export class AdapterReadiness {
  /** Adapters being made ready (tryAcquire in flight). */
  private readonly preparing = new Set<AdapterKey>();
  /** Leases a background tryAcquire got, kept for the next request of that adapter. */
  private readonly prepared = new Map<AdapterKey, AdapterLease>();
  private closed = false;

  constructor(
    private readonly leaser: AdapterLeaser,
    private readonly wake: () => void,
    private readonly failed: (key: AdapterKey, err: unknown) => void,
  ) {}

  /** Loads in flight: something will wake the loop. */
  get busy(): boolean {
    return this.preparing.size > 0;
  }

  /** A lease now, or null (a load is under way); throws when the adapter is known to be unusable. */
  take(key: AdapterKey): AdapterLease | null {
    const held = this.prepared.get(key);
    if (held) {
      this.prepared.delete(key);
      return held;
    }
    const now = this.leaser.leaseReady?.(key) ?? null;
    if (now) return now;
    this.prepare(key);
    return null;
  }

  /** Prepared leases nobody waits for any more (their requests were cancelled) go back; all of them once closed. */
  releaseUnwanted(wanted: (key: AdapterKey) => boolean): void {
    for (const [key, lease] of this.prepared) {
      if (this.closed || !wanted(key)) {
        this.prepared.delete(key);
        lease.release();
      }
    }
  }

  close(): void {
    this.closed = true;
    this.releaseUnwanted(() => false);
  }

  private prepare(key: AdapterKey): void {
    if (this.preparing.has(key)) return;
    this.preparing.add(key);
    this.leaser.tryAcquire(key).then(
      (lease) => {
        this.preparing.delete(key);
        if (lease && this.closed) lease.release();
        else if (lease) this.prepared.set(key, lease);
        // No slot yet: retry after a timer, not at once. A refusal settles without I/O, and retrying in
        // microtasks would starve the engine's replies that free the slot.
        if (lease) this.wake();
        else setTimeout(() => this.wake(), 1);
      },
      (err: unknown) => {
        this.preparing.delete(key);
        this.failed(key, err);
        this.wake();
      },
    );
  }
}
