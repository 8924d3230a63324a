/**
 * A single-consumer async queue: producers push synchronously, one consumer awaits items (generation streams,
 * training-job watchers). A dependency-free leaf, so any layer may use it.
 */
export interface AsyncQueueOptions<T> {
  /**
   * Items kept for a consumer that does not read; past it the oldest item `droppable` accepts (else the
   * oldest) makes room. Unbounded without it.
   */
  maxPending?: number;
  droppable?: (item: T) => boolean;
}

export class AsyncQueue<T> implements AsyncIterable<T> {
  private readonly items: T[] = [];
  private waiter: (() => void) | null = null;
  private ended = false;
  private error: Error | null = null;

  constructor(private readonly opts: AsyncQueueOptions<T> = {}) {}

  /** Ignored once the queue has ended. */
  push(item: T): void {
    if (this.ended) return;
    const { maxPending, droppable } = this.opts;
    if (maxPending !== undefined && this.items.length >= maxPending) {
      const i = droppable ? this.items.findIndex(droppable) : -1;
      this.items.splice(i >= 0 ? i : 0, 1);
    }
    this.items.push(item);
    this.wake();
  }

  /** No more items; the consumer reads what is queued, then sees the end (or `error`, thrown). */
  end(error?: Error): void {
    if (this.ended) return;
    this.ended = true;
    this.error = error ?? null;
    this.wake();
  }

  /** The next item, or done once ended; `signal` aborts the wait (throwing its reason). */
  async next(signal?: AbortSignal): Promise<IteratorResult<T, undefined>> {
    for (;;) {
      signal?.throwIfAborted();
      if (this.items.length) return { done: false, value: this.items.shift()! };
      if (this.ended) {
        if (this.error) throw this.error;
        return { done: true, value: undefined };
      }
      await new Promise<void>((resolve) => {
        const done = () => {
          this.waiter = null;
          signal?.removeEventListener('abort', done);
          resolve();
        };
        this.waiter = done;
        signal?.addEventListener('abort', done, { once: true });
      });
    }
  }

  async *[Symbol.asyncIterator](): AsyncIterator<T> {
    for (;;) {
      const r = await this.next();
      if (r.done) return;
      yield r.value;
    }
  }

  private wake(): void {
    const w = this.waiter;
    this.waiter = null;
    w?.();
  }
}
