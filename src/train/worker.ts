import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { parentPort, workerData } from 'node:worker_threads';
import { diskFullAs, LoraplexError } from '../errors.js';
import { loadModelDir } from '../models/load.js';
import { loadTokenizer } from '../tokenizer/index.js';
import { listCheckpoints } from './checkpoint.js';
import { runTraining } from './trainer.js';
import type { WorkerInput, WorkerReply, WorkerRequest } from './runner.js';

/**
 * The training worker: one job, one thread. It owns the trainer's onnxruntime session, so a step (which
 * blocks its thread) stalls neither the event loop nor the engine worker. It reads the model, tokenizer and
 * the job's data itself, runs (or resumes) runTraining and posts every event back; a 'stop' message aborts
 * it at the next step.
 */
if (!parentPort) throw new Error('the training worker must run in a worker thread');
const port = parentPort;
const input = workerData as WorkerInput;
const controller = new AbortController();

const post = (m: WorkerReply) => port.postMessage(m);

port.on('message', (m: WorkerRequest) => {
  if (m.type === 'stop') controller.abort();
});

async function main(): Promise<void> {
  const { spec } = loadModelDir(input.modelDir);
  const tokenizer = await loadTokenizer(input.modelDir);
  const data = JSON.parse(readFileSync(join(input.jobDir, 'data.json'), 'utf8'));
  const checkpoints = listCheckpoints(input.jobDir);
  if (checkpoints.length > 0) post({ type: 'resuming', step: checkpoints[checkpoints.length - 1]!.step });
  const result = await runTraining({
    spec,
    modelDir: input.modelDir,
    tokenizer,
    quant: input.quant,
    config: input.config,
    data,
    jobDir: input.jobDir,
    threads: input.threads,
    baseModelNameOrPath: input.baseModelNameOrPath,
    ...(input.servedModelPath ? { servedModelPath: input.servedModelPath } : {}),
    ...(input.graphDir ? { graphDir: input.graphDir } : {}),
    // The checkpoint's directory is a server path: it stays here.
    onEvent: (e) => post({ type: 'event', event: e.type === 'checkpoint' ? { type: 'checkpoint', step: e.step } : e }),
    signal: controller.signal,
  });
  // Copied, not transferred: the tensors may be views of a larger (or pooled) buffer after a resume.
  post({
    type: 'done',
    result: { adapter: result.adapter, steps: result.steps, trainLoss: result.trainLoss, evalLoss: result.evalLoss, initialEvalLoss: result.initialEvalLoss, tokensPerSecond: result.tokensPerSecond },
  });
}

main().catch((caught: unknown) => {
  // Checkpoints go to the job root; an error already naming its root keeps it.
  const err = caught instanceof LoraplexError ? caught : diskFullAs(caught, 'job root');
  if (controller.signal.aborted) post({ type: 'stopped' });
  // A request problem found only now (e.g. the data packs into nothing): the client gets its message.
  else if (err instanceof LoraplexError && err.code !== 'INTERNAL') post({ type: 'error', code: err.code, message: err.message });
  else post({ type: 'error', code: 'INTERNAL', message: 'internal error', detail: err instanceof Error ? (err.stack ?? err.message) : String(err) });
});
