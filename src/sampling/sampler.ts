import type { SamplingParams } from './params.js';
import { Rng, randomSeed } from './rng.js';

// Below this many candidates the nucleus search just sorts.
const SORT_CUTOFF = 32;

/**
 * Picks the next token from one row of logits. One instance per sequence: it owns the
 * RNG stream and the set of ids seen (prompt + generated) for the repetition penalty.
 * Order as in HF: repetition penalty, temperature, top-k, top-p, sample.
 */
export class Sampler {
  readonly params: Readonly<SamplingParams>;
  /** The seed actually used (params.seed, or a random one), so a run can be replayed. */
  readonly seed: number;
  private readonly rng: Rng;
  private readonly seen = new Set<number>();
  private readonly stopIds: ReadonlySet<number>;
  /**
   * Whether the logits of the last `next` were all finite (after the repetition penalty). A model with sane
   * weights never produces NaN or Inf, so false means the row's weights (its adapter) are broken.
   */
  lastLogitsFinite = true;
  private work = new Float32Array(0);
  private heap = new Int32Array(0);
  private idx = new Int32Array(0);
  private weights = new Float64Array(0);

  constructor(params: SamplingParams, promptIds: readonly number[] = []) {
    this.params = params;
    this.seed = params.seed ?? randomSeed();
    this.rng = new Rng(this.seed);
    this.stopIds = new Set(params.stopTokenIds);
    // Only the penalty needs history; skip the set otherwise.
    if (params.repetitionPenalty !== 1) for (const id of promptIds) this.seen.add(id);
  }

  /** Chooses a token and records it as seen. Does not modify `logits`. */
  next(logits: Float32Array): number {
    const id = this.choose(logits);
    this.accept(id);
    return id;
  }

  /** Records a token chosen elsewhere (e.g. forced), for the repetition penalty. */
  accept(id: number): void {
    if (this.params.repetitionPenalty !== 1) this.seen.add(id);
  }

  isStopToken(id: number): boolean {
    return this.stopIds.has(id);
  }

  private choose(logits: Float32Array): number {
    const V = logits.length;
    if (V === 0) throw new RangeError('Sampler.next: empty logits');
    if (this.work.length !== V) this.work = new Float32Array(V);
    const x = this.work;
    x.set(logits);

    const rp = this.params.repetitionPenalty;
    if (rp !== 1) {
      // HF: each distinct seen id once (gather/scatter), not once per occurrence.
      for (const id of this.seen) {
        if (id >= 0 && id < V) {
          const v = x[id]!;
          x[id] = v < 0 ? v * rp : v / rp;
        }
      }
    }

    // One pass: note NaN/Inf (v - v is 0 only for finite v), NaN -> -inf (a broken row must not poison the
    // softmax), find the argmax.
    let best = 0;
    let max = -Infinity;
    let finite = true;
    for (let i = 0; i < V; i++) {
      const v = x[i]!;
      if (v - v !== 0) {
        finite = false;
        if (v !== v) {
          x[i] = -Infinity;
          continue;
        }
      }
      if (v > max) {
        max = v;
        best = i;
      }
    }
    this.lastLogitsFinite = finite;
    const T = this.params.temperature;
    // Greedy, or a row where softmax is undefined (all -inf, or +inf present).
    if (T === 0 || !Number.isFinite(max)) return best;

    const topK = this.params.topK;
    const topP = this.params.topP;
    const invT = 1 / T;
    if (!Number.isFinite(invT)) return best; // denormal temperature: greedy in the limit

    if (topK > 0 && topK < V) {
      const n = this.selectTop(x, topK);
      return this.sampleTopK(x, n, max, invT, topP);
    }
    if (topP < 1) return this.sampleNucleus(x, max, invT, topP);

    // Plain softmax sampling: inverse CDF in index order, no sort needed.
    let total = 0;
    for (let i = 0; i < V; i++) {
      const w = Math.exp((x[i]! - max) * invT);
      x[i] = w;
      total += w;
    }
    let r = this.rng.nextFloat() * total;
    let last = best;
    for (let i = 0; i < V; i++) {
      const w = x[i]!;
      if (w > 0) {
        last = i;
        r -= w;
        if (r < 0) return i;
      }
    }
    return last; // rounding left r >= 0: the last token with mass
  }

  /** Samples among heap[0..n) (sorted best first), renormalized, after the nucleus cut. */
  private sampleTopK(x: Float32Array, n: number, max: number, invT: number, topP: number): number {
    const h = this.heap;
    const w = new Float64Array(n);
    let sum = 0;
    for (let j = 0; j < n; j++) {
      w[j] = Math.exp((x[h[j]!]! - max) * invT);
      sum += w[j]!;
    }
    // HF nucleus (applied to the renormalized top-k): keep a token while the mass before
    // it is < topP; the first is always kept.
    let keep = n;
    if (topP < 1) {
      let cum = 0;
      const limit = topP * sum;
      for (let j = 0; j < n; j++) {
        if (cum >= limit) {
          keep = j;
          break;
        }
        cum += w[j]!;
      }
      keep = Math.max(keep, 1);
    }
    let kept = 0;
    for (let j = 0; j < keep; j++) kept += w[j]!;
    let r = this.rng.nextFloat() * kept;
    for (let j = 0; j < keep; j++) {
      r -= w[j]!;
      if (r < 0) return h[j]!;
    }
    return h[keep - 1]!;
  }

