/**
 * Weight codecs for linear layers: y[..., N] = x[..., K] W^T with W float32 [N, K] (nn.Linear [out, in]).
 *   int4  com.microsoft.MatMulNBits bits=4 (symmetric or with uint4 zero points)
 *   int8  com.microsoft.MatMulNBits bits=8
 *   nf4   com.microsoft.MatMulBnb4 quant_type=1
 *   none  float32 MatMul with W^T [K, N] as initializer
 * Each codec has a plain-TS dequantizer (the reference the ORT kernels are tested against) and can emit a
 * subgraph that rebuilds the float weight from the SAME packed bytes (for exact gradients through frozen weights).
 */
import { storedSlice, type OnnxNode, type OnnxTensor, type StoredTensor } from '../onnx.js';
import { quantizeBlockInt, dequantizeBlockInt, blockZeroPoint, zeroPointBytesPerRow, type BlockIntWeights } from './blockint.js';
import { quantizeNf4, dequantizeNf4, NF4_CODE } from './nf4.js';

export { NF4_CODE, nf4Code } from './nf4.js';
export type { BlockIntWeights } from './blockint.js';
export type { Nf4Weights } from './nf4.js';

export type QuantKind = 'none' | 'int4' | 'nf4' | 'int8';
export const QUANT_KINDS: readonly QuantKind[] = ['none', 'int4', 'nf4', 'int8'];

export interface QuantOptions {
  kind: QuantKind;
  /** int4/int8/nf4: power of two in 16..256; default 32 (int4, int8) or 64 (nf4). */
  blockSize?: number;
  /** int4/int8: no zero points (ORT's default zero point 2^(bits-1)); default true. nf4 is always symmetric. */
  symmetric?: boolean;
  /** int4/int8: MatMulNBits accuracy_level, 0 (float32 compute) .. 4 (activations quantized to int8); default 0. */
  accuracyLevel?: number;
}

interface Common {
  N: number;
  K: number;
  namePrefix: string;
  /** The initializers the node(s) of emitLinear read. */
  tensors: OnnxTensor[];
}

export interface BlockIntLinear extends Common {
  kind: 'int4' | 'int8';
  bits: 4 | 8;
  blockSize: number;
  nBlocks: number;
  symmetric: boolean;
  accuracyLevel: number;
  /** uint8 [N, nBlocks, blockSize*bits/8] */
  b: OnnxTensor;
  /** float32 [N * nBlocks] */
  scales: OnnxTensor;
  /** uint8, present only when asymmetric */
  zeroPoints?: OnnxTensor;
}

export interface Nf4Linear extends Common {
  kind: 'nf4';
  blockSize: number;
  /** uint8 [ceil(N*K/2)] */
  b: OnnxTensor;
  /** float32 [ceil(N*K/blockSize)] */
  absmax: OnnxTensor;
}

export interface FloatLinear extends Common {
  kind: 'none';
  /** float32 [K, N] = W^T */
  weightT: OnnxTensor;
}

export type QuantizedLinear = BlockIntLinear | Nf4Linear | FloatLinear;

/** Opsets the emitted nodes need (DequantizeLinear with block_size needs opset 21). */
export const QUANT_OPSETS: { domain: string; version: number }[] = [
  { domain: '', version: 21 },
  { domain: 'com.microsoft', version: 1 },
];

const INT8_SUPPORTED = true; // MatMulNBits bits=8 runs on ORT 1.30's CPU kernel (test/kernels/quant.test.ts)

