/**
 * The KV cache, owned by JS in the engine worker. Layout per layer: time-major [capacity, rows, kvDim], so the
 * filled prefix of every row, [0, past) x all rows, is one contiguous subarray fed to ORT without a copy.
 * The graph returns only the new keys/values, which `append` writes in place.
 *
 * Rows are reused by one request after another, and the attention window reaches past a row's own keys (whole
 * 64-position blocks), where the graph masks additively. Masking cannot hide a stale NaN or Inf (NaN + -inf is
 * NaN, 0 * Inf is NaN), so every position from a row's pastLen on must hold exact zeros when a step reads it:
 * `clearFrom` restores that, and `filled` says how far each row was ever written, so the clear costs only what
 * the previous request left behind.
 */
export class KvCache {
  readonly keys: Float32Array[] = [];
  readonly values: Float32Array[] = [];
  /** Per row: positions [0, filled) may hold data; everything after is zero. */
  private readonly filled: Int32Array;

  constructor(
    readonly numLayers: number,
    readonly rows: number,
    readonly capacity: number,
    readonly kvDim: number,
  ) {
    this.filled = new Int32Array(rows);
    const perLayer = capacity * rows * kvDim;
    for (let l = 0; l < numLayers; l++) {
      this.keys.push(new Float32Array(perLayer));
      this.values.push(new Float32Array(perLayer));
    }
  }

  get bytes(): number {
    return 2 * this.numLayers * this.capacity * this.rows * this.kvDim * 4;
  }

  /** Views of the first `past` positions of every row, for one layer. */
  view(layer: number, past: number): { key: Float32Array; value: Float32Array } {
    const n = past * this.rows * this.kvDim;
    return { key: this.keys[layer]!.subarray(0, n), value: this.values[layer]!.subarray(0, n) };
  }

  /** Zeroes positions [from, filled) of one row in every layer: what an earlier request (or a longer past) left. */
  clearFrom(row: number, from: number): void {
    const { kvDim, rows } = this;
    const end = this.filled[row]!;
    for (let l = 0; l < this.numLayers && from < end; l++) {
      const k = this.keys[l]!;
      const v = this.values[l]!;
      for (let p = from; p < end; p++) {
        const at = (p * rows + row) * kvDim;
        k.fill(0, at, at + kvDim);
        v.fill(0, at, at + kvDim);
      }
    }
    if (from < end) this.filled[row] = from;
  }

  /** Positions [0, end) of a row were written outside append (a restored prefix): the next clearFrom must see them. */
  markFilled(row: number, end: number): void {
    this.filled[row] = Math.max(this.filled[row]!, end);
  }

  /**
   * Appends the step's new keys/values. newKv is [2*layers, batch, seq, kvDim] (k then v for each layer);
   * batch row b goes to cache row rows[b] at positions pastLens[b] .. pastLens[b]+seq-1.
   */
  append(newKv: Float32Array, kvRows: readonly number[], pastLens: readonly number[], seq: number): void {
    const { kvDim, rows } = this;
    const batch = kvRows.length;
    const perLayer = batch * seq * kvDim;
    for (let l = 0; l < this.numLayers; l++) {
      const k = this.keys[l]!;
      const v = this.values[l]!;
      const kSrc = (2 * l) * perLayer;
      const vSrc = (2 * l + 1) * perLayer;
      for (let b = 0; b < batch; b++) {
        for (let s = 0; s < seq; s++) {
          const src = (b * seq + s) * kvDim;
          const dst = ((pastLens[b]! + s) * rows + kvRows[b]!) * kvDim;
          k.set(newKv.subarray(kSrc + src, kSrc + src + kvDim), dst);
          v.set(newKv.subarray(vSrc + src, vSrc + src + kvDim), dst);
        }
      }
    }
    for (let b = 0; b < batch; b++) this.filled[kvRows[b]!] = Math.max(this.filled[kvRows[b]!]!, pastLens[b]! + seq);
  }
}
