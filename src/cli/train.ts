import { basename, dirname, resolve } from 'node:path';
import { existsSync } from 'node:fs';
import { writePeftAdapter } from '../adapters/peft.js';
import { modelName } from '../models/model-name.js';
import { loadModelDir } from '../models/load.js';
import { loadTokenizer } from '../tokenizer/index.js';
import { validateTrainConfig } from '../train/config.js';
import { loadTrainData, type TrainData } from '../train/data.js';
import { runTraining, type TrainEvent } from '../train/trainer.js';
import { dataSourceInput, trainConfigInput } from '../rpc/train-handlers.js';
import { LoraplexError } from '../errors.js';
import { UsageError } from '../config/usage-error.js';
import { parse } from './args.js';
import { quantFromFlags, threadsFromFlags } from './common.js';
import { optionRows, parseArgsOptions, settingOptions, usageText, type CliOptions } from './help.js';
import { asFlagMessage, trainFieldFlags, trainFieldHelpRows, trainRequestFromFlags } from './train-options.js';

export const TRAIN_USAGE = `loraplex train --model DIR --data FILE(.txt|.jsonl) --out DIR [--TRAIN-OPTION VALUE]...
    (loraplex train --help lists every option: the Train RPC's fields, and the base model's quantization)`;

/** The serve settings that say how the base is loaded for training (their flags, defaults and bounds). */
const BASE_SETTINGS = ['quant', 'blockSize', 'asymmetric', 'lmHeadQuant', 'threads'] as const;

const baseOptions = settingOptions(BASE_SETTINGS, (s) => (s.name === 'threads' ? 'onnxruntime intra-op threads of the training' : s.description));

const OWN_OPTIONS: CliOptions = {
  model: { type: 'string', arg: ' DIR', help: 'Hugging Face model directory (required)' },
  data: { type: 'string', arg: ' FILE', help: 'training data, .txt or .jsonl ({"text"}, {"prompt", "completion"} or {"messages"} per line) (required)' },
  'eval-data': { type: 'string', arg: ' FILE', help: 'a separate eval set, .txt or .jsonl; not with --eval-fraction' },
  out: { type: 'string', arg: ' DIR', help: 'the PEFT adapter directory to write; must not exist yet (required)' },
  'job-dir': { type: 'string', arg: ' DIR', help: 'checkpoints and the training graph [OUT.job]; a rerun with the same one resumes from its latest checkpoint' },
  json: { type: 'boolean', help: 'print the final metrics as one JSON line on stdout (no progress on stderr)' },
};

/** `loraplex train --help`: generated from the TrainRequest descriptor and the serve schema. */
export function trainUsage(): string {
  return usageText(
    'loraplex train --model DIR --data FILE --out DIR [--OPTION VALUE]...',
    [
      "Fine-tunes a LoRA adapter on the quantized base without a server: the Train RPC's trainer, defaults and",
      'limits. Boolean options take no value. Unset options take the default in brackets.',
    ],
    [
      ['Input and output', [...optionRows(OWN_OPTIONS), ['--help', 'this help']]],
      ["Base model (as loraplex serve's settings; training computes the 4-bit matmuls exactly, at accuracy level 0)", optionRows(baseOptions)],
      ["Training (the Train RPC's TrainRequest fields, proto/loraplex/v1/train.proto)", trainFieldHelpRows()],
    ],
  );
}

/** A validation error of the RPC's code, named as the CLI user wrote it. */
function asUsage<T>(f: () => T): T {
  try {
    return f();
  } catch (e) {
    if (e instanceof LoraplexError) throw new UsageError(asFlagMessage(e.message));
    throw e;
  }
}

/** Trains an adapter without a server: the same trainer, request fields and validation as the Train RPC. */
export async function trainCommand(argv: string[]): Promise<void> {
  const v = parse(argv, { ...parseArgsOptions({ ...OWN_OPTIONS, ...baseOptions }), ...trainFieldFlags() });
  for (const f of ['model', 'data', 'out']) if (typeof v[f] !== 'string') throw new UsageError(`--${f} is required\n${TRAIN_USAGE}`);
  const modelDir = v['model'] as string;
  const out = resolve(v['out'] as string);
  if (existsSync(out)) throw new UsageError(`--out ${out}: already exists (choose a new directory)`);
  // Training computes in float32 activations: accuracy level 0 keeps the 4-bit matmuls exact to the dequantized weights.
  const quant = quantFromFlags(v, { accuracyLevel: 0 });
  const threads = threadsFromFlags(v);
  const file = resolve(v['data'] as string);
  const req = trainRequestFromFlags(v);
  req.path = basename(file);
  const { spec } = loadModelDir(modelDir);
  const tokenizer = await loadTokenizer(modelDir);
  const config = asUsage(() => validateTrainConfig(trainConfigInput(req), { spec, maxLoraRank: 256, maxModelLen: spec.maxPositions }));
  const data: TrainData = asUsage(() => {
    const source = dataSourceInput(req);
    const limits = { maxFileBytes: 1 << 30 };
    const train = loadTrainData(source, { ...limits, dataRoot: dirname(file) }).train;
    if (typeof v['eval-data'] !== 'string') return { train, eval: null };
    if (config.evalFraction > 0) throw new UsageError(`--eval-fraction ${config.evalFraction}: set --eval-fraction or --eval-data, not both`);
    const evalFile = resolve(v['eval-data']);
    const evalSet = loadTrainData({ path: basename(evalFile), textSplit: source.textSplit ?? null }, { ...limits, dataRoot: dirname(evalFile) }).train;
    return { train, eval: evalSet };
  });
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
    threads,
    baseModelNameOrPath: modelName(modelDir),
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