/** The options with every default filled in; throws on a bad one. */
export function resolvedQuantOptions(opts: QuantOptions): Required<QuantOptions> {
  if (!QUANT_KINDS.includes(opts.kind)) {
    throw new Error(`quant kind ${JSON.stringify(opts.kind)}: must be one of ${QUANT_KINDS.join(', ')}`);
  }
  const kind = opts.kind;
  if (kind === 'int8' && !INT8_SUPPORTED) {
    throw new Error('quant kind int8: MatMulNBits bits=8 is not supported by this onnxruntime CPU kernel; use int4 or nf4');
  }
  const blockSize = opts.blockSize ?? (kind === 'nf4' ? 64 : 32);
  const symmetric = opts.symmetric ?? true;
  const accuracyLevel = opts.accuracyLevel ?? 0;
  if (kind !== 'none') {
    if (!Number.isInteger(blockSize) || blockSize < 16 || blockSize > 256 || (blockSize & (blockSize - 1)) !== 0) {
      throw new Error(`blockSize ${blockSize}: must be a power of two in 16..256 (16, 32, 64, 128, 256)`);
    }
  }
  if (kind === 'nf4' && !symmetric) {
    throw new Error('symmetric false: nf4 has no zero points (per-block absmax, always symmetric); use int4 for asymmetric');
  }
  if (!Number.isInteger(accuracyLevel) || accuracyLevel < 0 || accuracyLevel > 4) {
    throw new Error(`accuracyLevel ${accuracyLevel}: must be 0, 1, 2, 3 or 4 (MatMulNBits accuracy_level; 4 = int8 activations)`);
  }
  if (accuracyLevel !== 0 && (kind === 'nf4' || kind === 'none')) {
    throw new Error(`accuracyLevel ${accuracyLevel}: only int4 and int8 (MatMulNBits) have an accuracy level; use 0 for ${kind}`);
  }
  return { kind, blockSize, symmetric, accuracyLevel };
}

/** Quantizes W float32 [N, K] (row-major, nn.Linear layout). Tensor names start with `${namePrefix}.`. */
export function quantizeLinear(w: Float32Array, N: number, K: number, opts: QuantOptions, namePrefix: string): QuantizedLinear {
  const o = resolvedQuantOptions(opts);
  if (!Number.isInteger(N) || !Number.isInteger(K) || N <= 0 || K <= 0) throw new Error(`quantizeLinear ${namePrefix}: N=${N}, K=${K} must be positive integers`);
  if (w.length !== N * K) throw new Error(`quantizeLinear ${namePrefix}: weight has ${w.length} elements, expected N*K = ${N}*${K} = ${N * K}`);

  if (o.kind === 'none') {
    // Transposed in 32x32 tiles so both sides stay in cache.
    const wt = new Float32Array(K * N);
    for (let n0 = 0; n0 < N; n0 += 32) {
      const n1 = Math.min(N, n0 + 32);
      for (let k0 = 0; k0 < K; k0 += 32) {
        const k1 = Math.min(K, k0 + 32);
        for (let n = n0; n < n1; n++) for (let k = k0; k < k1; k++) wt[k * N + n] = w[n * K + k];
      }
    }
    const weightT: OnnxTensor = { name: `${namePrefix}.weight_t`, dataType: 'float32', dims: [K, N], data: wt };
    return { kind: 'none', N, K, namePrefix, tensors: [weightT], weightT };
  }

  if (o.kind === 'nf4') {
    const q = quantizeNf4(w, N, K, o.blockSize);
    const b: OnnxTensor = { name: `${namePrefix}.qweight`, dataType: 'uint8', dims: [q.b.length], data: q.b };
    const absmax: OnnxTensor = { name: `${namePrefix}.absmax`, dataType: 'float32', dims: [q.absmax.length], data: q.absmax };
    return { kind: 'nf4', N, K, namePrefix, tensors: [b, absmax], blockSize: o.blockSize, b, absmax };
  }

  const bits = o.kind === 'int4' ? 4 : 8;
  const q = quantizeBlockInt(w, N, K, bits, o.blockSize, o.symmetric);
  const b: OnnxTensor = { name: `${namePrefix}.qweight`, dataType: 'uint8', dims: [N, q.nBlocks, (o.blockSize * bits) / 8], data: q.b };
  const scales: OnnxTensor = { name: `${namePrefix}.scales`, dataType: 'float32', dims: [N * q.nBlocks], data: q.scales };
  const tensors = [b, scales];
  let zeroPoints: OnnxTensor | undefined;
  if (q.zeroPoints) {
    zeroPoints = { name: `${namePrefix}.zero_points`, dataType: 'uint8', dims: [q.zeroPoints.length], data: q.zeroPoints };
    tensors.push(zeroPoints);
  }
  return {
    kind: o.kind, N, K, namePrefix, tensors, bits, blockSize: o.blockSize, nBlocks: q.nBlocks, symmetric: o.symmetric,
    accuracyLevel: o.accuracyLevel, b, scales, ...(zeroPoints ? { zeroPoints } : {}),
  };
}

