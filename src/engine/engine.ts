import { Worker } from 'node:worker_threads';
import { EngineError, type RuntimeOptions, type StepResult, type StepRow } from './runtime.js';
import type { EngineReply, EngineRequest, InitResult } from './protocol.js';
import { packSlot } from './lora-pool.js';
import type { LoraAdapterWeights } from '../models/lora.js';
import type { PrefixOps } from './prefix-cache.js';

type Pending = { resolve: (v: unknown) => void; reject: (e: Error) => void };
type WithoutId<T> = T extends unknown ? Omit<T, 'id'> : never;

/** Main-thread handle on the engine worker. All tensor work happens in the worker. */
export class Engine {
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private closed = false;

  private constructor(
    private readonly worker: Worker,
    readonly opts: RuntimeOptions,
    readonly info: InitResult,
  ) {}

  static async start(opts: RuntimeOptions): Promise<Engine> {
    const worker = new Worker(new URL('./worker.js', import.meta.url));
    const engine = new Engine(worker, opts, { kvCacheBytes: 0, kvBlocks: 0, loraPoolBytes: 0, pairsSingleRows: false });
    worker.on('message', (reply: EngineReply) => engine.settle(reply));
    worker.on('error', (e) => engine.failAll(e));
    worker.on('exit', (code) => engine.failAll(new EngineError(`engine worker exited with code ${code}`, 'INTERNAL')));
    try {
      const info = (await engine.call({ type: 'init', opts })) as InitResult;
      Object.assign(engine.info, info);
    } catch (e) {
      await worker.terminate();
      throw e;
    }
    return engine;
  }

  get vocabSize(): number {
    return this.opts.layout.vocabSize;
  }

  /** Bytes of K and V one cached token takes over all layers (what a prefix block costs per position). */
  get kvBytesPerToken(): number {
    return 2 * this.opts.layout.numLayers * this.opts.layout.kvDim * Float32Array.BYTES_PER_ELEMENT;
  }

  /** Blocks of KV cache positions that rows can hold at once (see KvCache). */
  get kvBlocks(): number {
    return this.info.kvBlocks;
  }

  /**
   * One forward step, with the prefix blocks it restores and saves, after the rows of ended sequences give their
   * cache blocks back (`freeRows`); returns [rows, vocab] logits of each row's last token.
   */
  async step(rows: StepRow[], prefix?: PrefixOps, freeRows?: number[]): Promise<StepResult> {
    return (await this.call({ type: 'step', rows, ...(prefix ? { prefix } : {}), ...(freeRows?.length ? { freeRows } : {}) })) as StepResult;
  }

  /**
   * Which load of its adapter a slot holds: a new number on every setSlot, so K/V computed with an adapter's
   * earlier weights (replaced, or unloaded and loaded again) is never taken for the current ones.
   */
  slotLoadId(slot: number): number {
    return this.slotLoads.get(slot) ?? 0;
  }

  private readonly slotLoads = new Map<number, number>();
  private loadCount = 0;

  /**
   * Tensors in SharedArrayBuffers (adapters read by the task pool) go to the worker as they are: it copies them
   * into the slot, and this thread copies nothing. Others are packed here into recycled staging buffers, which
   * are transferred, not cloned, and come back for the next load.
   */
  async setSlot(slot: number, adapter: LoraAdapterWeights): Promise<void> {
    this.slotLoads.set(slot, ++this.loadCount);
    if (adapter.modules.every((m) => m.a.buffer instanceof SharedArrayBuffer && m.b.buffer instanceof SharedArrayBuffer)) {
      const plain: LoraAdapterWeights = { scaling: adapter.scaling, modules: adapter.modules.map((m) => ({ module: m.module, r: m.r, a: m.a, b: m.b })) };
      await this.call({ type: 'setSlot', slot, adapter: plain });
      return;
    }
    const packed = packSlot(adapter, (n) => this.takeStaging(n));
    const transfer = packed.modules.flatMap((m) => [m.a.buffer as ArrayBuffer, m.b.buffer as ArrayBuffer]);
    const returned = (await this.call({ type: 'setSlot', slot, adapter: packed }, transfer)) as ArrayBuffer[];
    for (const b of returned) {
      const list = this.staging.get(b.byteLength) ?? [];
      if (list.length < 1024) list.push(b); // in practice one adapter's worth: buffers cycle through loads
      this.staging.set(b.byteLength, list);
    }
  }

  /** Staging buffers for setSlot, by byte length, recycled from the worker (already faulted in). */
  private readonly staging = new Map<number, ArrayBuffer[]>();

  private takeStaging(n: number): Float32Array {
    const b = this.staging.get(n * 4)?.pop();
    return b ? new Float32Array(b) : new Float32Array(n);
  }

  async clearSlot(slot: number): Promise<void> {
    this.slotLoads.set(slot, ++this.loadCount);
    await this.call({ type: 'clearSlot', slot });
  }

  async close(): Promise<void> {
    if (this.closed) return;
    await this.call({ type: 'close' }).catch(() => undefined);
    this.closed = true;
    await this.worker.terminate();
  }

  private call(req: WithoutId<EngineRequest>, transfer: ArrayBuffer[] = []): Promise<unknown> {
    if (this.closed) return Promise.reject(new EngineError('engine is closed', 'FAILED_PRECONDITION'));
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.worker.postMessage({ ...req, id }, transfer);
    });
  }

  private settle(reply: EngineReply): void {
    const p = this.pending.get(reply.id);
    if (!p) return;
    this.pending.delete(reply.id);
    if (reply.ok) p.resolve(reply.result);
    else p.reject(new EngineError(reply.error.message, reply.error.code as EngineError['code']));
  }

  private failAll(e: Error): void {
    for (const p of this.pending.values()) p.reject(e);
    this.pending.clear();
    this.closed = true;
  }
}
