import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { STORIES, tempDir } from '../helpers/engine.js';
import { makeRandomAdapter, writePeftAdapter } from '../../src/adapters/peft.js';
import { readModelSpec } from '../../src/models/config.js';

const run = promisify(execFile);
const CLI = new URL('../../src/cli/main.js', import.meta.url).pathname;
const cacheDir = tempDir('cli-cache');
const reference = JSON.parse(readFileSync(`${STORIES}/reference.json`, 'utf8')).cases[0];

async function loraplex(...args: string[]): Promise<{ stdout: string; stderr: string; code: number }> {
  try {
    const r = await run(process.execPath, [CLI, ...args], { env: { ...process.env, LORAPLEX_CACHE_DIR: cacheDir } });
    return { ...r, code: 0 };
  } catch (e) {
    const err = e as { stdout: string; stderr: string; code: number };
    return { stdout: err.stdout, stderr: err.stderr, code: err.code };
  }
}

test('generate --quant none --json reproduces llama2.c greedy tokens on stories260K', async () => {
  const r = await loraplex('generate', '--model', STORIES, '--quant', 'none', '--temperature', '0', '--max-new-tokens', '48', '--prompt', 'Once upon a time', '--json');
  assert.equal(r.code, 0, r.stderr);
  const out = JSON.parse(r.stdout);
  assert.deepEqual(out.promptIds, reference.prompt_ids_with_bos);
  assert.deepEqual(out.tokenIds, reference.greedy_new_ids);
  assert.equal(out.text, reference.greedy_text);
  assert.equal(out.finishReason, 'length');
});

test('generation stops by itself at an eos id of generation_config.json', async () => {
  const r = await loraplex('generate', '--model', STORIES, '--quant', 'none', '--max-new-tokens', '400', '--prompt', 'Once upon a time', '--json');
  assert.equal(r.code, 0, r.stderr);
  const out = JSON.parse(r.stdout);
  assert.equal(out.finishReason, 'stop');
  assert.ok(out.tokenIds.length < 400);
  assert.ok(!out.tokenIds.includes(1) && !out.tokenIds.includes(2), 'the stop token is not part of tokenIds');
});

test('int4 generation is seeded: same seed, same tokens; sampling flags are validated', async () => {
  const args = ['generate', '--model', STORIES, '--quant', 'int4', '--temperature', '0.8', '--top-k', '40', '--top-p', '0.9', '--seed', '42', '--max-new-tokens', '24', '--prompt', 'The dog', '--json'];
  const a = JSON.parse((await loraplex(...args)).stdout);
  const b = JSON.parse((await loraplex(...args)).stdout);
  assert.deepEqual(a.tokenIds, b.tokenIds);
  const bad = await loraplex('generate', '--model', STORIES, '--top-p', '1.5', '--prompt', 'x');
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /topP 1\.5: must be in \(0, 1\]/);
  const unknownQuant = await loraplex('generate', '--model', STORIES, '--quant', 'int3');
  assert.equal(unknownQuant.code, 2);
  assert.match(unknownQuant.stderr, /--quant int3: must be one of none, int4, nf4, int8/);
});

test('a directory that is not a model gets one clear error', async () => {
  const r = await loraplex('generate', '--model', tempDir('empty'), '--prompt', 'x');
  assert.equal(r.code, 1);
  assert.match(r.stderr, /config\.json/);
  assert.equal(r.stderr.trim().split('\n').length, 1);
});

test('make-model writes a servable gpt2 model; --adapter applies a PEFT adapter from the CLI', async () => {
  const dir = tempDir('gpt2-cli');
  const made = await loraplex('make-model', '--arch', 'gpt2', '--size', 'tiny', '--out', dir, '--seed', '3');
  assert.equal(made.code, 0, made.stderr);
  const base = JSON.parse((await loraplex('generate', '--model', dir, '--prompt', 'hello world', '--max-new-tokens', '12', '--json')).stdout);
  assert.ok(base.tokenIds.length > 0, 'the random model generates tokens');
  const adapterDir = join(tempDir('adapter'), 'a1');
  const spec = readModelSpec(dir);
  writePeftAdapter(adapterDir, makeRandomAdapter(spec, { r: 8, alpha: 16, targetModules: ['c_attn', 'c_fc'], seed: 1, bStd: 0.5 }));
  const tuned = JSON.parse((await loraplex('generate', '--model', dir, '--adapter', adapterDir, '--prompt', 'hello world', '--max-new-tokens', '12', '--json')).stdout);
  assert.deepEqual(tuned.promptIds, base.promptIds);
  assert.notDeepEqual(tuned.tokenIds, base.tokenIds);
});

test('serve with a missing execution provider stops with one clear startup error', async () => {
  const r = await loraplex('serve', '--model', STORIES, '--execution-provider', 'cuda', '--auth', 'disabled', '--port', '0', '--metrics-port', '0', '--http-port', '0', '--adapter-root', tempDir('ep-adapters'));
  assert.equal(r.code, 1);
  assert.match(r.stderr, /loraplex: execution provider cuda could not be loaded .* install onnxruntime-node with ONNXRUNTIME_NODE_INSTALL=cuda12/);
});

test('serve --help prints the settings; an invalid setting stops startup with one message naming it', async () => {
  const help = await loraplex('serve', '--help');
  assert.equal(help.code, 0);
  assert.match(help.stdout, /--max-loras/);
  assert.match(help.stdout, /LORAPLEX_MAX_LORAS/);
  const bad = await loraplex('serve', '--max-loras', '0', '--auth', 'disabled');
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /--max-loras 0 \(flag\): must be an integer in \[1, 256\]/);
});
