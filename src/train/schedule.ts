import type { ScheduleKind } from './config.js';

/**
 * Learning-rate schedules as transformers' get_{constant,linear,cosine}_schedule_with_warmup (LambdaLR).
 * `step` is the 0-based index of the optimizer step about to run: LambdaLR applies lambda(0) to the first
 * optimizer.step(), so with warm-up the very first update uses lr 0, exactly as transformers does.
 */

export interface ScheduleOptions {
  schedule: ScheduleKind;
  baseLr: number;
  warmupSteps: number;
  /** num_training_steps: the linear schedule reaches 0 here. */
  totalSteps: number;
}

/** transformers' lr_lambda; the multiplier of the base learning rate. */
export function lrMultiplier(step: number, schedule: ScheduleKind, warmupSteps: number, totalSteps: number): number {
  if (step < warmupSteps) return step / Math.max(1, warmupSteps);
  switch (schedule) {
    case 'constant':
      return 1;
    case 'linear':
      return Math.max(0, (totalSteps - step) / Math.max(1, totalSteps - warmupSteps));
    case 'cosine': {
      // num_cycles = 0.5: half a cosine from 1 down to 0.
      const progress = (step - warmupSteps) / Math.max(1, totalSteps - warmupSteps);
      return Math.max(0, 0.5 * (1 + Math.cos(Math.PI * 0.5 * 2 * progress)));
    }
  }
}

export function lrAt(step: number, opts: ScheduleOptions): number {
  return opts.baseLr * lrMultiplier(step, opts.schedule, opts.warmupSteps, opts.totalSteps);
}

/** transformers' TrainingArguments.get_warmup_steps: warmup_steps if set, else ceil(ratio * total). */
export function warmupStepsFor(warmupSteps: number, warmupRatio: number, totalSteps: number): number {
  return warmupSteps > 0 ? warmupSteps : Math.ceil(totalSteps * warmupRatio);
}
