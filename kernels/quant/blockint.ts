/**
 * Blockwise integer weight codec in the layout of com.microsoft.MatMulNBits (bits 4 or 8).
 *
 * W is float32 [N, K] row-major (nn.Linear [out, in]); each row is cut into blocks of `blockSize` along K
 * (the last one zero-padded). Per block: one float32 scale and, when asymmetric, one zero point.
 *   B           uint8 [N, nBlocks, blockSize * bits / 8]; 4-bit: element k in the low nibble when k is even.
 *   scales      float32 [N * nBlocks]
 *   zeroPoints  uint8, 4-bit: [N * ceil(nBlocks / 2)] (two per byte, low nibble first, each row starts on a new
 *               byte); 8-bit: [N * nBlocks]. Absent when symmetric: ORT then uses 2^(bits-1) (8 or 128).
 *   w = (q - zp) * scale
 */

export interface BlockIntWeights {
  bits: 4 | 8;
  blockSize: number;
  nBlocks: number;
  symmetric: boolean;
  b: Uint8Array;
  scales: Float32Array;
  zeroPoints: Uint8Array | null;
}

/** Bytes of zero points per row of N in MatMulNBits' layout. */
export function zeroPointBytesPerRow(bits: 4 | 8, nBlocks: number): number {
  return Math.ceil((nBlocks * bits) / 8);
}

/**
 * Scale choice (why): symmetric follows ORT's own quantizer (MlasQuantizeBlockwise range2scale): the value of
 * largest magnitude e maps to code 0, scale = e / -2^(bits-1), using all 16 (256) codes. That alone can clamp
 * values of the opposite sign by up to a whole step (e = 1, v = -1 -> code 16 -> clamped to 15), so the scale is
 * grown just enough, |scale| = max(|e| / 8, |opposite extreme| / 7.5) (8-bit: 128, 127.5), that every element is
 * within half a step;
 * it only differs from ORT when both signs reach > 15/16 of the block's maximum. Asymmetric is ORT's
 * range2scalezp: range [min(min,0), max(max,0)] over 15 (255) steps, zp rounded; error <= half a step too.
 */