/** The linears of a model written to disk (quantizeLinear, then writeOnnxModel), for another graph to refer to. */
export interface StoredLinears {
  tensor(name: string): StoredTensor | undefined;
  /** A stored tensor's bytes (zero points are repacked for DequantizeLinear, so they are read, not referenced). */
  bytes(t: StoredTensor, byteStart: number, length: number): Uint8Array;
  /** The name the stored data file has in the directory of the graph that refers to it. */
  location: string;
}

/**
 * Rows [rowStart, rowStart + rows) of the linear that quantizeLinear(W [totalN, K], opts, storedPrefix) made and a
 * model stored, as a linear of its own named namePrefix. Block-int rows quantize independently, so these are the
 * bytes quantizeLinear gives for those rows alone; they are referenced where they lie, not recomputed. A float
 * (none) linear is taken whole only (its W^T holds a row range in columns). null for nf4 (its blocks run across
 * rows) and for row ranges of a float linear.
 */
export function storedLinearRows(
  stored: StoredLinears, opts: QuantOptions, storedPrefix: string, totalN: number, K: number, rowStart: number, rows: number, namePrefix: string,
): QuantizedLinear | null {
  const o = resolvedQuantOptions(opts);
  const need = (suffix: string, dims: number[]): StoredTensor => {
    const t = stored.tensor(`${storedPrefix}.${suffix}`);
    if (!t) throw new Error(`stored linear ${storedPrefix}: no tensor ${storedPrefix}.${suffix}`);
    if (t.dims.join(',') !== dims.join(',')) throw new Error(`stored linear ${storedPrefix}: ${t.name} is [${t.dims}], expected [${dims}]`);
    return t;
  };
  if (rowStart < 0 || rows <= 0 || rowStart + rows > totalN) throw new Error(`stored linear ${storedPrefix}: rows [${rowStart}, ${rowStart + rows}) outside its ${totalN}`);
  if (o.kind === 'none') {
    if (rowStart !== 0 || rows !== totalN) return null;
    const weightT = storedSlice(need('weight_t', [K, totalN]), 0, { name: `${namePrefix}.weight_t`, dataType: 'float32', dims: [K, totalN] }, stored.location);
    return { kind: 'none', N: rows, K, namePrefix, tensors: [weightT], weightT };
  }
  if (o.kind === 'nf4') return null;
  const bits = o.kind === 'int4' ? 4 : 8;
  const nBlocks = Math.ceil(K / o.blockSize);
  const rowBytes = (o.blockSize * bits) / 8;
  const b = storedSlice(need('qweight', [totalN, nBlocks, rowBytes]), rowStart * nBlocks * rowBytes, { name: `${namePrefix}.qweight`, dataType: 'uint8', dims: [rows, nBlocks, rowBytes] }, stored.location);
  const scales = storedSlice(need('scales', [totalN * nBlocks]), rowStart * nBlocks * 4, { name: `${namePrefix}.scales`, dataType: 'float32', dims: [rows * nBlocks] }, stored.location);
  const tensors = [b, scales];
  let zeroPoints: OnnxTensor | undefined;
  if (!o.symmetric) {
    const zpRow = zeroPointBytesPerRow(bits, nBlocks);
    const zp = need('zero_points', [totalN * zpRow]);
    zeroPoints = { name: `${namePrefix}.zero_points`, dataType: 'uint8', dims: [rows * zpRow], data: stored.bytes(zp, rowStart * zpRow, rows * zpRow) };
    tensors.push(zeroPoints);
  }
  return {
    kind: o.kind, N: rows, K, namePrefix, tensors, bits, blockSize: o.blockSize, nBlocks, symmetric: o.symmetric,
    accuracyLevel: o.accuracyLevel, b, scales, ...(zeroPoints ? { zeroPoints } : {}),
  };
}

