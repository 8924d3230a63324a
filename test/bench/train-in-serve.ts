/**
 * What a Train job adds to a serving process: `loraplex serve` as a child process, its resident memory once it
 * serves, then a Train job (seq 512, r 16, q_proj+v_proj, micro-batch 1) through the real RPC, sampling the
 * process's RSS until the job ends. Reports the RSS before, the peak during the job and the difference, and the
 * seconds from the request to the first step (the training graph on the served base, the session, the first step).
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
  /** Of the peak: anonymous and file-backed MiB (a job maps the served graph's data file: page cache, not a copy). */
  peakAnonMiB: number;
  peakFileMiB: number;
  servingAnonMiB: number;
  servingFileMiB: number;
  secondsToFirstStep: number;
  stepsSeen: number;
}

/** Resident memory in MiB: all of it, anonymous (heap, arenas, prepacked weights) and file-backed (mapped files). */
function rssMiB(pid: number): { total: number; anon: number; file: number } {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const field = (name: string) => Math.round(Number(new RegExp(`^${name}:\\s+(\\d+) kB`, 'm').exec(status)?.[1] ?? 0) / 1024);
  return { total: field('VmRSS'), anon: field('RssAnon'), file: field('RssFile') };
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
    const serving = rssMiB(pid);
    const servingRssMiB = serving.total;
    let peak = serving;
    const sample = () => {
      const now = rssMiB(pid);
      if (now.total > peak.total) peak = now;
    };
    const sampler = setInterval(sample, 200);
    const text = 'First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. '.repeat(600);
    let stepsSeen = 0;
    let secondsToFirstStep = NaN;
    const t0 = performance.now();
    try {
      const job = train.train({
        adapterId: 'rss-probe', examples: [{ example: { case: 'text', value: text } }], maxSteps: STEPS, maxSeqLength: SEQ, microBatchSize: 1,
        targetModules: ['q_proj', 'v_proj'], r: 16, loraAlpha: 32,
      });
      for await (const m of job) {
        if (m.event?.event.case !== 'progress') continue;
        if (stepsSeen++ === 0) secondsToFirstStep = (performance.now() - t0) / 1000;
      }
    } finally {
      clearInterval(sampler);
    }
    sample();
    log(`  serving ${servingRssMiB} MiB (anon ${serving.anon}, file ${serving.file}), peak during the job ${peak.total} MiB (+${peak.total - servingRssMiB}; anon ${peak.anon}, file ${peak.file}); first step after ${secondsToFirstStep.toFixed(1)} s`);
    return {
      seq: SEQ, r: 16, steps: STEPS, servingRssMiB, peakRssDuringJobMiB: peak.total, jobAddsMiB: peak.total - servingRssMiB,
      peakAnonMiB: peak.anon, peakFileMiB: peak.file, servingAnonMiB: serving.anon, servingFileMiB: serving.file,
      secondsToFirstStep: +secondsToFirstStep.toFixed(1), stepsSeen,
    };
  } finally {
    train.close();
    await serve.stop();
  }
}
