import { makeModel } from '../models/make.js';
import { UsageError } from '../config/usage-error.js';
import { num, parse, str } from './args.js';

export const MAKE_MODEL_USAGE = 'loraplex make-model --arch llama|gpt2 --size tiny|small|1b --out DIR [--seed S]';

/** Writes a random-weight model in real Hugging Face layout, for tests and benchmarks. */
export async function makeModelCommand(argv: string[]): Promise<void> {
  const v = parse(argv, { arch: { type: 'string' }, size: { type: 'string' }, out: { type: 'string' }, seed: { type: 'string' } });
  if (typeof v['out'] !== 'string') throw new UsageError(`--out DIR is required\n${MAKE_MODEL_USAGE}`);
  const arch = str(v, 'arch', 'llama', ['llama', 'gpt2'] as const);
  const size = str(v, 'size', 'tiny', ['tiny', 'small', '1b'] as const);
  const t0 = performance.now();
  await makeModel({ arch, size, outDir: v['out'], seed: num(v, 'seed', 0, { integer: true, min: 0 }) });
  process.stderr.write(`wrote a random-weight ${arch} ${size} model to ${v['out']} in ${((performance.now() - t0) / 1000).toFixed(1)} s\n`);
}