function blockIntWeights(q: BlockIntLinear): BlockIntWeights {
  return {
    bits: q.bits, blockSize: q.blockSize, nBlocks: q.nBlocks, symmetric: q.symmetric,
    b: q.b.data as Uint8Array, scales: q.scales.data as Float32Array, zeroPoints: (q.zeroPoints?.data as Uint8Array | undefined) ?? null,
  };
}

/** The node computing y[..., N] from x[..., K] (x float32 of any rank >= 2). */
export function emitLinear(q: QuantizedLinear, x: string, y: string): OnnxNode[] {
  const name = `${q.namePrefix}.matmul`;
  switch (q.kind) {
    case 'none':
      return [{ opType: 'MatMul', name, inputs: [x, q.weightT.name], outputs: [y] }];
    case 'nf4':
      return [{
        opType: 'MatMulBnb4', domain: 'com.microsoft', name,
        inputs: [x, q.b.name, q.absmax.name], outputs: [y],
        attributes: { K: q.K, N: q.N, block_size: q.blockSize, quant_type: 1 },
      }];
    case 'int4':
    case 'int8':
      return [{
        opType: 'MatMulNBits', domain: 'com.microsoft', name,
        inputs: q.zeroPoints ? [x, q.b.name, q.scales.name, q.zeroPoints.name] : [x, q.b.name, q.scales.name],
        outputs: [y],
        attributes: { K: q.K, N: q.N, bits: q.bits, block_size: q.blockSize, accuracy_level: q.accuracyLevel },
      }];
  }
}

/** Plain-TS reference: the float32 weight [N, K] the quantized form stands for. */
export function dequantizeLinear(q: QuantizedLinear): Float32Array {
  switch (q.kind) {
    case 'none': {
      const wt = q.weightT.data as Float32Array;
      const w = new Float32Array(q.N * q.K);
      for (let k = 0; k < q.K; k++) for (let n = 0; n < q.N; n++) w[n * q.K + k] = wt[k * q.N + n];
      return w;
    }
    case 'nf4':
      return dequantizeNf4({ blockSize: q.blockSize, b: q.b.data as Uint8Array, absmax: q.absmax.data as Float32Array }, q.N, q.K);
    case 'int4':
    case 'int8':
      return dequantizeBlockInt(blockIntWeights(q), q.N, q.K);
  }
}

export interface DequantizedWeight {
  nodes: OnnxNode[];
  /** Extra initializers: views of the same packed bytes under the types the standard ops need, plus small constants. */
  tensors: OnnxTensor[];
}

function i64(name: string, values: number[]): OnnxTensor {
  return { name, dataType: 'int64', dims: [values.length], data: BigInt64Array.from(values.map((v) => BigInt(v))) };
}

/**
 * Nodes that rebuild the float32 weight inside a graph from the same packed bytes the matmul node reads, into
 * `out`: [N, K], or [K, N] (= W^T, ready for MatMul(x, .)) with transpose. Standard ops only, so the result can
 * be differentiated through (MatMulNBits / MatMulBnb4 have no gradient kernels):
 *   int4/int8  DequantizeLinear (opset 21, blocked along axis 1) over B seen as uint4/uint8 [N, nBlocks*blockSize]
 *              (same bytes), then Slice to K when the last block is padded. A zero-point tensor in DQ's flat
 *              packing is added (it differs from MatMulNBits' row-padded packing when nBlocks is odd).
 *   nf4        unpack nibbles (BitShift, BitwiseAnd), Gather the NF4 table, Mul by absmax per block.
 *   none       Transpose (or Identity) of W^T.
 * Tensor names: `${namePrefix}.dq.*`; the packed data buffers are shared (writeOnnxModel stores them once).
 */