  /**
   * Top-p over the whole vocab without sorting it: a quickselect that partitions by
   * (logit desc, index asc) and recurses into the side where the cumulative mass crosses
   * topP, so O(V) expected. The kept set is the same as HF's sorted cumsum cut; it is
   * sampled in partition order, which is deterministic for given logits.
   */
  private sampleNucleus(x: Float32Array, max: number, invT: number, topP: number): number {
    const V = x.length;
    if (this.idx.length !== V) {
      this.idx = new Int32Array(V);
      this.weights = new Float64Array(V);
    }
    const idx = this.idx;
    const wts = this.weights;
    let total = 0;
    for (let i = 0; i < V; i++) {
      const w = Math.exp((x[i]! - max) * invT);
      wts[i] = w;
      total += w;
    }
    // Tokens lighter than tau hold < V * tau = (1 - topP) / 2 of the mass together, so the
    // nucleus never needs them; for a peaked row this drops almost the whole vocab.
    const tau = (0.5 * (1 - topP) * total) / V;
    let hi = 0;
    for (let i = 0; i < V; i++) if (wts[i]! >= tau) idx[hi++] = i;
    const target = topP * total;
    let lo = 0;
    let above = 0;
    const weight = (i: number): number => wts[i]!;
    const better = (a: number, b: number): boolean => x[a]! > x[b]! || (x[a] === x[b] && a < b);

    // Invariant: idx[0..lo) beat everything in idx[lo..hi), their mass `above` < target,
    // and the nucleus size k is in (lo, hi].
    let k = -1;
    while (k < 0) {
      if (hi - lo <= SORT_CUTOFF) {
        const part = Array.from(idx.subarray(lo, hi)).sort((a, b) => (better(a, b) ? -1 : 1));
        k = hi; // rounding never reached target: keep all
        for (let j = 0; j < part.length; j++) {
          idx[lo + j] = part[j]!;
          above += weight(part[j]!);
          if (above >= target && k === hi) k = lo + j + 1;
        }
        break;
      }
      // Lomuto partition around the middle element; sum the mass of the better side.
      const mid = (lo + hi) >>> 1;
      const pivot = idx[mid]!;
      idx[mid] = idx[hi - 1]!;
      idx[hi - 1] = pivot;
      const pv = x[pivot]!;
      let store = lo;
      let mass = 0;
      for (let i = lo; i < hi - 1; i++) {
        const e = idx[i]!;
        const xe = x[e]!;
        if (xe > pv || (xe === pv && e < pivot)) {
          mass += wts[e]!;
          idx[i] = idx[store]!;
          idx[store++] = e;
        }
      }
      idx[hi - 1] = idx[store]!;
      idx[store] = pivot;
      if (above + mass >= target) {
        hi = store; // k <= store
      } else {
        above += mass + weight(pivot);
        if (above >= target) k = store + 1;
        else lo = store + 1;
      }
    }

    let kept = 0;
    for (let j = 0; j < k; j++) kept += weight(idx[j]!);
    let r = this.rng.nextFloat() * kept;
    for (let j = 0; j < k; j++) {
      r -= weight(idx[j]!);
      if (r < 0) return idx[j]!;
    }
    return idx[k - 1]!;
  }

  /**
   * Partial selection: the k best indices (higher logit; lower index on ties, so top-k 1
   * equals greedy) into heap[0..k), sorted best first. A size-k min-heap makes this
   * O(V log k), and most elements are rejected by one comparison with the heap root.
   */
  private selectTop(x: Float32Array, k: number): number {
    if (this.heap.length < k) this.heap = new Int32Array(k);
    const h = this.heap;
    // a is worse than b
    const worse = (a: number, b: number): boolean => x[a]! < x[b]! || (x[a] === x[b] && a > b);
    const siftDown = (i: number, size: number): void => {
      for (;;) {
        const l = 2 * i + 1;
        if (l >= size) return;
        const r = l + 1;
        const c = r < size && worse(h[r]!, h[l]!) ? r : l;
        if (!worse(h[c]!, h[i]!)) return;
        const t = h[c]!;
        h[c] = h[i]!;
        h[i] = t;
        i = c;
      }
    };
    const V = x.length;
    for (let i = 0; i < k; i++) h[i] = i;
    for (let i = (k >> 1) - 1; i >= 0; i--) siftDown(i, k);
    for (let i = k; i < V; i++) {
      // i > every index in the heap, so a tie with the root loses: strict > suffices.
      if (x[i]! > x[h[0]!]!) {
        h[0] = i;
        siftDown(0, k);
      }
    }
    // Heap-sort in place: repeatedly move the worst to the end -> best first.
    for (let size = k - 1; size > 0; size--) {
      const t = h[0]!;
      h[0] = h[size]!;
      h[size] = t;
      siftDown(0, size);
    }
    return k;
  }
}
