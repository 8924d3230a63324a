import { invalidArgument } from '../errors.js';
import { linearModules, loraModuleNames } from '../models/families/index.js';
import type { ModelSpec } from '../models/spec.js';

/**
 * A training job's settings: LoRA as PEFT's LoraConfig, hyper-parameters as transformers'
 * TrainingArguments (names kept where they exist), validated into a TrainConfig with every default filled.
 * Messages use the snake_case field names of the request (`learning_rate 0: must be in (0, 1]`).
 */

export const SCHEDULES = ['constant', 'linear', 'cosine'] as const;
export type ScheduleKind = (typeof SCHEDULES)[number];

/** What a request may set; undefined (or null) takes the default. */
export interface TrainConfigInput {
  r?: number | null;
  loraAlpha?: number | null;
  loraDropout?: number | null;
  /** PEFT names (q_proj, c_attn, ...) or 'all-linear' (as a string or a list entry). Empty: PEFT's default for the family. */
  targetModules?: readonly string[] | string | null;
  useRslora?: boolean | null;

  learningRate?: number | null;
  adamBeta1?: number | null;
  adamBeta2?: number | null;
  adamEpsilon?: number | null;
  weightDecay?: number | null;
  lrSchedulerType?: string | null;
  warmupSteps?: number | null;
  warmupRatio?: number | null;
  /** 0 turns clipping off. */
  maxGradNorm?: number | null;

  microBatchSize?: number | null;
  gradientAccumulationSteps?: number | null;
  numEpochs?: number | null;
  /** > 0 overrides num_epochs (as transformers' max_steps). */
  maxSteps?: number | null;
  maxSeqLength?: number | null;
  seed?: number | bigint | null;

  /** Fraction of the packed sequences held out for evaluation (0: none, or a separate eval set). */
  evalFraction?: number | null;
  /** Evaluate every N optimizer steps (0: only at the end). */
  evalEvery?: number | null;
  /** Checkpoint every N optimizer steps (0: never; the final adapter is still written). */
  checkpointEvery?: number | null;
  /** Checkpoints kept on disk (the oldest go first). */
  keepCheckpoints?: number | null;
  /** Recompute each decoder layer in the backward pass instead of keeping its activations (default on). */
  gradientCheckpointing?: boolean | null;
  /** The frozen base's forward through the prepacked MatMulNBits kernel (faster, a prepacked copy in memory). */
  prepackedForward?: boolean | null;
}

export interface LoraSettings {
  r: number;
  loraAlpha: number;
  loraDropout: number;
  /** Expanded PEFT names in the model's order; 'all-linear' becomes every linear name. */
  targetModules: string[];
  useRslora: boolean;
}

export interface TrainConfig {
  lora: LoraSettings;
  learningRate: number;
  betas: [number, number];
  eps: number;
  weightDecay: number;
  schedule: ScheduleKind;
  warmupSteps: number;
  warmupRatio: number;
  maxGradNorm: number;
  microBatchSize: number;
  gradientAccumulationSteps: number;
  numEpochs: number;
  maxSteps: number;
  maxSeqLength: number;
  seed: number;
  evalFraction: number;
  evalEvery: number;
  checkpointEvery: number;
  keepCheckpoints: number;
  /** Absent in job records written before the setting existed: read as on. */
  gradientCheckpointing: boolean;
  prepackedForward: boolean;
}

export interface TrainLimits {
  spec: ModelSpec;
  maxLoraRank: number;
  /** Serving's max_model_len; max_seq_length may not exceed it (nor the model's positions). */
  maxModelLen?: number;
  /** Default 64. */
  maxMicroBatchSize?: number;
  /** micro_batch_size * max_seq_length, the activations one step holds. Default 65536. */
  maxBatchTokens?: number;
  /** Default 1,000,000. */
  maxTrainSteps?: number;
}

/** PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING for the families served. */
export const DEFAULT_TARGET_MODULES: Record<ModelSpec['family'], readonly string[]> = {
  llama: ['q_proj', 'v_proj'],
  gpt2: ['c_attn'],
};

export const TRAIN_DEFAULTS = {
  r: 8, // PEFT
  loraAlpha: 8, // PEFT
  loraDropout: 0, // PEFT
  learningRate: 2e-4, // the QLoRA paper's setting for small models
  adamBeta1: 0.9,
  adamBeta2: 0.999,
  adamEpsilon: 1e-8,
  weightDecay: 0, // transformers (torch's AdamW default is 0.01)
  lrSchedulerType: 'linear' as ScheduleKind, // transformers
  maxGradNorm: 1, // transformers
  microBatchSize: 4,
  gradientAccumulationSteps: 1,
  numEpochs: 1,
  maxSeqLength: 512,
  seed: 42, // transformers
  evalFraction: 0,
  evalEvery: 0,
  checkpointEvery: 0,
  keepCheckpoints: 2,
  gradientCheckpointing: true, // as QLoRA recipes (transformers' own default is off)
  prepackedForward: false, // memory first: the prepacked copy is +0.5 GB on the 1.1B shape
};

