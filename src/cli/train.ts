import { basename, dirname, resolve } from 'node:path';
import { existsSync } from 'node:fs';
import { writePeftAdapter } from '../adapters/peft.js';
import { loadModelDir } from '../models/load.js';
import { loadTokenizer } from '../tokenizer/index.js';
import { validateTrainConfig, type TrainConfigInput } from '../train/config.js';
import { loadTrainData } from '../train/data.js';
import { runTraining, type TrainEvent } from '../train/trainer.js';
import { LoraplexError } from '../errors.js';
import { QUANT_KINDS } from '../config/schema.js';
import { UsageError } from '../config/usage-error.js';
import { num, parse, str } from './args.js';
import type { QuantOptions } from '../../kernels/quant/index.js';

export const TRAIN_USAGE = `loraplex train --model DIR --data FILE(.txt|.jsonl) --out DIR [--quant int4|nf4|int8|none]
    [--r R] [--lora-alpha A] [--target-modules q_proj,v_proj|all-linear] [--use-rslora]
    [--learning-rate LR] [--lr-scheduler constant|linear|cosine] [--warmup-steps N] [--weight-decay W]
    [--max-grad-norm G] [--micro-batch-size B] [--gradient-accumulation-steps N] [--epochs E] [--max-steps N]
    [--max-seq-length L] [--eval-fraction F] [--eval-every N] [--checkpoint-every N] [--seed S] [--threads N] [--no-gradient-checkpointing] [--json]`;

const optionalNumber = (v: Record<string, unknown>, flag: string) => (v[flag] === undefined ? undefined : num(v, flag, 0));

/** Trains an adapter without a server: the same trainer as the Train RPC. */
export async function trainCommand(argv: string[]): Promise<void> {
  const v = parse(argv, {
    model: { type: 'string' }, data: { type: 'string' }, out: { type: 'string' }, quant: { type: 'string' }, 'job-dir': { type: 'string' },
    r: { type: 'string' }, 'lora-alpha': { type: 'string' }, 'target-modules': { type: 'string' }, 'use-rslora': { type: 'boolean' },
    'learning-rate': { type: 'string' }, 'lr-scheduler': { type: 'string' }, 'warmup-steps': { type: 'string' }, 'weight-decay': { type: 'string' },
    'max-grad-norm': { type: 'string' }, 'micro-batch-size': { type: 'string' }, 'gradient-accumulation-steps': { type: 'string' },
    epochs: { type: 'string' }, 'max-steps': { type: 'string' }, 'max-seq-length': { type: 'string' }, 'eval-fraction': { type: 'string' },
    'eval-every': { type: 'string' }, 'checkpoint-every': { type: 'string' }, seed: { type: 'string' }, threads: { type: 'string' }, json: { type: 'boolean' },
    'no-gradient-checkpointing': { type: 'boolean' },
  });
  for (const f of ['model', 'data', 'out']) if (typeof v[f] !== 'string') throw new UsageError(`--${f} is required\n${TRAIN_USAGE}`);
  const modelDir = v['model'] as string;
  const out = resolve(v['out'] as string);
  if (existsSync(out)) throw new UsageError(`--out ${out}: already exists (choose a new directory)`);
  const kind = str(v, 'quant', 'int4', QUANT_KINDS);
  // Training computes in float32 activations: accuracy level 0 keeps the 4-bit matmuls exact to the dequantized weights.
  const quant: QuantOptions = kind === 'none' ? { kind } : { kind, ...(kind === 'nf4' ? {} : { accuracyLevel: 0 }) };
  const { spec } = loadModelDir(modelDir);
  const tokenizer = await loadTokenizer(modelDir);
  const input: TrainConfigInput = {
    r: optionalNumber(v, 'r'), loraAlpha: optionalNumber(v, 'lora-alpha'), useRslora: Boolean(v['use-rslora']),
    targetModules: typeof v['target-modules'] === 'string' ? (v['target-modules'] as string).split(',') : undefined,
    learningRate: optionalNumber(v, 'learning-rate'), lrSchedulerType: v['lr-scheduler'] as string | undefined,
    warmupSteps: optionalNumber(v, 'warmup-steps'), weightDecay: optionalNumber(v, 'weight-decay'), maxGradNorm: optionalNumber(v, 'max-grad-norm'),
    microBatchSize: optionalNumber(v, 'micro-batch-size'), gradientAccumulationSteps: optionalNumber(v, 'gradient-accumulation-steps'),
    numEpochs: optionalNumber(v, 'epochs'), maxSteps: optionalNumber(v, 'max-steps'), maxSeqLength: optionalNumber(v, 'max-seq-length'),
    evalFraction: optionalNumber(v, 'eval-fraction'), evalEvery: optionalNumber(v, 'eval-every'), checkpointEvery: optionalNumber(v, 'checkpoint-every'),
    seed: optionalNumber(v, 'seed'), gradientCheckpointing: !v['no-gradient-checkpointing'],
  };
  let config;
  let data;
  try {
    config = validateTrainConfig(input, { spec, maxLoraRank: 256, maxModelLen: spec.maxPositions });
    const file = resolve(v['data'] as string);
    data = loadTrainData({ path: basename(file) }, { dataRoot: dirname(file), maxFileBytes: 1 << 30 });
  } catch (e) {
    if (e instanceof LoraplexError) throw new UsageError(e.message);
    throw e;
  }
  const json = Boolean(v['json']);
  const tty = process.stderr.isTTY && !json;
  const onEvent = (e: TrainEvent) => {
    if (e.type === 'progress') {
      const line = `step ${e.step}/${e.totalSteps}  loss ${e.loss.toFixed(4)}  lr ${e.learningRate.toExponential(2)}  grad ${e.gradNorm.toFixed(3)}  ${e.tokensPerSecond.toFixed(0)} tok/s  eta ${e.etaSeconds.toFixed(0)} s`;
      if (tty) process.stderr.write(`\r${renderBar(e.step / e.totalSteps)} ${line}\u001b[K`);
      else if (!json) process.stderr.write(`${line}\n`);
    } else if (e.type === 'eval' && !json) process.stderr.write(`${tty ? '\n' : ''}eval step ${e.step}: loss ${e.evalLoss.toFixed(4)} perplexity ${e.perplexity.toFixed(2)}\n`);
  };
  const result = await runTraining({
    spec, modelDir, tokenizer, quant, config, data,
    jobDir: typeof v['job-dir'] === 'string' ? v['job-dir'] : `${out}.job`,
    threads: num(v, 'threads', 2, { integer: true, min: 1, max: 256 }),
    baseModelNameOrPath: modelDir,
    onEvent,
  });
  if (tty) process.stderr.write('\n');
  writePeftAdapter(out, result.adapter);
  const metrics = { trainLoss: result.trainLoss, evalLoss: result.evalLoss, initialEvalLoss: result.initialEvalLoss, steps: result.steps, tokensPerSecond: result.tokensPerSecond, adapterDir: out };
  if (json) process.stdout.write(`${JSON.stringify(metrics)}\n`);
  else process.stderr.write(`wrote ${out}: ${result.steps} steps, train loss ${result.trainLoss.toFixed(4)}, eval loss ${result.initialEvalLoss?.toFixed(4) ?? '-'} -> ${result.evalLoss?.toFixed(4) ?? '-'}\n`);
}

function renderBar(fraction: number): string {
  const width = 24;
  const full = Math.round(fraction * width);
  return `[${'#'.repeat(full)}${'.'.repeat(width - full)}]`;
}
