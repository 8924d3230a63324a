/**
 * AdamW as torch.optim.AdamW (amsgrad off, maximize off): decoupled weight decay, bias-corrected moments.
 * Parameters and moments are float32 (as the LoRA tensors are); each element's update is computed in
 * float64 and rounded once.
 */

export interface NamedParam {
  /** Unique name, e.g. `model.layers.0.self_attn.q_proj.lora_A`. */
  name: string;
  /** Updated in place. */
  value: Float32Array;
}

export interface AdamWOptions {
  lr: number;
  betas: [number, number];
  eps: number;
  weightDecay: number;
}

/** What a checkpoint stores: the step count and both moments per parameter, by name. */
export interface AdamWState {
  step: number;
  expAvg: Map<string, Float32Array>;
  expAvgSq: Map<string, Float32Array>;
}

export class AdamW {
  private readonly params: NamedParam[];
  private readonly m: Float32Array[];
  private readonly v: Float32Array[];
  private t = 0;

  constructor(
    params: NamedParam[],
    readonly opts: AdamWOptions,
  ) {
    const names = new Set<string>();
    for (const p of params) {
      if (names.has(p.name)) throw new Error(`AdamW: parameter ${p.name} appears twice`);
      names.add(p.name);
    }
    this.params = params;
    this.m = params.map((p) => new Float32Array(p.value.length));
    this.v = params.map((p) => new Float32Array(p.value.length));
  }

  /** Optimizer steps taken. */
  get stepCount(): number {
    return this.t;
  }

  /**
   * One update with grads in the constructor's parameter order; `lr` overrides opts.lr (the schedule's
   * value for this step).
   */
  step(grads: readonly Float32Array[], lr = this.opts.lr): void {
    if (grads.length !== this.params.length) throw new Error(`AdamW.step: ${grads.length} gradients for ${this.params.length} parameters`);
    const [b1, b2] = this.opts.betas;
    const { eps, weightDecay } = this.opts;
    this.t += 1;
    const bc1 = 1 - b1 ** this.t;
    const bc2Sqrt = Math.sqrt(1 - b2 ** this.t);
    const stepSize = lr / bc1;
    const decay = 1 - lr * weightDecay;
    for (let i = 0; i < this.params.length; i++) {
      const p = this.params[i]!.value;
      const g = grads[i]!;
      if (g.length !== p.length) throw new Error(`AdamW.step: gradient of ${this.params[i]!.name} has ${g.length} values, parameter ${p.length}`);
      const m = this.m[i]!;
      const v = this.v[i]!;
      for (let j = 0; j < p.length; j++) {
        const gj = g[j]!;
        // torch: param.mul_(1 - lr * wd) first, decoupled from the gradient.
        const pj = p[j]! * decay;
        const mj = b1 * m[j]! + (1 - b1) * gj;
        const vj = b2 * v[j]! + (1 - b2) * gj * gj;
        m[j] = mj;
        v[j] = vj;
        p[j] = pj - (stepSize * mj) / (Math.sqrt(vj) / bc2Sqrt + eps);
      }
    }
  }

  /** A copy of the state (safe to write while training goes on). */
  state(): AdamWState {
    const expAvg = new Map<string, Float32Array>();
    const expAvgSq = new Map<string, Float32Array>();
    this.params.forEach((p, i) => {
      expAvg.set(p.name, this.m[i]!.slice());
      expAvgSq.set(p.name, this.v[i]!.slice());
    });
    return { step: this.t, expAvg, expAvgSq };
  }

  /** Restores a state for exactly these parameters (names and sizes must match). */
  loadState(state: AdamWState): void {
    if (!Number.isSafeInteger(state.step) || state.step < 0) throw new Error(`AdamW.loadState: bad step ${state.step}`);
    const names = new Set(this.params.map((p) => p.name));
    for (const n of [...state.expAvg.keys(), ...state.expAvgSq.keys()]) {
      if (!names.has(n)) throw new Error(`AdamW.loadState: state for unknown parameter ${n}`);
    }
    this.params.forEach((p, i) => {
      const m = state.expAvg.get(p.name);
      const v = state.expAvgSq.get(p.name);
      if (!m || !v) throw new Error(`AdamW.loadState: no state for parameter ${p.name}`);
      if (m.length !== p.value.length || v.length !== p.value.length) {
        throw new Error(`AdamW.loadState: state of ${p.name} has ${m.length}/${v.length} values, parameter ${p.value.length}`);
      }
      this.m[i]!.set(m);
      this.v[i]!.set(v);
    });
    this.t = state.step;
  }
}

/**
 * torch.nn.utils.clip_grad_norm_: the global L2 norm over all gradients; when maxNorm > 0 and the norm
 * exceeds it, every gradient is scaled by maxNorm / (norm + 1e-6) in place. Returns the norm before
 * clipping. A non-finite norm leaves the gradients untouched (torch would scale them to NaN) so that the
 * caller can skip the step.
 */
export function clipGradNorm(grads: readonly Float32Array[], maxNorm: number): number {
  let sumSq = 0;
  for (const g of grads) for (let j = 0; j < g.length; j++) sumSq += g[j]! * g[j]!;
  const norm = Math.sqrt(sumSq);
  if (!Number.isFinite(norm) || !(maxNorm > 0)) return norm;
  const coef = maxNorm / (norm + 1e-6);
  if (coef < 1) {
    for (const g of grads) for (let j = 0; j < g.length; j++) g[j] = g[j]! * coef;
  }
  return norm;
}
