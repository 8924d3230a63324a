/**
 * Training figures for `npm run bench`: tokens/s and peak RSS of one LoRA step (seq 512, r 16) on the `1b` shape
 * with the int4 base, for q_proj+v_proj and all-linear (and q_proj+v_proj without gradient checkpointing, and with
 * the prepacked MatMulNBits forward), each in
 * its own process; next to the same step in PyTorch on the CPU with a dense float32 base when Debian's
 * python3-torch is installed (measured in the same run).
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
  // The last rows: the speed that gradient checkpointing costs and the memory it saves; the same for prepacked_forward.
  const rows = [['q_proj,v_proj', 'on', 'dq'], ['all-linear', 'on', 'dq'], ['q_proj,v_proj', 'off', 'dq'], ['q_proj,v_proj', 'on', 'nbits0']] as const;
  for (const [targets, checkpointing, forward] of rows) {
    log(`training step, ${targets}, r ${R}, seq ${SEQ}, checkpointing ${checkpointing}, forward ${forward}`);
    const { stdout } = await run(process.execPath, [join(here, 'train-step.js'), modelDir, targets, String(R), String(SEQ), String(STEPS), String(threads), checkpointing, forward], { maxBuffer: 1 << 20 });
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
    const ratio = (key: string, i: number, p = i) => +((loraplex[i]![key] as number) / (py[p]![key] as number)).toFixed(2);
    const noCheckpointing = 'q_proj,v_proj without checkpointing';
    const prepacked = 'q_proj,v_proj with prepacked_forward';
    figures.loraplexVsPytorchTokensPerSecond = { ...Object.fromEntries(names.map((n, i) => [n, ratio('tokensPerSecond', i)])), [noCheckpointing]: ratio('tokensPerSecond', 2, 0), [prepacked]: ratio('tokensPerSecond', 3, 0) };
    figures.loraplexVsPytorchPeakRss = { ...Object.fromEntries(names.map((n, i) => [n, ratio('peakRssMiB', i)])), [noCheckpointing]: ratio('peakRssMiB', 2, 0), [prepacked]: ratio('peakRssMiB', 3, 0) };
  }
  return figures;
}
