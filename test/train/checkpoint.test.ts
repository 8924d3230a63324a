import assert from 'node:assert/strict';
import { test } from 'node:test';
import { existsSync, mkdirSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { readPeftAdapter } from '../../src/adapters/peft.js';
import { Rng } from '../../src/sampling/rng.js';
import {
  latestCheckpoint,
  listCheckpoints,
  pruneCheckpoints,
  readCheckpoint,
  rngFromState,
  rngState,
  writeCheckpoint,
  type CheckpointState,
} from '../../src/train/checkpoint.js';
import { validateTrainConfig } from '../../src/train/config.js';
import { initLora, loraParams } from '../../src/train/init.js';
import { AdamW } from '../../src/train/optimizer.js';
import { removeDir, tempDir } from '../models/fixtures.js';
import { llamaSpec } from './train-fixtures.js';

const config = validateTrainConfig({ r: 2, targetModules: ['q_proj', 'v_proj'], learningRate: 1e-2, weightDecay: 0.01 }, { spec: llamaSpec, maxLoraRank: 8 });

/** Deterministic fake gradients for step t. */
function grads(params: { value: Float32Array }[], t: number): Float32Array[] {
  return params.map((p, i) => Float32Array.from(p.value, (_, j) => Math.sin(t * 7 + i * 3 + j * 0.37) * 0.1));
}

function setup() {
  const adapter = initLora(llamaSpec, config.lora, config.seed);
  const params = loraParams(adapter);
  const opt = new AdamW(params, { lr: config.learningRate, betas: config.betas, eps: config.eps, weightDecay: config.weightDecay });
  return { adapter, params, opt };
}

function stateAt(s: ReturnType<typeof setup>, step: number, rng: Rng): CheckpointState {
  return {
    step,
    epoch: 0,
    batchIndex: step * 2,
    adapter: s.adapter,
    optimizer: s.opt.state(),
    rng: rngState(rng),
    config,
    metrics: Array.from({ length: step }, (_, i) => ({ step: i + 1, loss: 3 - i * 0.1, lr: 0.01 })),
    extra: { jobId: 'job-1' },
  };
}

test('a checkpoint round-trips adapter, optimizer, RNG, position, config and metrics; resuming equals not stopping', () => {
  const dir = tempDir('ckpt');
  try {
    const straight = setup();
    for (let t = 0; t < 5; t++) straight.opt.step(grads(straight.params, t));

    const first = setup();
    const rng = new Rng(99);
    for (let t = 0; t < 2; t++) first.opt.step(grads(first.params, t));
    rng.nextU32();
    const path = writeCheckpoint(dir, stateAt(first, 2, rng));
    assert.equal(path, join(dir, 'checkpoint-2'));
    const expectedNext = [rng.nextU32(), rng.nextU32()];

    const back = readCheckpoint(latestCheckpoint(dir)!, llamaSpec);
    assert.equal(back.step, 2);
    assert.equal(back.epoch, 0);
    assert.equal(back.batchIndex, 4);
    assert.deepEqual(back.config, config);
    assert.deepEqual(back.metrics, stateAt(first, 2, rng).metrics);
    assert.deepEqual(back.extra, { jobId: 'job-1' });
    assert.deepEqual(back.adapter.modules.map((m) => [m.module, m.a, m.b]), first.adapter.modules.map((m) => [m.module, m.a, m.b]));
    const restoredRng = rngFromState(back.rng!);
    assert.deepEqual([restoredRng.nextU32(), restoredRng.nextU32()], expectedNext);

    // Resume: fresh objects from the checkpoint alone, three more steps.
    const params = loraParams(back.adapter);
    const opt = new AdamW(params, { lr: back.config.learningRate, betas: back.config.betas, eps: back.config.eps, weightDecay: back.config.weightDecay });
    opt.loadState(back.optimizer);
    assert.equal(opt.stepCount, 2);
    for (let t = 2; t < 5; t++) opt.step(grads(params, t));
    params.forEach((p, i) => assert.deepEqual(p.value, straight.params[i]!.value, p.name));

    // The adapter inside is a PEFT adapter as is.
    assert.equal(readPeftAdapter(join(path, 'adapter'), llamaSpec).r, 2);
  } finally {
    removeDir(dir);
  }
});

test('latestCheckpoint picks the highest step; incomplete and temp directories are ignored; keep K prunes', () => {
  const dir = tempDir('ckpt-keep');
  try {
    assert.equal(latestCheckpoint(dir), null);
    assert.equal(latestCheckpoint(join(dir, 'missing')), null);
    const s = setup();
    const rng = new Rng(1);
    for (const step of [9, 10, 2]) writeCheckpoint(dir, stateAt(s, step, rng));
    assert.equal(latestCheckpoint(dir), join(dir, 'checkpoint-10')); // numeric, not lexical
    // A crashed write (temp dir) and a directory without trainer_state.json are not checkpoints.
    mkdirSync(join(dir, '.checkpoint-11.tmp-1-abcd'));
    mkdirSync(join(dir, 'checkpoint-12'));
    writeFileSync(join(dir, 'checkpoint-12', 'optimizer.safetensors'), 'partial');
    assert.equal(latestCheckpoint(dir), join(dir, 'checkpoint-10'));
    assert.deepEqual(listCheckpoints(dir).map((c) => c.step), [2, 9, 10]);

    writeCheckpoint(dir, stateAt(s, 11, rng), { keep: 2 });
    assert.deepEqual(listCheckpoints(dir).map((c) => c.step), [10, 11]);
    assert.ok(!existsSync(join(dir, '.checkpoint-11.tmp-1-abcd')));
    assert.ok(!readdirSync(dir).some((n) => n.startsWith('.')));
    // Rewriting the same step replaces it whole.
    writeCheckpoint(dir, { ...stateAt(s, 11, rng), epoch: 3 });
    assert.equal(readCheckpoint(join(dir, 'checkpoint-11')).epoch, 3);
    pruneCheckpoints(dir, 1);
    assert.deepEqual(listCheckpoints(dir).map((c) => c.step), [11]);
    assert.throws(() => readCheckpoint(join(dir, 'checkpoint-12')), /trainer_state.json is missing/);
  } finally {
    removeDir(dir);
  }
});

test('a failed write leaves no checkpoint and no temp directory', () => {
  const dir = tempDir('ckpt-fail');
  try {
    const s = setup();
    const state = stateAt(s, 3, new Rng(1));
    state.optimizer.expAvgSq.delete(loraParams(s.adapter)[0]!.name);
    assert.throws(() => writeCheckpoint(dir, state), /has no exp_avg_sq/);
    assert.deepEqual(readdirSync(dir), []);
    assert.equal(latestCheckpoint(dir), null);
  } finally {
    removeDir(dir);
  }
});
