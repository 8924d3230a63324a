import { invalidArgument } from '../errors.js';
import { frobeniusNorm, type LoraModuleInfo } from '../models/graph.js';
import type { PeftAdapter } from './peft.js';

/**
 * The largest LoRA effect an adapter may have on a module, as a multiple of that module's base weight:
 *
 *   ||scaling * B @ A||_F  <=  MAX_EFFECT_RATIO * ||W||_F     (and finite)
 *
 * where scaling is lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), A = lora_A [r, in], B = lora_B [out, r]
 * and W [out, in] is the base model's (unquantized) weight of the module. Fine-tuning nudges a model: trained
 * adapters change a weight by a small fraction of its norm. The deliberately strong random adapters of the tests
 * (lora_B std 0.3-0.5 on the tiny stories260K model) reach about 4-8 times, so the limit leaves them a wide
 * margin; an adapter a hundred times stronger than the layer it adapts only drowns the base model and, at the
 * extreme (lora_B of 3e38, lora_alpha of 1e30), overflows float32 into NaN or Inf logits. Such adapters are
 * refused when read, as non-finite tensors already are.
 * Where the base norm is unknown only finiteness is checked.
 */
export const MAX_EFFECT_RATIO = 100;

export interface AbsurdEffect {
  module: string;
  /** ||scaling * B @ A||_F (may be Infinity). */
  effect: number;
  /** ||W||_F of the base weight, or null when unknown. */
  baseNorm: number | null;
}

/**
 * ||scaling * B @ A||_F, exactly: ||BA||_F^2 = trace(A^T B^T B A) = sum_ij (B^T B)_ij (A A^T)_ij, two r x r Gram
 * matrices in O((in + out) r^2), in float64 (huge float32 values square without overflow).
 */
export function loraEffectNorm(a: Float32Array, b: Float32Array, r: number, scaling: number): number {
  const inF = a.length / r;
  const outF = b.length / r;
  const gramA = new Float64Array(r * r);
  const gramB = new Float64Array(r * r);
  for (let i = 0; i < r; i++) {
    for (let j = i; j < r; j++) {
      let s = 0;
      for (let k = 0; k < inF; k++) s += a[i * inF + k]! * a[j * inF + k]!;
      gramA[i * r + j] = s;
    }
  }
  for (let o = 0; o < outF; o++) {
    const row = o * r;
    for (let i = 0; i < r; i++) {
      const bi = b[row + i]!;
      for (let j = i; j < r; j++) gramB[i * r + j]! += bi * b[row + j]!;
    }
  }
  let sum = 0;
  for (let i = 0; i < r; i++) {
    for (let j = i; j < r; j++) sum += (i === j ? 1 : 2) * gramA[i * r + j]! * gramB[i * r + j]!;
  }
  return Math.abs(scaling) * Math.sqrt(Math.max(0, sum));
}

/** Each module's ||A||_F^2 and ||B||_F^2 (float64), when the reader summed them while decoding. */
export type SumSquares = ReadonlyMap<string, { a: number; b: number }>;

/**
 * The first module whose effect breaks the bound (see MAX_EFFECT_RATIO), or null. Pure. `sums` (the decode's sums
 * of squares) saves the cheap bound its own pass over the tensors.
 */
export function firstAbsurdEffect(adapter: Pick<PeftAdapter, 'scaling' | 'modules'>, served: readonly LoraModuleInfo[], sums?: SumSquares): AbsurdEffect | null {
  const baseNorms = new Map(served.map((m) => [m.module, m.baseNorm ?? null]));
  for (const m of adapter.modules) {
    const baseNorm = baseNorms.get(m.module) ?? null;
    const limit = baseNorm === null ? Infinity : MAX_EFFECT_RATIO * baseNorm;
    // ||BA||_F <= ||B||_F ||A||_F: the O((in + out) r) bound clears ordinary adapters without the Gram matrices.
    const known = sums?.get(m.module);
    const cheap = Math.abs(adapter.scaling) * (known ? Math.sqrt(known.a) * Math.sqrt(known.b) : frobeniusNorm(m.a) * frobeniusNorm(m.b));
    if (Number.isFinite(cheap) && cheap <= limit) continue;
    const effect = loraEffectNorm(m.a, m.b, m.r, adapter.scaling);
    if (!Number.isFinite(effect) || effect > limit) return { module: m.module, effect, baseNorm };
  }
  return null;
}

/** INVALID_ARGUMENT naming `name`, the module and the figures when the adapter breaks the bound. */
export function checkLoraEffect(name: string, adapter: Pick<PeftAdapter, 'scaling' | 'modules'>, served: readonly LoraModuleInfo[], sums?: SumSquares): void {
  const bad = firstAbsurdEffect(adapter, served, sums);
  if (!bad) return;
  const fig = (x: number) => x.toPrecision(3);
  const against = bad.baseNorm === null ? '' : `, ${fig(bad.effect / bad.baseNorm)} times the base weight's ||W||_F = ${fig(bad.baseNorm)} (limit ${MAX_EFFECT_RATIO} times)`;
  throw invalidArgument(`${name}: module ${bad.module}: the adapter's effect ||scaling * lora_B @ lora_A||_F = ${fig(bad.effect)}${against}; lower lora_alpha or the weights`);
}
