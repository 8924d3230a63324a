import { writeOnnxModel } from '../../kernels/onnx.js';
import { loadModelDir } from '../models/load.js';
import { buildTrainingGraph } from '../models/train-graph.js';
import type { GraphFileJob, GraphFileReply } from './graph-file.js';

/** The process behind writeTrainingGraphFile: one job in, build, write, reply, exit (freeing the graph's memory). */
if (!process.send) throw new Error('the training graph process must be started with an IPC channel (graph-file.ts)');
process.once('message', (m) => {
  const job = m as GraphFileJob;
  let reply: GraphFileReply;
  try {
    const { spec, weights } = loadModelDir(job.modelDir);
    const { graph } = buildTrainingGraph(spec, weights, job.options);
    const { modelPath } = writeOnnxModel(graph.toOnnx(), job.dir, 'train');
    reply = { modelPath, peakRssBytes: process.resourceUsage().maxRSS * 1024 };
  } catch (e) {
    const err = e instanceof Error ? e : new Error(String(e));
    const code = (err as NodeJS.ErrnoException).code;
    reply = { error: { message: err.message, ...(code ? { code } : {}), ...(err.stack ? { stack: err.stack } : {}) } };
  }
  process.send!(reply, () => process.disconnect());
});
