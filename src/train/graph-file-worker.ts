import { mkdirSync } from 'node:fs';
import { writeOnnxModel } from '../../kernels/onnx.js';
import { loadModelDir } from '../models/load.js';
import { buildTrainingGraph } from '../models/train-graph.js';
import type { GraphFileJob, GraphFileReply } from './graph-file.js';
import { servedBase } from './served-base.js';

/** The process behind writeTrainingGraphFile: one job in, build, write, reply, exit (freeing the graph's memory). */
if (!process.send) throw new Error('the training graph process must be started with an IPC channel (graph-file.ts)');
process.once('message', (m) => {
  const job = m as GraphFileJob;
  let reply: GraphFileReply;
  try {
    const { spec, weights } = loadModelDir(job.modelDir);
    mkdirSync(job.dir, { recursive: true });
    const served = job.servedModelPath ? servedBase(job.servedModelPath, job.dir, job.options.quant) : null;
    const { graph } = buildTrainingGraph(spec, weights, job.options, served?.stored ?? null);
    const { modelPath } = writeOnnxModel(graph.toOnnx(), job.dir, 'train');
    reply = { modelPath, base: served?.source ?? 'quantized', peakRssBytes: process.resourceUsage().maxRSS * 1024 };
  } catch (e) {
    const err = e instanceof Error ? e : new Error(String(e));
    const code = (err as NodeJS.ErrnoException).code;
    reply = { error: { message: err.message, ...(code ? { code } : {}), ...(err.stack ? { stack: err.stack } : {}) } };
  }
  process.send!(reply, () => process.disconnect());
});
