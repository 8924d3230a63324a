/**
 * Training figures for `npm run bench`: tokens/s and peak RSS of one LoRA step (seq 512, r 16) on the `1b` shape
 * with the int4 base, for q_proj+v_proj and all-linear, each in its own process; next to the same step in
 * PyTorch on the CPU with a dense float32 base when Debian's python3-torch is installed (measured in the same run).
 */
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { promisify } from 'node:util';

const run = promisify(execFile);
const SEQ = 512;
const R = 16;
const STEPS = 2;

export interface TrainingFigures {
  seq: number;
  r: number;
  loraplex: Record<string, unknown>[];
  pytorch: Record<string, unknown>[] | { skipped: string };
  loraplexVsPytorchTokensPerSecond?: Record<string, number>;
  loraplexVsPytorchPeakRss?: Record<string, number>;
}

export async function trainingBench(modelDir: string, threads: number, log: (m: string) => void): Promise<TrainingFigures> {
  const here = new URL('.', import.meta.url).pathname;
  const loraplex: Record<string, unknown>[] = [];
  for (const targets of ['q_proj,v_proj', 'all-linear']) {
    log(`training step, ${targets}, r ${R}, seq ${SEQ}`);
    const { stdout } = await run(process.execPath, [join(here, 'train-step.js'), modelDir, targets, String(R), String(SEQ), String(STEPS), String(threads)], { maxBuffer: 1 << 20 });
    const r = JSON.parse(stdout) as Record<string, unknown>;
    log(`  ${r['tokensPerSecond']} tok/s, peak RSS ${r['peakRssMiB']} MiB`);
    loraplex.push(r);
  }
  let pytorch: TrainingFigures['pytorch'];
  try {
    await run('/usr/bin/python3', ['-c', 'import torch']);
    pytorch = [];
    for (const targets of ['q_proj,v_proj', 'all-linear']) {
      log(`pytorch step, ${targets}`);
      // OMP_WAIT_POLICY=PASSIVE: otherwise OpenMP and OpenBLAS threads fight over the 2 cores (ENGINE-NOTES).
      const { stdout } = await run('/usr/bin/python3', [join(here, '../../../test/bench/torch_lora_step.py'), join(modelDir, 'config.json'), targets, String(R), String(SEQ), String(STEPS), String(threads)], { env: { ...process.env, OMP_WAIT_POLICY: 'PASSIVE' }, maxBuffer: 1 << 20 });
      const r = JSON.parse(stdout) as Record<string, unknown>;
      log(`  ${r['tokensPerSecond']} tok/s, peak RSS ${r['peakRssMiB']} MiB`);
      pytorch.push(r);
    }
  } catch (e) {
    pytorch = { skipped: `PyTorch not available for /usr/bin/python3 (apt-get install python3-torch libopenblas0-pthread): ${(e as Error).message.split('\n')[0]}` };
  }
  const figures: TrainingFigures = { seq: SEQ, r: R, loraplex, pytorch };
  if (Array.isArray(pytorch)) {
    const names = ['q_proj,v_proj', 'all-linear'];
    const py = pytorch;
    const ratio = (key: string, i: number) => +((loraplex[i]![key] as number) / (py[i]![key] as number)).toFixed(2);
    figures.loraplexVsPytorchTokensPerSecond = Object.fromEntries(names.map((n, i) => [n, ratio('tokensPerSecond', i)]));
    figures.loraplexVsPytorchPeakRss = Object.fromEntries(names.map((n, i) => [n, ratio('peakRssMiB', i)]));
  }
  return figures;
}
