/**
 * NF4 (QLoRA 4-bit NormalFloat) codec in the layout of com.microsoft.MatMulBnb4 (quant_type = 1), as ORT's CPU
 * kernel reads it (contrib_ops/cpu/quantization/blockwise_quant_block_bnb4.h, dequantize_blockwise_bnb4.h):
 *   - W is float32 [N, K] row-major, NOT transposed (the kernel dequantizes to [N, K] and runs a GEMM with B^T);
 *   - blocks run over the FLAT N*K elements (a block may span two rows); absmax float32 [ceil(N*K / blockSize)];
 *   - B uint8 [ceil(N*K / 2)]: flat element i in byte i >> 1, the HIGH nibble when i is even (the opposite of
 *     MatMulNBits);
 *   - w = NF4[code] * absmax.
 */

/** The NF4 code values (QLoRA, as in bitsandbytes and ORT's nf4_qaunt_map), as float32. */
export const NF4_CODE = new Float32Array([
  -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
  -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
  0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]);

/** Midpoints between neighbouring codes: the nearest-code thresholds (ORT's QuantizeOneNF4 uses the same). */
const NF4_MID = new Float32Array(15);
for (let i = 0; i < 15; i++) NF4_MID[i] = (NF4_CODE[i] + NF4_CODE[i + 1]) / 2;

/**
 * Nearest-code lookup without a search: x in [-1, 1] falls in one of LUT_BINS equal bins; no bin holds more than
 * one midpoint (bins are 1/2048 wide, midpoints >= 0.04 apart), so the code count below the bin plus one
 * comparison gives the nearest code.
 */
const LUT_BINS = 4096;
const NF4_LUT = new Uint8Array(LUT_BINS);
const NF4_MID_SENTINEL = new Float32Array(16);
NF4_MID_SENTINEL.set(NF4_MID);
NF4_MID_SENTINEL[15] = Infinity;
for (let bin = 0; bin < LUT_BINS; bin++) {
  const lower = (bin / LUT_BINS) * 2 - 1;
  let c = 0;
  while (c < 15 && NF4_MID[c] < lower) c++;
  NF4_LUT[bin] = c;
}

/** The index of the NF4 code nearest to x (x in [-1, 1]; ties go to the lower code, like ORT's QuantizeOneNF4). */
export function nf4Code(x: number): number {
  let bin = ((x + 1) * (LUT_BINS / 2)) | 0;
  bin = bin < 0 ? 0 : bin >= LUT_BINS ? LUT_BINS - 1 : bin;
  const c = NF4_LUT[bin];
  return x > NF4_MID_SENTINEL[c] ? c + 1 : c;
}

export interface Nf4Weights {
  blockSize: number;
  b: Uint8Array;
  absmax: Float32Array;
}

export function quantizeNf4(w: Float32Array, N: number, K: number, blockSize: number): Nf4Weights {
  const total = N * K;
  const nBlocks = Math.ceil(total / blockSize);
  const b = new Uint8Array(Math.ceil(total / 2));
  const absmax = new Float32Array(nBlocks);
  const zeroCode = 7; // NF4_CODE[7] = 0: pads an odd last nibble
  for (let blk = 0; blk < nBlocks; blk++) {
    const i0 = blk * blockSize;
    const i1 = Math.min(total, i0 + blockSize);
    let m = 0;
    let sum = 0; // NaN / Infinity detector
    for (let i = i0; i < i1; i++) {
      const a = Math.abs(w[i]);
      if (a > m) m = a;
      sum += a;
    }
    if (!Number.isFinite(sum)) throw new Error(`weight elements ${i0}..${i1 - 1} (row ${Math.floor(i0 / K)}): non-finite value (NaN or Infinity)`);
    m = Math.fround(m);
    absmax[blk] = m;
    const inv = m !== 0 ? 1 / m : 0;
    // blockSize is even, so a block starts on a byte boundary.
    for (let i = i0; i < i1; i += 2) {
      const hi = nf4Code(w[i] * inv);
      const lo = i + 1 < i1 ? nf4Code(w[i + 1] * inv) : zeroCode;
      b[i >> 1] = (hi << 4) | lo;
    }
  }
  return { blockSize, b, absmax };
}

/** Plain-TS reference: float32 [N, K], w = NF4[code] * absmax (both float32, so the product matches ORT's). */
export function dequantizeNf4(q: Nf4Weights, N: number, K: number): Float32Array {
  const total = N * K;
  const out = new Float32Array(total);
  for (let i = 0; i < total; i++) {
    const byte = q.b[i >> 1];
    const code = i & 1 ? byte & 15 : byte >> 4;
    out[i] = NF4_CODE[code] * q.absmax[Math.floor(i / q.blockSize)];
  }
  return out;
}
