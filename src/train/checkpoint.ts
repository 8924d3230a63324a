import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { readPeftAdapter, writePeftAdapter, type PeftAdapter } from '../adapters/peft.js';
import { writeDirAtomic } from '../files/atomic-dir.js';
import { SafetensorsSource, writeFileAtomic, writeSafetensors, type TensorToWrite } from '../models/safetensors.js';
import type { ModelSpec } from '../models/spec.js';
import { Rng } from '../sampling/rng.js';
import type { TrainConfig } from './config.js';
import type { AdamWState } from './optimizer.js';

/**
 * Training checkpoints, one directory per optimizer step, as transformers names them:
 *
 *   <jobDir>/checkpoint-<step>/
 *     adapter/                  a PEFT adapter (adapter_config.json + adapter_model.safetensors): servable as is
 *     optimizer.safetensors     <param>.exp_avg, <param>.exp_avg_sq (F32)
 *     trainer_state.json        step, data position, optimizer step, RNG state, config, metrics history, extra
 *
 * A checkpoint is built in a dot-prefixed temp directory and renamed into place, so a crash leaves either
 * the whole checkpoint or none; readers ignore dot-directories and ones without trainer_state.json.
 */

export const CHECKPOINT_FORMAT = 1;
const STATE_FILE = 'trainer_state.json';
const OPTIMIZER_FILE = 'optimizer.safetensors';
const ADAPTER_DIR = 'adapter';
const DIR_RE = /^checkpoint-(\d+)$/;

/** xoshiro128** state words. */
export type RngState = [number, number, number, number];

/** One metrics record (loss, lr, grad_norm, eval_loss, tokens/s ...) at an optimizer step. */
export interface MetricsRecord {
  step: number;
  [metric: string]: number | string | null;
}

export interface CheckpointState {
  /** Optimizer steps done. */
  step: number;
  /** Data position of the next micro-batch to run. */
  epoch: number;
  batchIndex: number;
  adapter: PeftAdapter;
  optimizer: AdamWState;
  rng: RngState | null;
  config: TrainConfig;
  metrics: MetricsRecord[];
  /** Anything else the job wants back on resume (ids, data stats); JSON. */
  extra?: Record<string, unknown>;
}

/** The generator's state. Rng keeps its words private; this reads them by name (checked by a round-trip test). */
export function rngState(rng: Rng): RngState {
  const r = rng as unknown as Record<string, unknown>;
  const s = [r['s0'], r['s1'], r['s2'], r['s3']];
  if (!s.every((x) => typeof x === 'number')) throw new Error('rngState: Rng no longer exposes s0..s3');
  return s as RngState;
}

export function rngFromState(s: RngState): Rng {
  return Rng.fromState(s[0], s[1], s[2], s[3]);
}

export const checkpointDirName = (step: number): string => `checkpoint-${step}`;
export const isCheckpointDir = (name: string): boolean => DIR_RE.test(name);

/**
 * Writes checkpoint-<step> atomically into jobDir (replacing one of the same step), then keeps only the
 * newest `keep` checkpoints (when given). Returns the checkpoint directory.
 */
export function writeCheckpoint(jobDir: string, state: CheckpointState, opts: { keep?: number } = {}): string {
  if (!Number.isSafeInteger(state.step) || state.step < 0) throw new Error(`writeCheckpoint: bad step ${state.step}`);
  mkdirSync(jobDir, { recursive: true });
  const name = checkpointDirName(state.step);
  const final = join(jobDir, name);
  // Temp and replaced checkpoints are `.checkpoint-<step>.{tmp,old}-*` beside it: pruneCheckpoints sweeps them.
  writeDirAtomic(
    final,
    (tmp) => {
      writePeftAdapter(join(tmp, ADAPTER_DIR), state.adapter);
      const tensors: TensorToWrite[] = [];
      for (const [param, m] of state.optimizer.expAvg) {
        const v = state.optimizer.expAvgSq.get(param);
        if (!v) throw new Error(`writeCheckpoint: optimizer state of ${param} has no exp_avg_sq`);
        tensors.push({ name: `${param}.exp_avg`, shape: [m.length], data: m }, { name: `${param}.exp_avg_sq`, shape: [v.length], data: v });
      }
      writeSafetensors(join(tmp, OPTIMIZER_FILE), tensors, 'F32', { format: 'pt' });
      const json = {
        format: CHECKPOINT_FORMAT,
        step: state.step,
        epoch: state.epoch,
        batchIndex: state.batchIndex,
        optimizerStep: state.optimizer.step,
        rng: state.rng,
        config: state.config,
        metrics: state.metrics,
        extra: state.extra ?? {},
      };
      writeFileAtomic(join(tmp, STATE_FILE), JSON.stringify(json, null, 1) + '\n');
    },
    { replace: true, syncDirs: [jobDir] },
  );
  if (opts.keep !== undefined) pruneCheckpoints(jobDir, opts.keep);
  return final;
}