type Interval = { lo: number; hi: number; loOpen?: boolean; hiOpen?: boolean };

const fmt = (v: unknown): string => (typeof v === 'string' ? JSON.stringify(v) : typeof v === 'bigint' ? v.toString() : String(v));
const showInterval = (iv: Interval): string => `${iv.loOpen ? '(' : '['}${iv.lo}, ${iv.hi}${iv.hiOpen ? ')' : ']'}`;

function num(field: string, v: unknown, def: number, iv: Interval, integer = false): number {
  if (v === undefined || v === null) return def;
  // proto int64 fields arrive as bigint.
  if (typeof v === 'bigint' && integer && v >= BigInt(Number.MIN_SAFE_INTEGER) && v <= BigInt(Number.MAX_SAFE_INTEGER)) v = Number(v);
  const kind = integer ? 'an integer' : 'a number';
  if (typeof v !== 'number' || !Number.isFinite(v) || (integer && !Number.isSafeInteger(v))) {
    throw invalidArgument(`${field} ${fmt(v)}: must be ${kind} in ${showInterval(iv)}`);
  }
  const below = iv.loOpen ? v <= iv.lo : v < iv.lo;
  const above = iv.hiOpen ? v >= iv.hi : v > iv.hi;
  if (below || above) throw invalidArgument(`${field} ${fmt(v)}: must be ${integer ? 'an integer ' : ''}in ${showInterval(iv)}`);
  return v;
}

function bool(field: string, v: unknown, def: boolean): boolean {
  if (v === undefined || v === null) return def;
  if (typeof v !== 'boolean') throw invalidArgument(`${field} ${fmt(v)}: must be true or false`);
  return v;
}

/** The LoRA-able linear names of this model, in forward order (gpt2's c_proj is both attn and mlp). */
export function validTargetModules(spec: ModelSpec): string[] {
  const present = new Set(linearModules(spec).map((l) => l.peftName));
  return loraModuleNames(spec.family).filter((n) => present.has(n));
}

function targetModules(v: TrainConfigInput['targetModules'], spec: ModelSpec): string[] {
  const valid = validTargetModules(spec);
  let names: string[];
  if (v === undefined || v === null || (Array.isArray(v) && v.length === 0)) names = [...DEFAULT_TARGET_MODULES[spec.family]];
  else if (typeof v === 'string') names = [v];
  else if (Array.isArray(v)) names = [...(v as readonly unknown[])] as string[];
  else throw invalidArgument(`target_modules ${fmt(v)}: must be a list of module names or "all-linear"`);
  for (const n of names) {
    if (typeof n !== 'string') throw invalidArgument(`target_modules: ${fmt(n)} is not a module name`);
    if (n !== 'all-linear' && !valid.includes(n)) {
      throw invalidArgument(`target_modules: ${JSON.stringify(n)} is not a linear of this ${spec.modelType} model; valid: ${valid.join(', ')}, all-linear`);
    }
  }
  if (names.includes('all-linear')) return valid;
  // PEFT keeps a set; the model's order makes the saved config stable.
  return valid.filter((n) => names.includes(n));
}

function seed(v: TrainConfigInput['seed']): number {
  if (v === undefined || v === null) return TRAIN_DEFAULTS.seed;
  const n = typeof v === 'bigint' ? (v <= BigInt(Number.MAX_SAFE_INTEGER) && v >= 0n ? Number(v) : NaN) : v;
  if (typeof n !== 'number' || !Number.isSafeInteger(n) || n < 0) {
    throw invalidArgument(`seed ${fmt(v)}: must be an integer in [0, ${Number.MAX_SAFE_INTEGER}]`);
  }
  return n;
}

