import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { sweepExportTemps } from '../../src/adapters/export.js';
import { linearModules, makeRandomAdapter, readPeftAdapter } from '../../src/adapters/peft.js';
import { ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, AdapterStore, type AdapterLimits } from '../../src/adapters/store.js';
import { parseJsonCapped } from '../../src/files/json.js';
import { makeModel } from '../../src/models/make.js';
import { writeSafetensors } from '../../src/models/safetensors.js';
import type { ModelSpec } from '../../src/models/spec.js';
import { loadTrainData } from '../../src/train/data.js';
import { removeDir, tempDir } from '../models/fixtures.js';
import { loraplexError } from '../train/train-fixtures.js';
import { key } from '../helpers/adapter-keys.js';

/** Files a tenant with write access to its adapter folder could plant; none may block, leak or crash. */

let spec: ModelSpec;
let limits: AdapterLimits;
let root: string;
let outside: string;
let store: AdapterStore;
const SECRET = 'TOP-SECRET-7f3a';

before(() => {
  const modelDir = tempDir('hostile-model');
  spec = makeModel({ arch: 'llama', size: 'tiny', outDir: modelDir, seed: 1 }).spec;
  removeDir(modelDir);
  limits = { maxLoraRank: 16, maxAdapterBytes: 64 << 20, loraModules: linearModules(spec) };
  root = tempDir('hostile-root');
  outside = tempDir('hostile-outside');
  writeFileSync(join(outside, 'secret.json'), `{"key": ${SECRET}}`);
  store = new AdapterStore(root);
});

after(() => {
  removeDir(root);
  removeDir(outside);
});

const adapter = (r = 4) => makeRandomAdapter(spec, { r, alpha: 8, targetModules: ['q_proj', 'v_proj'], seed: 1 });

/** A valid adapter `id` in the store whose `file` is then replaced by `plant(path)`. */
function planted(id: string, file: string, plant: (path: string) => void): void {
  store.write(key(id), adapter());
  const path = join(store.dir(key(id)), file);
  rmSync(path);
  plant(path);
}

const notRegular = (file: string) => loraplexError('INVALID_ARGUMENT', new RegExp(`${file.replace('.', '\\.')}: is not a regular file`));

test('a FIFO config neither blocks a load nor the listing, and the adapter can still be deleted', () => {
  planted('fifo', ADAPTER_CONFIG_FILE, (p) => execFileSync('mkfifo', [p]));
  assert.throws(() => store.read(key('fifo'), spec, limits), notRegular(ADAPTER_CONFIG_FILE));
  const d = store.describe(key('fifo'));
  assert.equal(d.r, null);
  assert.match(d.invalidReason ?? '', /adapter_config\.json: is not a regular file/);
  assert.ok(store.list().includes(key('fifo')));
  store.delete(key('fifo'));
  assert.equal(store.has(key('fifo')), false);
});

test('a config symlinked to /dev/zero is refused without reading it', () => {
  planted('zero', ADAPTER_CONFIG_FILE, (p) => symlinkSync('/dev/zero', p));
  assert.throws(() => store.read(key('zero'), spec, limits), notRegular(ADAPTER_CONFIG_FILE));
  assert.match(store.describe(key('zero')).invalidReason ?? '', /not a regular file/);
});

test('a config symlinked out of the root: refused, and neither its content nor a server path is shown', () => {
  planted('leak', ADAPTER_CONFIG_FILE, (p) => symlinkSync(join(outside, 'secret.json'), p));
  assert.throws(
    () => store.read(key('leak'), spec, limits),
    (e: unknown) => loraplexError('INVALID_ARGUMENT', /adapter_config\.json: is not a regular file/)(e) && !String((e as Error).message).includes(outside) && !String((e as Error).message).includes(root),
  );
});

test('invalid JSON in a config: the message gives a position, never the content', () => {
  planted('badjson', ADAPTER_CONFIG_FILE, (p) => writeFileSync(p, `{"r": 4, "target_modules": ${SECRET}}`));
  assert.throws(() => store.read(key('badjson'), spec, limits), (e: unknown) => {
    loraplexError('INVALID_ARGUMENT', /adapter_config\.json: is not valid JSON/)(e);
    assert.ok(!(e as Error).message.includes(SECRET), (e as Error).message);
    return true;
  });
  assert.ok(!(store.describe(key('badjson')).invalidReason ?? '').includes(SECRET));
});