/** Complete checkpoints in jobDir, oldest first. */
export function listCheckpoints(jobDir: string): { step: number; dir: string }[] {
  if (!existsSync(jobDir)) return [];
  const out: { step: number; dir: string }[] = [];
  for (const e of readdirSync(jobDir, { withFileTypes: true })) {
    const m = DIR_RE.exec(e.name);
    if (!m || !e.isDirectory()) continue;
    const dir = join(jobDir, e.name);
    if (existsSync(join(dir, STATE_FILE))) out.push({ step: Number(m[1]), dir });
  }
  return out.sort((a, b) => a.step - b.step);
}

/** The newest complete checkpoint's directory, or null. */
export function latestCheckpoint(jobDir: string): string | null {
  const all = listCheckpoints(jobDir);
  return all.length > 0 ? all[all.length - 1]!.dir : null;
}

/** Deletes all but the newest `keep` checkpoints, and temp directories left by a crash. */
export function pruneCheckpoints(jobDir: string, keep: number): void {
  if (!Number.isSafeInteger(keep) || keep < 1) throw new Error(`pruneCheckpoints: keep must be >= 1, got ${keep}`);
  const all = listCheckpoints(jobDir);
  for (const c of all.slice(0, Math.max(0, all.length - keep))) rmSync(c.dir, { recursive: true, force: true });
  for (const name of readdirSync(jobDir)) {
    // One job writes one jobDir at a time, so a temp directory here is a crashed write.
    if (/^\.checkpoint-\d+\.(tmp|old)-/.test(name)) rmSync(join(jobDir, name), { recursive: true, force: true });
  }
}

/** Reads a checkpoint directory; with a spec the adapter must fit the model. */
export function readCheckpoint(dir: string, spec?: ModelSpec): CheckpointState {
  const statePath = join(dir, STATE_FILE);
  if (!existsSync(statePath) || !statSync(dir).isDirectory()) throw new Error(`checkpoint ${dir}: ${STATE_FILE} is missing`);
  let j: Record<string, unknown>;
  try {
    j = JSON.parse(readFileSync(statePath, 'utf8')) as Record<string, unknown>;
  } catch (e) {
    throw new Error(`checkpoint ${dir}: ${STATE_FILE} is not valid JSON (${(e as Error).message})`);
  }
  if (j['format'] !== CHECKPOINT_FORMAT) throw new Error(`checkpoint ${dir}: format ${String(j['format'])}, expected ${CHECKPOINT_FORMAT}`);
  const int = (k: string): number => {
    const v = j[k];
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) throw new Error(`checkpoint ${dir}: ${k} ${JSON.stringify(v)} is not a step count`);
    return v;
  };
  const adapter = readPeftAdapter(join(dir, ADAPTER_DIR), spec);
  const src = new SafetensorsSource([join(dir, OPTIMIZER_FILE)]);
  const expAvg = new Map<string, Float32Array>();
  const expAvgSq = new Map<string, Float32Array>();
  for (const name of src.names()) {
    const m = /^(.+)\.(exp_avg|exp_avg_sq)$/.exec(name);
    if (!m) throw new Error(`checkpoint ${dir}: unexpected optimizer tensor ${name}`);
    (m[2] === 'exp_avg' ? expAvg : expAvgSq).set(m[1]!, src.get(name).data);
  }
  const rng = j['rng'];
  if (rng !== null && !(Array.isArray(rng) && rng.length === 4 && rng.every((x) => Number.isInteger(x)))) {
    throw new Error(`checkpoint ${dir}: rng ${JSON.stringify(rng)} is not 4 state words`);
  }
  return {
    step: int('step'),
    epoch: int('epoch'),
    batchIndex: int('batchIndex'),
    adapter,
    optimizer: { step: int('optimizerStep'), expAvg, expAvgSq },
    rng: rng as RngState | null,
    config: j['config'] as TrainConfig,
    metrics: (j['metrics'] ?? []) as MetricsRecord[],
    extra: (j['extra'] ?? {}) as Record<string, unknown>,
  };
}