export function emitDequantizedWeight(q: QuantizedLinear, out: string, opts: { transpose?: boolean } = {}): DequantizedWeight {
  const p = `${q.namePrefix}.dq`;
  const nodes: OnnxNode[] = [];
  const tensors: OnnxTensor[] = [];
  const nk = `${p}.w_nk`;
  const finish = (src: string): void => {
    nodes.push(opts.transpose
      ? { opType: 'Transpose', name: `${p}.transpose`, inputs: [src], outputs: [out], attributes: { perm: [1, 0] } }
      : { opType: 'Identity', name: `${p}.identity`, inputs: [src], outputs: [out] });
  };

  if (q.kind === 'none') {
    // weightT is already [K, N].
    if (opts.transpose) nodes.push({ opType: 'Identity', name: `${p}.identity`, inputs: [q.weightT.name], outputs: [out] });
    else nodes.push({ opType: 'Transpose', name: `${p}.transpose`, inputs: [q.weightT.name], outputs: [out], attributes: { perm: [1, 0] } });
    return { nodes, tensors };
  }

  if (q.kind === 'int4' || q.kind === 'int8') {
    const padded = q.nBlocks * q.blockSize;
    // Views of the same bytes (and of the same file range when the weight refers to stored data).
    const qt: OnnxTensor = { name: `${p}.q`, dataType: q.bits === 4 ? 'uint4' : 'uint8', dims: [q.N, padded], data: q.b.data, ...(q.b.external ? { external: q.b.external } : {}) };
    const sc: OnnxTensor = { name: `${p}.scale`, dataType: 'float32', dims: [q.N, q.nBlocks], data: q.scales.data, ...(q.scales.external ? { external: q.scales.external } : {}) };
    // DequantizeLinear's zero point has the type of x and its own flat packing.
    const nZp = q.N * q.nBlocks;
    const zpData = new Uint8Array(q.bits === 4 ? Math.ceil(nZp / 2) : nZp);
    const w = blockIntWeights(q);
    for (let n = 0; n < q.N; n++) {
      for (let j = 0; j < q.nBlocks; j++) {
        const zp = blockZeroPoint(w, n, j);
        const i = n * q.nBlocks + j;
        if (q.bits === 8) zpData[i] = zp;
        else zpData[i >> 1] |= i & 1 ? zp << 4 : zp;
      }
    }
    const zp: OnnxTensor = { name: `${p}.zero_point`, dataType: q.bits === 4 ? 'uint4' : 'uint8', dims: [q.N, q.nBlocks], data: zpData };
    tensors.push(qt, sc, zp);
    const deq = padded === q.K ? nk : `${p}.w_padded`;
    nodes.push({
      opType: 'DequantizeLinear', name: `${p}.dequantize`, inputs: [qt.name, sc.name, zp.name], outputs: [deq],
      attributes: { axis: 1, block_size: q.blockSize },
    });
    if (padded !== q.K) {
      tensors.push(i64(`${p}.slice_starts`, [0]), i64(`${p}.slice_ends`, [q.K]), i64(`${p}.slice_axes`, [1]));
      nodes.push({ opType: 'Slice', name: `${p}.slice`, inputs: [deq, `${p}.slice_starts`, `${p}.slice_ends`, `${p}.slice_axes`], outputs: [nk] });
    }
    finish(nk);
    return { nodes, tensors };
  }

  // nf4: bytes [ceil(NK/2)] -> padded to nBlocks*blockSize/2 -> codes [nBlocks, blockSize] -> values * absmax.
  const nf = q as Nf4Linear;
  const total = q.N * q.K;
  const nBlocks = (nf.absmax.data as Float32Array).length;
  const halfBlock = q.blockSize / 2;
  const nBytes = (q.b.data as Uint8Array).length;
  const padBytes = nBlocks * halfBlock - nBytes;
  tensors.push(
    { name: `${p}.table`, dataType: 'float32', dims: [16], data: NF4_CODE.slice() },
    { name: `${p}.four`, dataType: 'uint8', dims: [], data: new Uint8Array([4]) },
    { name: `${p}.fifteen`, dataType: 'uint8', dims: [], data: new Uint8Array([15]) },
    i64(`${p}.shape_bytes`, [nBlocks, halfBlock, 1]),
    i64(`${p}.shape_flat`, [nBlocks * q.blockSize]),
    i64(`${p}.shape_nk`, [q.N, q.K]),
    i64(`${p}.slice_starts`, [0]),
    i64(`${p}.slice_ends`, [total]),
    i64(`${p}.slice_axes`, [0]),
    { name: `${p}.absmax_col`, dataType: 'float32', dims: [nBlocks, 1, 1], data: nf.absmax.data },
  );
  let bytes = q.b.name;
  if (padBytes > 0) {
    tensors.push(i64(`${p}.pads`, [0, padBytes]));
    nodes.push({ opType: 'Pad', name: `${p}.pad`, inputs: [q.b.name, `${p}.pads`], outputs: [`${p}.bytes_padded`] });
    bytes = `${p}.bytes_padded`;
  }
  nodes.push(
    { opType: 'Reshape', name: `${p}.reshape_bytes`, inputs: [bytes, `${p}.shape_bytes`], outputs: [`${p}.bytes3`] },
    // Even flat index in the high nibble, odd in the low one.
    { opType: 'BitShift', name: `${p}.hi`, inputs: [`${p}.bytes3`, `${p}.four`], outputs: [`${p}.code_hi`], attributes: { direction: 'RIGHT' } },
    { opType: 'BitwiseAnd', name: `${p}.lo`, inputs: [`${p}.bytes3`, `${p}.fifteen`], outputs: [`${p}.code_lo`] },
    { opType: 'Concat', name: `${p}.interleave`, inputs: [`${p}.code_hi`, `${p}.code_lo`], outputs: [`${p}.codes_u8`], attributes: { axis: 2 } },
    { opType: 'Cast', name: `${p}.cast`, inputs: [`${p}.codes_u8`], outputs: [`${p}.codes`], attributes: { to: 6 /* int32 */ } },
    { opType: 'Gather', name: `${p}.lookup`, inputs: [`${p}.table`, `${p}.codes`], outputs: [`${p}.unit`], attributes: { axis: 0 } },
    { opType: 'Mul', name: `${p}.scale`, inputs: [`${p}.unit`, `${p}.absmax_col`], outputs: [`${p}.vals`] },
    { opType: 'Reshape', name: `${p}.flatten`, inputs: [`${p}.vals`, `${p}.shape_flat`], outputs: [`${p}.flat`] },
    { opType: 'Slice', name: `${p}.slice`, inputs: [`${p}.flat`, `${p}.slice_starts`, `${p}.slice_ends`, `${p}.slice_axes`], outputs: [`${p}.flat_nk`] },
    { opType: 'Reshape', name: `${p}.reshape_nk`, inputs: [`${p}.flat_nk`, `${p}.shape_nk`], outputs: [nk] },
  );
  finish(nk);
  return { nodes, tensors };
}

/** emitDequantizedWeight with transpose: `out` = W^T [K, N], so that MatMul(x, out) = x W^T. */
export function emitDequantizedTranspose(q: QuantizedLinear, out: string): DequantizedWeight {
  return emitDequantizedWeight(q, out, { transpose: true });
}
