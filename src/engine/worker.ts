import { parentPort } from 'node:worker_threads';
import { EngineError, Runtime } from './runtime.js';
import type { EngineReply, EngineRequest, InitResult } from './protocol.js';

/** The engine worker: owns the ORT session, the KV cache and the LoRA pool; handles one request at a time. */
if (!parentPort) throw new Error('engine worker must run in a worker thread');
const port = parentPort;
let runtime: Runtime | null = null;

function need(): Runtime {
  if (!runtime) throw new EngineError('engine is not initialized', 'FAILED_PRECONDITION');
  return runtime;
}

async function handle(req: EngineRequest): Promise<{ result: unknown; transfer?: ArrayBuffer[] }> {
  switch (req.type) {
    case 'init': {
      runtime = await Runtime.create(req.opts);
      const result: InitResult = { kvCacheBytes: runtime.cache.bytes, kvBlocks: runtime.cache.usableBlocks, loraPoolBytes: runtime.pool.bytes, pairsSingleRows: runtime.pairsSingleRows };
      return { result };
    }
    case 'step': {
      const { logits, runMs, kvBlocksUsed } = await need().step(req.rows, req.prefix, req.freeRows);
      // Hand the logits buffer over without a copy when ORT gave it its own buffer.
      const own = logits.byteOffset === 0 && logits.byteLength === logits.buffer.byteLength ? logits : logits.slice();
      return { result: { logits: own, runMs, kvBlocksUsed }, transfer: [own.buffer as ArrayBuffer] };
    }
    case 'setSlot': {
      need().setSlot(req.slot, req.adapter);
      // Hand the staging buffers back for reuse by the next load (shared ones stay where they are).
      const buffers = req.adapter.modules.flatMap((m) => [m.a.buffer, m.b.buffer]).filter((b): b is ArrayBuffer => b instanceof ArrayBuffer);
      return { result: buffers, transfer: buffers };
    }
    case 'clearSlot':
      need().clearSlot(req.slot);
      return { result: null };
    case 'close':
      await runtime?.release();
      runtime = null;
      return { result: null };
  }
}

// Requests are processed strictly in order: a step must see the slots set before it.
let chain = Promise.resolve();
port.on('message', (req: EngineRequest) => {
  chain = chain.then(async () => {
    let reply: EngineReply;
    let transfer: ArrayBuffer[] = [];
    try {
      const r = await handle(req);
      reply = { id: req.id, ok: true, result: r.result };
      transfer = r.transfer ?? [];
    } catch (e) {
      const err = e instanceof Error ? e : new Error(String(e));
      reply = { id: req.id, ok: false, error: { message: err.message, code: e instanceof EngineError ? e.code : 'INTERNAL' } };
    }
    port.postMessage(reply, transfer);
  });
});
