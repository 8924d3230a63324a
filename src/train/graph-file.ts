import { Worker } from 'node:worker_threads';
import type { TrainGraphOptions } from '../models/train-graph.js';

/**
 * Builds the training graph and writes it to `dir` (train.onnx + external data) in a worker thread of its own,
 * returning the model's path. The graph holds every quantized weight in JS memory (about 0.9 GB on a 1.1B model);
 * the thread's exit frees it at once, before onnxruntime loads its own copy, where a collection in this thread
 * might come only after the training's peak.
 */
export interface GraphFileJob {
  modelDir: string;
  options: TrainGraphOptions;
  dir: string;
}

/** What graph-file-worker.ts posts: the path, or the error with its errno code (disk full stays recognizable). */
export type GraphFileReply = { modelPath: string } | { error: { message: string; code?: string; stack?: string } };

export function writeTrainingGraphFile(job: GraphFileJob): Promise<string> {
  return new Promise((resolve, reject) => {
    const worker = new Worker(new URL('./graph-file-worker.js', import.meta.url), { workerData: job });
    let reply: GraphFileReply | null = null;
    worker.on('message', (m: GraphFileReply) => (reply = m));
    worker.on('error', reject);
    worker.on('exit', (code) => {
      if (reply && 'modelPath' in reply) return resolve(reply.modelPath);
      if (reply) return reject(Object.assign(new Error(reply.error.message), { code: reply.error.code, stack: reply.error.stack }));
      reject(new Error(`the training graph's worker exited with code ${code} without a reply`));
    });
  });
}