test('a directory symlinked out of the root is not served, and not walked for its size', () => {
  store.write(key('elsewhere'), adapter());
  const foreign = join(outside, 'adapter');
  rmSync(foreign, { recursive: true, force: true });
  execFileSync('cp', ['-r', store.dir(key('elsewhere')), foreign]);
  symlinkSync(foreign, join(root, 'outlink'));
  assert.throws(() => store.read(key('outlink'), spec, limits), loraplexError('INVALID_ARGUMENT', /resolves outside the root/));
  assert.match(store.describe(key('outlink')).invalidReason ?? '', /resolves outside the root/);
  assert.equal(store.diskBytes(key('outlink')), 0);
  // A directory symlink that stays inside the root is served.
  symlinkSync(store.dir(key('elsewhere')), join(root, 'inlink'));
  assert.equal(store.read(key('inlink'), spec, limits).r, 4);
});

test('adapter_model.safetensors as a directory is INVALID_ARGUMENT, not EISDIR', () => {
  planted('dirweights', ADAPTER_WEIGHTS_FILE, (p) => mkdirSync(p));
  assert.throws(() => store.read(key('dirweights'), spec, limits), notRegular(ADAPTER_WEIGHTS_FILE));
});

test('a safetensors header nested 10k deep is refused by the depth cap', () => {
  planted('deep', ADAPTER_WEIGHTS_FILE, (p) => {
    const json = Buffer.from(`{"w": ${'['.repeat(10_000)}${']'.repeat(10_000)}}`);
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(json.length));
    writeFileSync(p, Buffer.concat([len, json]));
  });
  assert.throws(() => store.read(key('deep'), spec, limits), loraplexError('INVALID_ARGUMENT', /adapter_model\.safetensors: header nests deeper than \d+ levels/));
});

test('maxAdapterBytes counts what is read: a symlinked big safetensors is refused', () => {
  const big = makeRandomAdapter(spec, { r: 16, alpha: 8, targetModules: ['all-linear'], seed: 2 });
  store.write(key('big'), big);
  const bigFile = join(store.dir(key('big')), ADAPTER_WEIGHTS_FILE);
  planted('small', ADAPTER_WEIGHTS_FILE, (p) => symlinkSync(bigFile, p));
  const tight = { ...limits, maxAdapterBytes: 64 * 1024 };
  assert.ok(store.diskBytes(key('small')) < tight.maxAdapterBytes);
  assert.throws(() => store.read(key('small'), spec, tight), notRegular(ADAPTER_WEIGHTS_FILE));
  // The read itself is bounded too (a file that grew after a directory listing counts as it is).
  assert.throws(
    () => readPeftAdapter(store.dir(key('big')), spec, { maxBytes: 64 * 1024 }),
    /adapter_model\.safetensors: \d+ bytes exceed the limit of \d+/,
  );
});

/** An adapter directory whose q_proj tensors carry a layer number of `digits` zeros (still layer 0 to the family check). */
function redosAdapter(pattern: string, digits: number): string {
  const dir = join(tempDir('hostile-redos'), 'a');
  mkdirSync(dir);
  const q = linearModules(spec).find((m) => m.peftName === 'q_proj')!;
  const path = `model.layers.${'0'.repeat(digits)}.self_attn.q_proj`;
  writeFileSync(join(dir, ADAPTER_CONFIG_FILE), JSON.stringify({ peft_type: 'LORA', r: 4, lora_alpha: 8, target_modules: pattern }));
  writeSafetensors(join(dir, ADAPTER_WEIGHTS_FILE), [
    { name: `base_model.model.${path}.lora_A.weight`, shape: [4, q.inFeatures], data: new Float32Array(4 * q.inFeatures) },
    { name: `base_model.model.${path}.lora_B.weight`, shape: [q.outFeatures, 4], data: new Float32Array(4 * q.outFeatures) },
  ], 'F32');
  return dir;
}

test('a catastrophic-backtracking target_modules regex is matched in linear time (RE2)', () => {
  const dir = redosAdapter('model\\.layers\\.(\\d+)+\\.self_attn\\.k_proj', 40);
  try {
    assert.throws(() => readPeftAdapter(dir, spec), /has weights but is not in target_modules/);
  } finally {
    removeDir(join(dir, '..'));
  }
});

