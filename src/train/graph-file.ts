import { fork } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import type { TrainGraphOptions } from '../models/train-graph.js';
import type { BaseSource } from './served-base.js';

/**
 * Builds the training graph and writes it to `dir` (train.onnx + external data) in a child process, returning
 * the model's path. With a served graph (the server's cache entry) the frozen weights are that graph's bytes (see
 * served-base.ts); without one, or when it was quantized otherwise, the child quantizes the model itself and holds
 * every quantized weight in JS memory (about 0.9 GB on a 1.1B model): a process of its own gives all of it back to
 * the system when it exits (a worker thread's freed memory partly stays in this process's malloc arenas).
 */
export interface GraphFileJob {
  modelDir: string;
  options: TrainGraphOptions;
  dir: string;
  /** The serving graph (a cache entry's model.onnx) whose quantized weights the training graph refers to. */
  servedModelPath?: string;
}

export interface GraphFile {
  modelPath: string;
  /** Where the frozen weights came from: the served graph's file (linked or copied), or quantized here. */
  base: BaseSource;
  /** The child's peak resident memory, in bytes. */
  peakRssBytes: number;
}

/** What graph-file-worker.ts sends: the file, or the error with its errno code (disk full stays recognizable). */
export type GraphFileReply = GraphFile | { error: { message: string; code?: string; stack?: string } };

export function writeTrainingGraphFile(job: GraphFileJob): Promise<GraphFile> {
  return new Promise((resolve, reject) => {
    // No inherited execArgv: a parent run under `node --test` (or with inspector flags) must not pass them on.
    const child = fork(fileURLToPath(new URL('./graph-file-worker.js', import.meta.url)), [], { execArgv: [], serialization: 'advanced', stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    let reply: GraphFileReply | null = null;
    child.on('message', (m) => (reply = m as GraphFileReply));
    child.on('error', reject);
    child.on('exit', (code, signal) => {
      const r = reply as GraphFileReply | null;
      if (r && 'modelPath' in r) return resolve(r);
      if (r) return reject(Object.assign(new Error(r.error.message), { code: r.error.code, stack: r.error.stack }));
      reject(new Error(`the training graph's process exited with ${signal ?? `code ${code}`} without a reply`));
    });
    child.send(job);
  });
}
