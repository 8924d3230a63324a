import assert from 'node:assert/strict';
import { test } from 'node:test';
import { validateTrainConfig, validTargetModules, type TrainConfigInput } from '../../src/train/config.js';
import { gpt2Spec, llamaSpec, loraplexError } from './train-fixtures.js';

const limits = { spec: llamaSpec, maxLoraRank: 16 };
const bad = (input: TrainConfigInput, message: string | RegExp, lim = limits) =>
  assert.throws(() => validateTrainConfig(input, lim), loraplexError('INVALID_ARGUMENT', message));

test('defaults: PEFT LoRA (r 8, alpha 8, q_proj + v_proj), transformers-like hyper-parameters', () => {
  const c = validateTrainConfig({}, limits);
  assert.deepEqual(c.lora, { r: 8, loraAlpha: 8, loraDropout: 0, targetModules: ['q_proj', 'v_proj'], useRslora: false });
  assert.equal(c.learningRate, 2e-4);
  assert.deepEqual(c.betas, [0.9, 0.999]);
  assert.equal(c.eps, 1e-8);
  assert.equal(c.weightDecay, 0);
  assert.equal(c.schedule, 'linear');
  assert.equal(c.maxGradNorm, 1);
  assert.equal(c.maxSeqLength, 512); // stories260K's max_position_embeddings
  assert.equal(c.seed, 42);
  assert.equal(c.maxSteps, 0);
  assert.equal(c.numEpochs, 1);
  assert.equal(c.gradientCheckpointing, true); // as QLoRA recipes
  assert.equal(c.prepackedForward, false); // memory first
  // null (an unset proto optional) is a default too.
  assert.deepEqual(validateTrainConfig({ r: null, learningRate: null, targetModules: [] }, limits), c);
  assert.deepEqual(validateTrainConfig({}, { spec: gpt2Spec, maxLoraRank: 4 }).lora.targetModules, ['c_attn']);
  assert.equal(validateTrainConfig({}, { spec: gpt2Spec, maxLoraRank: 4 }).lora.r, 4);
});