test('target_modules regexes: full match as PEFT, RE2-only constructs fall back to the tensors, length is capped', () => {
  for (const [pattern, ok] of [
    ['.*\\.(q_proj|v_proj)', true],
    ['.*q_pro', false], // a full match, not a search
    ['(?!x).*q_proj', true], // lookahead: RE2 cannot compile it, the tensors present decide
  ] as const) {
    const dir = redosAdapter(pattern, 1);
    try {
      if (ok) assert.equal(readPeftAdapter(dir, spec).modules.length, 1, pattern);
      else assert.throws(() => readPeftAdapter(dir, spec), /not in target_modules/, pattern);
    } finally {
      removeDir(join(dir, '..'));
    }
  }
  const dir = redosAdapter(`(${'a|'.repeat(600)}q_proj)`, 1);
  try {
    assert.throws(() => readPeftAdapter(dir, spec), /target_modules regex is \d+ characters; the limit is 1024/);
  } finally {
    removeDir(join(dir, '..'));
  }
});

test('out-of-range r and lora_alpha: described as invalid with only in-range values, refused on load', () => {
  const cases: [string, RegExp, 'r' | 'alpha'][] = [
    ['"r": -5', /r must be a positive integer/, 'r'],
    ['"r": 1099511627776', /r must be a positive integer at most 4294967295/, 'r'],
    ['"r": 1152921504606846976', /r must be a positive integer/, 'r'],
    ['"lora_alpha": 1e39', /lora_alpha must be a positive number at most/, 'alpha'],
    ['"lora_alpha": 1e308', /lora_alpha must be a positive number at most/, 'alpha'],
  ];
  cases.forEach(([field, reason, which], i) => {
    const id = key(`range${i}`);
    store.write(id, adapter());
    const cfgPath = join(store.dir(id), ADAPTER_CONFIG_FILE);
    const text = readFileSync(cfgPath, 'utf8');
    const name = field.slice(0, field.indexOf(':'));
    writeFileSync(cfgPath, text.replace(new RegExp(`${name}: [^,\\n]+`), field));
    const d = store.describe(id);
    assert.match(d.invalidReason ?? '', reason, field);
    assert.equal(which === 'r' ? d.r : d.alpha, null, field);
    assert.equal(which === 'r' ? d.alpha : d.r, which === 'r' ? 8 : 4, field);
    assert.throws(() => store.read(id, spec, limits), loraplexError('INVALID_ARGUMENT', reason), field);
  });
});

test('parseJsonCapped: size and depth caps, brackets inside strings do not count, no content in messages', () => {
  const caps = { maxBytes: 1000, maxDepth: 3, what: 'x.json' };
  assert.deepEqual(parseJsonCapped('{"a": ["[[[[", {"b": 1}]}', caps), { a: ['[[[[', { b: 1 }] });
  assert.throws(() => parseJsonCapped('[[[[1]]]]', caps), /x\.json: nests deeper than 3 levels \(at position 3\)/);
  assert.throws(() => parseJsonCapped(' '.repeat(1001), caps), /x\.json: 1001 bytes exceed the limit of 1000/);
  assert.throws(() => parseJsonCapped(`{"k": ${SECRET}}`, caps), (e: Error) => /is not valid JSON/.test(e.message) && !e.message.includes(SECRET));
  assert.throws(() => parseJsonCapped('"\\"[[[[[', caps), /is not valid JSON/); // escaped quote keeps the string open
});

test('export temp folders left by a kill are swept; finished exports stay', () => {
  const exportRoot = tempDir('hostile-export');
  try {
    mkdirSync(join(exportRoot, '.tmp-model-1234abcd'));
    writeFileSync(join(exportRoot, '.tmp-model-1234abcd', 'model.safetensors'), 'partial');
    mkdirSync(join(exportRoot, 'done'));
    sweepExportTemps(exportRoot);
    assert.equal(existsSync(join(exportRoot, '.tmp-model-1234abcd')), false);
    assert.equal(existsSync(join(exportRoot, 'done')), true);
  } finally {
    removeDir(exportRoot);
  }
});

test('training data: a FIFO is refused without blocking; a deep .jsonl line is refused by the depth cap', () => {
  const dataRoot = tempDir('hostile-data');
  try {
    execFileSync('mkfifo', [join(dataRoot, 'pipe.jsonl')]);
    assert.throws(() => loadTrainData({ path: 'pipe.jsonl' }, { dataRoot }), loraplexError('INVALID_ARGUMENT', /path "pipe\.jsonl": is not a regular file/));
    writeFileSync(join(dataRoot, 'deep.jsonl'), `{"text": ${'['.repeat(10_000)}${']'.repeat(10_000)}}\n`);
    assert.throws(() => loadTrainData({ path: 'deep.jsonl' }, { dataRoot }), loraplexError('INVALID_ARGUMENT', /line 1: nests deeper than \d+ levels/));
  } finally {
    removeDir(dataRoot);
  }
});