export function quantizeBlockInt(
  w: Float32Array,
  N: number,
  K: number,
  bits: 4 | 8,
  blockSize: number,
  symmetric: boolean,
): BlockIntWeights {
  const nBlocks = Math.ceil(K / blockSize);
  const blob = (blockSize * bits) / 8;
  const maxq = (1 << bits) - 1;
  const mid = 1 << (bits - 1);
  const b = new Uint8Array(N * nBlocks * blob);
  const scales = new Float32Array(N * nBlocks);
  const zpRow = zeroPointBytesPerRow(bits, nBlocks);
  const zeroPoints = symmetric ? null : new Uint8Array(N * zpRow);

  for (let n = 0; n < N; n++) {
    const rowOff = n * K;
    for (let j = 0; j < nBlocks; j++) {
      const k0 = j * blockSize;
      const k1 = Math.min(K, k0 + blockSize);
      let lo = Infinity;
      let hi = -Infinity;
      let sum = 0; // NaN / Infinity detector: a sum of finite float32 values cannot overflow a double
      for (let k = rowOff + k0; k < rowOff + k1; k++) {
        const v = w[k];
        if (v < lo) lo = v;
        if (v > hi) hi = v;
        sum += v;
      }
      if (!Number.isFinite(sum)) throw new Error(`weight row ${n}, columns ${k0}..${k1 - 1}: non-finite value (NaN or Infinity)`);
      let scale: number;
      let zp: number;
      if (symmetric) {
        zp = mid;
        // ORT: the extreme with the larger magnitude (ties -> min) maps to code 0.
        const e = Math.abs(hi) > Math.abs(lo) ? hi : lo;
        const opp = Math.abs(hi) > Math.abs(lo) ? -lo : hi; // magnitude on the other side (may be <= 0)
        const mag = Math.max(Math.abs(e) / mid, opp / (mid - 0.5));
        scale = e > 0 ? -mag : mag;
        if (e === 0) scale = 0;
      } else {
        const mn = Math.min(lo, 0);
        const mx = Math.max(hi, 0);
        scale = (mx - mn) / maxq;
        zp = scale !== 0 ? Math.min(maxq, Math.max(0, Math.round(-mn / scale))) : 0;
        zeroPoints![n * zpRow + (bits === 4 ? j >> 1 : j)] |= bits === 4 && (j & 1) ? zp << 4 : zp;
      }
      scale = Math.fround(scale);
      scales[n * nBlocks + j] = scale;
      const inv = scale !== 0 ? 1 / scale : 0;
      const base = (n * nBlocks + j) * blob;
      // Codes: x = w / scale + zp, clamped to [0, maxq]; x >= 0 there, so (x + 0.5) | 0 rounds (half up).
      // The padded tail of a partial block gets zp (= the value 0).
      const len = k1 - k0;
      const src = rowOff + k0;
      if (bits === 4) {
        let i = 0;
        for (; i + 1 < len; i += 2) {
          let xa = w[src + i] * inv + zp;
          let xb = w[src + i + 1] * inv + zp;
          xa = xa < 0 ? 0 : xa > maxq ? maxq : xa;
          xb = xb < 0 ? 0 : xb > maxq ? maxq : xb;
          b[base + (i >> 1)] = ((xa + 0.5) | 0) | (((xb + 0.5) | 0) << 4);
        }
        if (i < len) {
          let xa = w[src + i] * inv + zp;
          xa = xa < 0 ? 0 : xa > maxq ? maxq : xa;
          b[base + (i >> 1)] = ((xa + 0.5) | 0) | (zp << 4);
          i += 2;
        }
        const pad = zp | (zp << 4);
        for (; i < blockSize; i += 2) b[base + (i >> 1)] = pad;
      } else {
        let i = 0;
        for (; i < len; i++) {
          let x = w[src + i] * inv + zp;
          x = x < 0 ? 0 : x > maxq ? maxq : x;
          b[base + i] = (x + 0.5) | 0;
        }
        for (; i < blockSize; i++) b[base + i] = zp;
      }
    }
  }
  return { bits, blockSize, nBlocks, symmetric, b, scales, zeroPoints };
}

/** The zero point of block j of row n. */
export function blockZeroPoint(q: BlockIntWeights, n: number, j: number): number {
  if (!q.zeroPoints) return 1 << (q.bits - 1);
  const row = zeroPointBytesPerRow(q.bits, q.nBlocks);
  if (q.bits === 8) return q.zeroPoints[n * row + j];
  const byte = q.zeroPoints[n * row + (j >> 1)];
  return j & 1 ? byte >> 4 : byte & 15;
}

/** Plain-TS reference: float32 [N, K] with w = (q - zp) * scale, computed as MatMulNBits does (float32 product). */
export function dequantizeBlockInt(q: BlockIntWeights, N: number, K: number): Float32Array {
  const out = new Float32Array(N * K);
  const blob = (q.blockSize * q.bits) / 8;
  for (let n = 0; n < N; n++) {
    for (let j = 0; j < q.nBlocks; j++) {
      const scale = q.scales[n * q.nBlocks + j];
      const zp = blockZeroPoint(q, n, j);
      const base = (n * q.nBlocks + j) * blob;
      const k0 = j * q.blockSize;
      const k1 = Math.min(K, k0 + q.blockSize);
      for (let k = k0; k < k1; k++) {
        const i = k - k0;
        const code = q.bits === 4 ? (i & 1 ? q.b[base + (i >> 1)] >> 4 : q.b[base + (i >> 1)] & 15) : q.b[base + i];
        // (code - zp) is a small integer, so the double product rounds to the same float32 as ORT's float product.
        out[n * K + k] = (code - zp) * scale;
      }
    }
  }
  return out;
}
