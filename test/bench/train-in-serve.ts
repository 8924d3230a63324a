/**
 * What a Train job adds to a serving process: `loraplex serve` as a child process, its resident memory once it
 * serves, then a Train job (seq 512, r 16, q_proj+v_proj, micro-batch 1) through the real RPC, sampling the
 * process's RSS until the job ends. Reports the RSS before, the peak during the job and the difference.
 */
import { readFileSync } from 'node:fs';
import type { QuantOptions } from '../../kernels/quant/index.js';
import { makeClient } from '../../src/rpc/bridge.js';
import { TrainService } from '../../src/gen/loraplex/v1/train_pb.js';
import { launchServe } from './serve-process.js';

const STEPS = 3;
const SEQ = 512;

export interface TrainInServeFigures {
  seq: number;
  r: number;
  steps: number;
  servingRssMiB: number;
  peakRssDuringJobMiB: number;
  jobAddsMiB: number;
  stepsSeen: number;
}

function rssMiB(pid: number): number {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  return Math.round(Number(/^VmRSS:\s+(\d+) kB/m.exec(status)?.[1] ?? 0) / 1024);
}

export async function trainInServeBench(modelDir: string, cacheDir: string, quant: QuantOptions, threads: number, log: (m: string) => void): Promise<TrainInServeFigures> {
  log(`train job inside serve: seq ${SEQ}, r 16, q_proj+v_proj, ${STEPS} steps`);
  // A first start fills the graph cache: the measured process starts cached, without a cold start's leftovers.
  await (await launchServe(modelDir, cacheDir, quant, threads)).stop();
  const serve = await launchServe(modelDir, cacheDir, quant, threads);
  const train = makeClient(TrainService, `127.0.0.1:${serve.port}`);
  try {
    const pid = serve.child.pid!;
    // Settled serving memory: the session is created and the probe steps ran.
    await new Promise((r) => setTimeout(r, 2000));
    const servingRssMiB = rssMiB(pid);
    let peak = servingRssMiB;
    const sampler = setInterval(() => (peak = Math.max(peak, rssMiB(pid))), 200);
    const text = 'First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. '.repeat(600);
    let stepsSeen = 0;
    try {
      const job = train.train({
        adapterId: 'rss-probe', examples: [{ example: { case: 'text', value: text } }], maxSteps: STEPS, maxSeqLength: SEQ, microBatchSize: 1,
        targetModules: ['q_proj', 'v_proj'], r: 16, loraAlpha: 32,
      });
      for await (const m of job) if (m.event?.event.case === 'progress') stepsSeen++;
    } finally {
      clearInterval(sampler);
    }
    peak = Math.max(peak, rssMiB(pid));
    log(`  serving ${servingRssMiB} MiB, peak during the job ${peak} MiB (+${peak - servingRssMiB})`);
    return { seq: SEQ, r: 16, steps: STEPS, servingRssMiB, peakRssDuringJobMiB: peak, jobAddsMiB: peak - servingRssMiB, stepsSeen };
  } finally {
    train.close();
    await serve.stop();
  }
}
