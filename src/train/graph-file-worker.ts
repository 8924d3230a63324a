import { parentPort, workerData } from 'node:worker_threads';
import { writeOnnxModel } from '../../kernels/onnx.js';
import { loadModelDir } from '../models/load.js';
import { buildTrainingGraph } from '../models/train-graph.js';
import type { GraphFileJob, GraphFileReply } from './graph-file.js';

/** The thread behind writeTrainingGraphFile: build, write, reply, exit (which frees the graph's memory). */
if (!parentPort) throw new Error('the training graph worker must run in a worker thread');
const job = workerData as GraphFileJob;
let reply: GraphFileReply;
try {
  const { spec, weights } = loadModelDir(job.modelDir);
  const { graph } = buildTrainingGraph(spec, weights, job.options);
  reply = { modelPath: writeOnnxModel(graph.toOnnx(), job.dir, 'train').modelPath };
} catch (e) {
  const err = e instanceof Error ? e : new Error(String(e));
  reply = { error: { message: err.message, ...((err as NodeJS.ErrnoException).code ? { code: (err as NodeJS.ErrnoException).code } : {}), ...(err.stack ? { stack: err.stack } : {}) } };
}
parentPort.postMessage(reply);