test('set fields are kept; all-linear expands to every linear in model order', () => {
  const c = validateTrainConfig(
    {
      r: 16, loraAlpha: 32, loraDropout: 0.05, targetModules: ['down_proj', 'q_proj', 'q_proj'], useRslora: true,
      learningRate: 1e-3, adamBeta1: 0.8, adamBeta2: 0.95, adamEpsilon: 1e-6, weightDecay: 0.01, lrSchedulerType: 'cosine',
      warmupRatio: 0.1, maxGradNorm: 0, microBatchSize: 2, gradientAccumulationSteps: 4, numEpochs: 3, maxSteps: 100,
      maxSeqLength: 128, seed: 7n, evalFraction: 0.1, evalEvery: 10, checkpointEvery: 20, keepCheckpoints: 3, gradientCheckpointing: false,
      prepackedForward: true,
    },
    limits,
  );
  assert.deepEqual(c.lora, { r: 16, loraAlpha: 32, loraDropout: 0.05, targetModules: ['q_proj', 'down_proj'], useRslora: true });
  assert.equal(c.schedule, 'cosine');
  assert.equal(c.seed, 7);
  assert.equal(c.gradientAccumulationSteps, 4);
  assert.equal(c.warmupRatio, 0.1);
  assert.equal(c.gradientCheckpointing, false);
  assert.equal(c.prepackedForward, true);
  assert.equal(validateTrainConfig({ maxSteps: 50n as unknown as number }, limits).maxSteps, 50); // proto int64
  assert.deepEqual(validateTrainConfig({ targetModules: 'all-linear' }, limits).lora.targetModules, validTargetModules(llamaSpec));
  assert.deepEqual(validTargetModules(llamaSpec), ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']);
  assert.deepEqual(validateTrainConfig({ targetModules: ['all-linear'] }, { spec: gpt2Spec, maxLoraRank: 8 }).lora.targetModules, ['c_attn', 'c_proj', 'c_fc']);
});

test('every bad field names itself and its limit', () => {
  bad({ learningRate: 0 }, 'learning_rate 0: must be in (0, 1]');
  bad({ learningRate: 2 }, 'learning_rate 2: must be in (0, 1]');
  bad({ learningRate: Number.NaN }, 'learning_rate NaN: must be a number in (0, 1]');
  bad({ r: 64 }, 'r 64: exceeds maxLoraRank 16');
  bad({ r: 0 }, 'r 0: must be an integer in [1, 16]');
  bad({ r: 2.5 }, 'r 2.5: must be an integer in [1, 16]');
  bad({ targetModules: ['q_proj', 'foo'] }, 'target_modules: "foo" is not a linear of this llama model; valid: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, all-linear');
  assert.throws(
    () => validateTrainConfig({ targetModules: ['q_proj'] }, { spec: gpt2Spec, maxLoraRank: 8 }),
    loraplexError('INVALID_ARGUMENT', 'target_modules: "q_proj" is not a linear of this gpt2 model; valid: c_attn, c_proj, c_fc, all-linear'),
  );
  bad({ loraAlpha: 0 }, 'lora_alpha 0: must be in (0, 65536]');
  bad({ loraDropout: 1 }, 'lora_dropout 1: must be in [0, 1)');
  bad({ useRslora: 'yes' as unknown as boolean }, 'use_rslora "yes": must be true or false');
  bad({ gradientCheckpointing: 1 as unknown as boolean }, 'gradient_checkpointing 1: must be true or false');
  bad({ prepackedForward: 'yes' as unknown as boolean }, 'prepacked_forward "yes": must be true or false');
  bad({ adamBeta1: 1 }, 'adam_beta1 1: must be in [0, 1)');
  bad({ adamBeta2: -0.1 }, 'adam_beta2 -0.1: must be in [0, 1)');
  bad({ adamEpsilon: 0 }, 'adam_epsilon 0: must be in (0, 1]');
  bad({ weightDecay: 2 }, 'weight_decay 2: must be in [0, 1]');
  bad({ lrSchedulerType: 'polynomial' }, 'lr_scheduler_type "polynomial": must be one of constant, linear, cosine');
  bad({ warmupSteps: -1 }, 'warmup_steps -1: must be an integer in [0, 1000000]');
  bad({ warmupRatio: 1 }, 'warmup_ratio 1: must be in [0, 1)');
  bad({ warmupSteps: 10, warmupRatio: 0.1 }, 'warmup_steps 10 and warmup_ratio 0.1: set at most one');
  bad({ maxGradNorm: -1 }, 'max_grad_norm -1: must be in [0, 1000000]');
  bad({ microBatchSize: 0 }, 'micro_batch_size 0: must be an integer in [1, 64]');
  bad({ microBatchSize: 65 }, 'micro_batch_size 65: must be an integer in [1, 64]');
  bad({ gradientAccumulationSteps: 0 }, 'gradient_accumulation_steps 0: must be an integer in [1, 1024]');
  bad({ numEpochs: 0 }, 'num_epochs 0: must be an integer in [1, 1000]');
  bad({ maxSteps: 2_000_000 }, 'max_steps 2000000: must be an integer in [0, 1000000]');
  bad({ maxSeqLength: 1024 }, 'max_seq_length 1024: must be an integer in [2, 512]');
  bad({ maxSeqLength: 300 }, 'max_seq_length 300: must be an integer in [2, 256]', { ...limits, maxModelLen: 256 } as typeof limits);
  bad({ microBatchSize: 64, maxSeqLength: 512 }, 'micro_batch_size * max_seq_length 64 * 512: exceeds the limit of 16384 tokens per micro-batch', { ...limits, maxBatchTokens: 16384 } as typeof limits);
  bad({ seed: -1 }, `seed -1: must be an integer in [0, ${Number.MAX_SAFE_INTEGER}]`);
  bad({ seed: 2n ** 60n }, `seed 1152921504606846976: must be an integer in [0, ${Number.MAX_SAFE_INTEGER}]`);
  bad({ evalFraction: 0.9 }, 'eval_fraction 0.9: must be in [0, 0.5]');
  bad({ evalEvery: -5 }, 'eval_every -5: must be an integer in [0, 1000000]');
  bad({ checkpointEvery: 1.5 }, 'checkpoint_every 1.5: must be an integer in [0, 1000000]');
  bad({ keepCheckpoints: 0 }, 'keep_checkpoints 0: must be an integer in [1, 100]');
});
