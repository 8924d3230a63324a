import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { STORIES, tempDir } from '../helpers/engine.js';
import { SETTINGS } from '../../src/config/schema.js';
import { TrainRequestSchema } from '../../src/gen/loraplex/v1/train_pb.js';
import { trainRequestFromFlags } from '../../src/cli/train-options.js';

const run = promisify(execFile);
const CLI = new URL('../../src/cli/main.js', import.meta.url).pathname;

async function loraplex(...args: string[]): Promise<{ stdout: string; stderr: string; code: number }> {
  try {
    const r = await run(process.execPath, [CLI, ...args], { env: { ...process.env, LORAPLEX_CACHE_DIR: tempDir('help-cache') } });
    return { ...r, code: 0 };
  } catch (e) {
    const err = e as { stdout: string; stderr: string; code: number };
    return { stdout: err.stdout, stderr: err.stderr, code: err.code };
  }
}

/** The options each command must list: for serve every setting, for train every TrainRequest field it takes. */
const EXPECTED: Record<string, string[]> = {
  serve: SETTINGS.map((s) => s.flag),
  train: [
    '--model', '--data', '--eval-data', '--out', '--job-dir', '--json', '--quant', '--block-size', '--asymmetric', '--threads',
    ...TrainRequestSchema.fields.filter((f) => !['adapter_id', 'examples', 'eval_examples', 'path', 'eval_path'].includes(f.name)).map((f) => `--${f.name === 'gradient_checkpointing' ? 'no-' : ''}${f.name.replace(/_/g, '-')}`),
  ],
  generate: ['--model', '--adapter', '--prompt', '--max-new-tokens', '--temperature', '--top-k', '--top-p', '--repetition-penalty', '--seed', '--stop', '--json', '--quant', '--block-size', '--accuracy-level', '--asymmetric', '--threads', '--cache-dir', '--max-model-len'],
  'make-model': ['--arch', '--size', '--out', '--seed'],
};

test('every command has --help: exit 0, every option listed on stdout', async () => {
  for (const [command, flags] of Object.entries(EXPECTED)) {
    for (const helpFlag of command === 'train' ? ['--help', '-h'] : ['--help']) {
      const r = await loraplex(command, helpFlag);
      assert.equal(r.code, 0, `${command} ${helpFlag}: ${r.stderr}`);
      assert.match(r.stdout, new RegExp(`^Usage: loraplex ${command}`));
      const listed = new Set(r.stdout.match(/--[a-z0-9-]+/g));
      for (const f of flags) assert.ok(listed.has(f), `${command} --help lists ${f}`);
    }
  }
  assert.equal((await loraplex('help', 'train')).stdout, (await loraplex('train', '--help')).stdout);
  const top = await loraplex('--help');
  assert.equal(top.code, 0);
  for (const command of Object.keys(EXPECTED)) assert.match(top.stdout, new RegExp(`loraplex ${command}`));
});

test('an unknown option exits 2 naming it, for every command', async () => {
  for (const command of Object.keys(EXPECTED)) {
    const r = await loraplex(command, '--no-such-option', '1');
    assert.equal(r.code, 2, `${command}: ${r.stderr}`);
    assert.match(r.stderr, /--no-such-option/);
    assert.equal(r.stdout, '');
  }
});

test('train checks its options as the Train RPC does, named as flags', async () => {
  const data = join(tempDir('train-flags'), 'tiny.txt');
  mkdirSync(join(data, '..'), { recursive: true });
  writeFileSync(data, 'Speak, speak.\n'.repeat(20));
  const base = ['train', '--model', STORIES, '--data', data];
  const cases: [string[], RegExp][] = [
    [['--learning-rate', '0'], /^loraplex: --learning-rate 0: must be in \(0, 1\]/],
    [['--lora-dropout', '1'], /^loraplex: --lora-dropout 1: must be in \[0, 1\)/],
    [['--text-split', 'words'], /^loraplex: --text-split words: must be one of paragraph, document, line, stream/],
    [['--quant', 'none', '--block-size', '16'], /^loraplex: --block-size: only applies to quantized weights, and --quant is none/],
    [['--quant', 'nf4', '--asymmetric'], /^loraplex: --asymmetric: only applies to int4 and int8, and --quant is nf4/],
    [['--threads', '0'], /^loraplex: --threads 0: must be an integer >= 1 and <= 256/],
    [['--max-steps', '1.5'], /^loraplex: --max-steps 1\.5: must be an integer/],
  ];
  for (const [flags, message] of cases) {
    const r = await loraplex(...base, '--out', join(tempDir('train-flags-out'), 'a'), ...flags);
    assert.equal(r.code, 2, `${flags.join(' ')}: ${r.stderr}`);
    assert.match(r.stderr, message);
  }
});

test('a boolean train option that defaults to on is turned off by --no-...', () => {
  assert.equal(trainRequestFromFlags({ 'no-gradient-checkpointing': true }).gradientCheckpointing, false);
  assert.equal(trainRequestFromFlags({}).gradientCheckpointing, undefined, 'unset: the RPC default (on) applies');
  assert.equal(trainRequestFromFlags({ 'use-rslora': true }).useRslora, true);
  assert.equal(trainRequestFromFlags({ 'prepacked-forward': true }).prepackedForward, true);
});
