import { makeModel } from '../models/make.js';
import { UsageError } from '../config/usage-error.js';
import { num, parse, str } from './args.js';
import { optionRows, parseArgsOptions, usageText, type CliOptions } from './help.js';

export const MAKE_MODEL_USAGE = 'loraplex make-model --arch llama|gpt2 --size tiny|small|1b --out DIR [--seed S]';

const MAKE_MODEL_OPTIONS: CliOptions = {
  arch: { type: 'string', arg: ' llama|gpt2', help: 'model family [llama]' },
  size: { type: 'string', arg: ' tiny|small|1b', help: 'shape: tiny and small for tests; 1b = the shape of TinyLlama-1.1B (llama) [tiny]' },
  out: { type: 'string', arg: ' DIR', help: 'the model directory to write (required)' },
  seed: { type: 'string', arg: ' S', help: 'seed of the random weights [0]' },
};

/** `loraplex make-model --help`. */
export function makeModelUsage(): string {
  return usageText(MAKE_MODEL_USAGE, ['Writes a random-weight model in real Hugging Face layout (config, safetensors, tokenizer), for tests and benchmarks.'], [['Options', optionRows(MAKE_MODEL_OPTIONS)]]);
}

/** Writes a random-weight model in real Hugging Face layout, for tests and benchmarks. */
export async function makeModelCommand(argv: string[]): Promise<void> {
  const v = parse(argv, parseArgsOptions(MAKE_MODEL_OPTIONS));
  if (typeof v['out'] !== 'string') throw new UsageError(`--out DIR is required\n${MAKE_MODEL_USAGE}`);
  const arch = str(v, 'arch', 'llama', ['llama', 'gpt2'] as const);
  const size = str(v, 'size', 'tiny', ['tiny', 'small', '1b'] as const);
  const t0 = performance.now();
  await makeModel({ arch, size, outDir: v['out'], seed: num(v, 'seed', 0, { integer: true, min: 0 }) });
  process.stderr.write(`wrote a random-weight ${arch} ${size} model to ${v['out']} in ${((performance.now() - t0) / 1000).toFixed(1)} s\n`);
}
