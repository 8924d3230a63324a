import { parentPort } from 'node:worker_threads';
import { replyError, type TaskReply, type TaskRequest } from './pool.js';
import { tasks } from './tasks.js';

/** A pool worker: runs one named task at a time (the pool sends the next only after the reply). */
if (!parentPort) throw new Error('the task worker must run in a worker thread');
const port = parentPort;
const registry: Record<string, (input: unknown) => unknown> = tasks as unknown as Record<string, (input: unknown) => unknown>;

port.on('message', async (req: TaskRequest) => {
  let reply: TaskReply;
  try {
    const fn = Object.hasOwn(registry, req.task) ? registry[req.task] : undefined;
    if (!fn) throw new Error(`unknown task ${req.task}`);
    reply = { id: req.id, ok: true, result: await fn(req.input) };
  } catch (err) {
    reply = replyError(req.id, err);
  }
  try {
    port.postMessage(reply);
  } catch (err) {
    // A result that cannot be cloned: the task fails, it never leaves the pool waiting.
    port.postMessage(replyError(req.id, err));
  }
});