/** Request fields -> TrainConfig with defaults; the first bad field throws INVALID_ARGUMENT naming it and its limit. */
export function validateTrainConfig(input: TrainConfigInput, limits: TrainLimits): TrainConfig {
  const { spec } = limits;
  const d = TRAIN_DEFAULTS;
  const maxMicro = limits.maxMicroBatchSize ?? 64;
  const maxBatchTokens = limits.maxBatchTokens ?? 65536;
  const maxSteps = limits.maxTrainSteps ?? 1_000_000;
  const maxLen = Math.min(spec.maxPositions, limits.maxModelLen ?? Infinity);

  const rRaw = input.r;
  if (typeof rRaw === 'number' && Number.isSafeInteger(rRaw) && rRaw > limits.maxLoraRank) {
    throw invalidArgument(`r ${rRaw}: exceeds maxLoraRank ${limits.maxLoraRank}`);
  }
  const r = num('r', rRaw, Math.min(d.r, limits.maxLoraRank), { lo: 1, hi: limits.maxLoraRank }, true);
  const lora: LoraSettings = {
    r,
    loraAlpha: num('lora_alpha', input.loraAlpha, d.loraAlpha, { lo: 0, hi: 65536, loOpen: true }),
    loraDropout: num('lora_dropout', input.loraDropout, d.loraDropout, { lo: 0, hi: 1, hiOpen: true }),
    targetModules: targetModules(input.targetModules, spec),
    useRslora: bool('use_rslora', input.useRslora, false),
  };

  const learningRate = num('learning_rate', input.learningRate, d.learningRate, { lo: 0, hi: 1, loOpen: true });
  const b1 = num('adam_beta1', input.adamBeta1, d.adamBeta1, { lo: 0, hi: 1, hiOpen: true });
  const b2 = num('adam_beta2', input.adamBeta2, d.adamBeta2, { lo: 0, hi: 1, hiOpen: true });
  const eps = num('adam_epsilon', input.adamEpsilon, d.adamEpsilon, { lo: 0, hi: 1, loOpen: true });
  const weightDecay = num('weight_decay', input.weightDecay, d.weightDecay, { lo: 0, hi: 1 });

  const sched = input.lrSchedulerType ?? d.lrSchedulerType;
  // '' is proto's unset string.
  const schedule = (sched === '' ? d.lrSchedulerType : sched) as ScheduleKind;
  if (!SCHEDULES.includes(schedule)) throw invalidArgument(`lr_scheduler_type ${fmt(sched)}: must be one of ${SCHEDULES.join(', ')}`);

  const microBatchSize = num('micro_batch_size', input.microBatchSize, Math.min(d.microBatchSize, maxMicro), { lo: 1, hi: maxMicro }, true);
  const gradientAccumulationSteps = num('gradient_accumulation_steps', input.gradientAccumulationSteps, d.gradientAccumulationSteps, { lo: 1, hi: 1024 }, true);
  const numEpochs = num('num_epochs', input.numEpochs, d.numEpochs, { lo: 1, hi: 1000 }, true);
  const steps = num('max_steps', input.maxSteps, 0, { lo: 0, hi: maxSteps }, true);
  const maxSeqLength = num('max_seq_length', input.maxSeqLength, Math.min(d.maxSeqLength, maxLen), { lo: 2, hi: maxLen }, true);
  if (microBatchSize * maxSeqLength > maxBatchTokens) {
    throw invalidArgument(`micro_batch_size * max_seq_length ${microBatchSize} * ${maxSeqLength}: exceeds the limit of ${maxBatchTokens} tokens per micro-batch`);
  }

  const warmupSteps = num('warmup_steps', input.warmupSteps, 0, { lo: 0, hi: maxSteps }, true);
  const warmupRatio = num('warmup_ratio', input.warmupRatio, 0, { lo: 0, hi: 1, hiOpen: true });
  // transformers lets warmup_steps silently win; two contradicting settings are more likely a mistake.
  if (warmupSteps > 0 && warmupRatio > 0) throw invalidArgument(`warmup_steps ${warmupSteps} and warmup_ratio ${warmupRatio}: set at most one`);

  const evalEvery = num('eval_every', input.evalEvery, d.evalEvery, { lo: 0, hi: maxSteps }, true);
  const checkpointEvery = num('checkpoint_every', input.checkpointEvery, d.checkpointEvery, { lo: 0, hi: maxSteps }, true);

  return {
    lora,
    learningRate,
    betas: [b1, b2],
    eps,
    weightDecay,
    schedule,
    warmupSteps,
    warmupRatio,
    maxGradNorm: num('max_grad_norm', input.maxGradNorm, d.maxGradNorm, { lo: 0, hi: 1e6 }),
    microBatchSize,
    gradientAccumulationSteps,
    numEpochs,
    maxSteps: steps,
    maxSeqLength,
    seed: seed(input.seed),
    evalFraction: num('eval_fraction', input.evalFraction, d.evalFraction, { lo: 0, hi: 0.5 }),
    evalEvery,
    checkpointEvery,
    keepCheckpoints: num('keep_checkpoints', input.keepCheckpoints, d.keepCheckpoints, { lo: 1, hi: 100 }, true),
    gradientCheckpointing: bool('gradient_checkpointing', input.gradientCheckpointing, d.gradientCheckpointing),
    prepackedForward: bool('prepacked_forward', input.prepackedForward, d.prepackedForward),
  };
}
