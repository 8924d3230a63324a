/**
 * Weight codec tests: every codec runs in onnxruntime-node (MatMulNBits / MatMulBnb4 / MatMul) on random x of
 * shape [3, K] and [2, 5, K], compared with x . dequantizeLinear(W)^T computed in double in plain TS; the in-graph
 * dequantization (emitDequantizedWeight) must reproduce dequantizeLinear() bit for bit.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as ort from 'onnxruntime-node';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fromBinary } from '@bufbuild/protobuf';
import { ModelProtoSchema } from 'onnx-buf';
import { serializeModel, writeOnnxModel, type OnnxGraphDef } from '../../kernels/onnx.js';
import {
  quantizeLinear, emitLinear, dequantizeLinear, emitDequantizedWeight, emitDequantizedTranspose, NF4_CODE, QUANT_OPSETS,
  type QuantOptions, type QuantizedLinear,
} from '../../kernels/quant/index.js';

const SESSION_OPTS: ort.InferenceSession.SessionOptions = {
  intraOpNumThreads: 1,
  extra: { session: { intra_op: { allow_spinning: '0' } } },
};

function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 2 ** 32;
  };
}

/** Roughly normal values (sum of 4 uniforms), like trained weights; a few outliers to stress block scales. */
function randw(n: number, seed: number, scale = 0.05): Float32Array {
  const r = rng(seed);
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = (r() + r() + r() + r() - 2) * scale * (r() < 0.01 ? 8 : 1);
  return a;
}

/** y[M, N] = x[M, K] w[N, K]^T in double, and the scale sum_k |x| |w| that float rounding errors are relative to. */
function reference(x: Float32Array, w: Float32Array, M: number, K: number, N: number): { y: Float64Array; mag: Float64Array } {
  const y = new Float64Array(M * N);
  const mag = new Float64Array(M * N);
  for (let m = 0; m < M; m++) {
    for (let n = 0; n < N; n++) {
      let s = 0;
      let a = 0;
      for (let k = 0; k < K; k++) {
        const p = x[m * K + k] * w[n * K + k];
        s += p;
        a += Math.abs(p);
      }
      y[m * N + n] = s;
      mag[m * N + n] = a;
    }
  }
  return { y, mag };
}

/**
 * Bound of the error of accuracy_level 4, which quantizes x to int8 per block of K (scale = block absmax / 127):
 * each x element moves by at most half a step, so |dy| <= sum_blocks absmax_x / 254 * sum_k |w|. Doubled for slack.
 */
function int8ActivationBound(x: Float32Array, w: Float32Array, M: number, K: number, N: number, block: number): Float64Array {
  const b = new Float64Array(M * N);
  for (let m = 0; m < M; m++) {
    for (let n = 0; n < N; n++) {
      let s = 0;
      for (let k0 = 0; k0 < K; k0 += block) {
        let ax = 0;
        let sw = 0;
        for (let k = k0; k < Math.min(K, k0 + block); k++) {
          ax = Math.max(ax, Math.abs(x[m * K + k]));
          sw += Math.abs(w[n * K + k]);
        }
        s += (ax / 127) * sw;
      }
      b[m * N + n] = s;
    }
  }
  return b;
}

async function runGraph(g: OnnxGraphDef, feeds: Record<string, ort.Tensor>): Promise<ort.InferenceSession.OnnxValueMapType> {
  const s = await ort.InferenceSession.create(serializeModel(g), SESSION_OPTS);
  try {
    return await s.run(feeds);
  } finally {
    await s.release();
  }
}

/** One graph: y = the codec's matmul node on x [..., K]; w_nk / w_kn = the in-graph dequantized weight. */
function codecGraph(q: QuantizedLinear, xDims: (number | string)[]): OnnxGraphDef {
  const dq = emitDequantizedWeight(q, 'w_nk');
  const dqt = emitDequantizedTranspose({ ...q, namePrefix: `${q.namePrefix}_t` } as QuantizedLinear, 'w_kn');
  // The transposed variant's extra tensors are copies under other names; keep only those not already present.
  const names = new Set([...q.tensors, ...dq.tensors].map((t) => t.name));
  const extra = dqt.tensors.filter((t) => !names.has(t.name));
  const outDims = [...xDims.slice(0, -1), q.N];
  return {
    name: `codec_${q.kind}`,
    inputs: [{ name: 'x', dataType: 'float32', dims: xDims }],
    outputs: [
      { name: 'y', dataType: 'float32', dims: outDims },
      { name: 'w_nk', dataType: 'float32', dims: [q.N, q.K] },
      { name: 'w_kn', dataType: 'float32', dims: [q.K, q.N] },
      { name: 'y_dq', dataType: 'float32', dims: outDims },
    ],
    nodes: [...emitLinear(q, 'x', 'y'), ...dq.nodes, ...dqt.nodes, { opType: 'MatMul', inputs: ['x', 'w_kn'], outputs: ['y_dq'] }],
    initializers: [...q.tensors, ...dq.tensors, ...extra],
    opsets: QUANT_OPSETS,
  };
}

interface Measured {
  /** max |y - ref| / sum_k |x w| */
  maxRel: number;
  /** max |y - ref| / max |ref| */
  maxRelToMax: number;
  /** accuracy_level 4 only: max |y - ref| / the activation-quantization bound */
  maxOfBound: number;
}

/**
 * Runs the codec on x [3, K] and [2, 5, K] and checks:
 *  - y within `tol` * sum_k|x w| of the double reference x . deq(W)^T (or within the int8-activation bound);
 *  - the in-graph dequantized weight equals dequantizeLinear() exactly, in both layouts;
 *  - MatMul(x, in-graph W^T) matches the reference too.
 */
async function checkCodec(w: Float32Array, N: number, K: number, opts: QuantOptions, tol: number): Promise<Measured> {
  const q = quantizeLinear(w, N, K, opts, 'lin');
  const deq = dequantizeLinear(q);
  assert.equal(deq.length, N * K);
  let maxRel = 0;
  let maxRelToMax = 0;
  let maxOfBound = 0;
  for (const lead of [[3], [2, 5]]) {
    const M = lead.reduce((a, b) => a * b, 1);
    const x = randw(M * K, 1000 + K + N + M, 1);
    const out = await runGraph(codecGraph(q, [...lead, K]), { x: new ort.Tensor('float32', x, [...lead, K]) });
    assert.deepEqual(out.y.dims, [...lead, N]);
    const { y, mag } = reference(x, deq, M, K, N);
    const bound = opts.accuracyLevel === 4 ? int8ActivationBound(x, deq, M, K, N, q.kind === 'int4' || q.kind === 'int8' ? q.blockSize : K) : null;
    const got = out.y.data as Float32Array;
    let ymax = 0;
    for (let i = 0; i < M * N; i++) ymax = Math.max(ymax, Math.abs(y[i]));
    for (let i = 0; i < M * N; i++) {
      const d = Math.abs(got[i] - y[i]);
      const allowed = bound ? bound[i] + tol * mag[i] : tol * mag[i] + 1e-30;
      maxRel = Math.max(maxRel, d / mag[i]);
      maxRelToMax = Math.max(maxRelToMax, d / ymax);
      if (bound) maxOfBound = Math.max(maxOfBound, d / bound[i]);
      assert.ok(d <= allowed, `${JSON.stringify(opts)} N=${N} K=${K} x[${lead}] y[${i}]: ${got[i]} vs ${y[i]} (|diff| ${d} > ${allowed})`);
    }
    // In-graph dequantization reads the same bytes and must give the very same floats.
    const wnk = out.w_nk.data as Float32Array;
    const wkn = out.w_kn.data as Float32Array;
    for (let n = 0; n < N; n++) {
      for (let k = 0; k < K; k++) {
        if (wnk[n * K + k] !== deq[n * K + k] || wkn[k * N + n] !== deq[n * K + k]) {
          assert.fail(`${JSON.stringify(opts)} N=${N} K=${K}: dequantized w[${n},${k}] graph ${wnk[n * K + k]} / ${wkn[k * N + n]} vs TS ${deq[n * K + k]}`);
        }
      }
    }
    const ydq = out.y_dq.data as Float32Array;
    for (let i = 0; i < M * N; i++) assert.ok(Math.abs(ydq[i] - y[i]) <= 1e-5 * mag[i] + 1e-30, `y_dq[${i}]`);
  }
  return { maxRel, maxRelToMax, maxOfBound };
}

/** |w - deq| <= half a quantization step (|scale|) per element, plus float32 rounding. */
function checkHalfStep(q: QuantizedLinear, w: Float32Array): void {
  const deq = dequantizeLinear(q);
  const { N, K } = q;
  if (q.kind === 'int4' || q.kind === 'int8') {
    const scales = q.scales.data as Float32Array;
    for (let n = 0; n < N; n++) {
      for (let k = 0; k < K; k++) {
        const step = Math.abs(scales[n * q.nBlocks + Math.floor(k / q.blockSize)]);
        const err = Math.abs(w[n * K + k] - deq[n * K + k]);
        assert.ok(err <= step * 0.5 * (1 + 1e-6) + 1e-7 * Math.abs(w[n * K + k]), `${q.kind} sym=${q.symmetric} w[${n},${k}]=${w[n * K + k]} deq ${deq[n * K + k]} step ${step}`);
      }
    }
  } else if (q.kind === 'nf4') {
    // Non-uniform codes: "half a step" = the chosen code is the nearest one to w / absmax.
    const absmax = q.absmax.data as Float32Array;
    for (let i = 0; i < N * K; i++) {
      const a = absmax[Math.floor(i / q.blockSize)];
      const err = Math.abs(w[i] - deq[i]);
      let best = Infinity;
      for (const c of NF4_CODE) best = Math.min(best, Math.abs(w[i] - c * a));
      assert.ok(err <= best + 1e-6 * a, `nf4 w[${i}]=${w[i]} deq ${deq[i]} nearest err ${best}`);
    }
  } else {
    assert.deepEqual(deq, w);
  }
}

// accuracy_level 0 computes in float32 with the dequantized weights, so the only difference from the double
// reference is float32 summation: measured ~1e-7 of sum|x w|; 1e-5 leaves room for other summation orders.
const TOL_F32 = 1e-5;

test('int4 MatMulNBits: symmetric and asymmetric, blocks 16..128, K = 64 and 172 (partial block)', async (t) => {
  let worst = 0;
  for (const symmetric of [true, false]) {
    for (const blockSize of [16, 32, 64, 128]) {
      for (const [N, K] of [[8, 64], [33, 172], [5, 172], [17, 64]]) {
        const w = randw(N * K, N * 7 + K + blockSize);
        const { maxRel } = await checkCodec(w, N, K, { kind: 'int4', blockSize, symmetric }, TOL_F32);
        worst = Math.max(worst, maxRel);
        checkHalfStep(quantizeLinear(w, N, K, { kind: 'int4', blockSize, symmetric }, 'h'), w);
      }
    }
  }
  t.diagnostic(`int4 accuracy_level 0: max |y - ref| / sum|x w| = ${worst.toExponential(2)}`);
});

test('int4 MatMulNBits accuracy_level 4 (int8 activations) within the activation-quantization bound', async (t) => {
  const worst = { maxRel: 0, maxRelToMax: 0, maxOfBound: 0 };
  for (const symmetric of [true, false]) {
    for (const [N, K, blockSize] of [[16, 64, 32], [33, 172, 32], [8, 256, 128], [12, 172, 16]]) {
      const m = await checkCodec(randw(N * K, N + K), N, K, { kind: 'int4', blockSize, symmetric, accuracyLevel: 4 }, TOL_F32);
      for (const k of ['maxRel', 'maxRelToMax', 'maxOfBound'] as const) worst[k] = Math.max(worst[k], m[k]);
    }
  }
  t.diagnostic(`int4 accuracy_level 4: max |y - ref| / sum|x w| = ${worst.maxRel.toExponential(2)}, ` +
    `/ max|y| = ${worst.maxRelToMax.toExponential(2)}, / bound = ${worst.maxOfBound.toFixed(2)}`);
});

test('int8 MatMulNBits bits=8: symmetric and asymmetric', async (t) => {
  let worst = 0;
  for (const symmetric of [true, false]) {
    for (const blockSize of [16, 32, 128]) {
      for (const [N, K] of [[8, 64], [21, 172]]) {
        const w = randw(N * K, N * 3 + K + blockSize);
        const { maxRel } = await checkCodec(w, N, K, { kind: 'int8', blockSize, symmetric }, TOL_F32);
        worst = Math.max(worst, maxRel);
        checkHalfStep(quantizeLinear(w, N, K, { kind: 'int8', blockSize, symmetric }, 'h'), w);
      }
    }
  }
  const m = await checkCodec(randw(16 * 172, 5), 16, 172, { kind: 'int8', blockSize: 32, accuracyLevel: 4 }, TOL_F32);
  t.diagnostic(`int8 accuracy_level 0: max |y - ref| / sum|x w| = ${worst.toExponential(2)}; accuracy_level 4: ` +
    `${m.maxRel.toExponential(2)}, / max|y| = ${m.maxRelToMax.toExponential(2)}, / bound = ${m.maxOfBound.toFixed(2)}`);
});

test('nf4 MatMulBnb4: blocks 16..256, blocks spanning rows, odd N*K', async (t) => {
  let worst = 0;
  for (const blockSize of [16, 64, 256]) {
    for (const [N, K] of [[8, 64], [33, 172], [7, 45], [3, 9]]) {
      const w = randw(N * K, N * 5 + K + blockSize);
      const { maxRel } = await checkCodec(w, N, K, { kind: 'nf4', blockSize }, TOL_F32);
      worst = Math.max(worst, maxRel);
      checkHalfStep(quantizeLinear(w, N, K, { kind: 'nf4', blockSize }, 'h'), w);
    }
  }
  t.diagnostic(`nf4: max rel ${worst.toExponential(2)}`);
});

test('none: float32 MatMul with W^T', async () => {
  for (const [N, K] of [[8, 64], [33, 172]]) {
    const w = randw(N * K, N + K);
    await checkCodec(w, N, K, { kind: 'none' }, TOL_F32);
    checkHalfStep(quantizeLinear(w, N, K, { kind: 'none' }, 'h'), w);
  }
});

test('quantized graph through writeOnnxModel: packed bytes stored once for MatMulNBits and DequantizeLinear', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'loraplex-quant-'));
  try {
    const [N, K] = [64, 172];
    const w = randw(N * K, 77);
    for (const opts of [{ kind: 'int4', symmetric: false }, { kind: 'int8' }, { kind: 'nf4' }] as QuantOptions[]) {
      const q = quantizeLinear(w, N, K, opts, 'lin');
      const g = codecGraph(q, ['batch', K]);
      const inline = serializeModel(g);
      const { modelPath } = writeOnnxModel(g, dir, 'q', { externalThresholdBytes: 256 });
      const m = fromBinary(ModelProtoSchema, fs.readFileSync(modelPath));
      const offsets = new Map(m.graph!.initializer.map((t) => [t.name, t.externalData.find((e) => e.key === 'offset')?.value]));
      assert.ok(offsets.get('lin.qweight') !== undefined);
      if (q.kind !== 'nf4') assert.equal(offsets.get('lin.dq.q'), offsets.get('lin.qweight'), 'uint8 B and its uint4/uint8 view share bytes');
      else assert.equal(offsets.get('lin.dq.absmax_col'), offsets.get('lin.absmax'));
      const x = randw(2 * K, 78, 1);
      const feeds = { x: new ort.Tensor('float32', x, [2, K]) };
      const s1 = await ort.InferenceSession.create(inline, SESSION_OPTS);
      const s2 = await ort.InferenceSession.create(modelPath, SESSION_OPTS);
      const [a, b] = [await s1.run(feeds), await s2.run(feeds)];
      await s1.release();
      await s2.release();
      for (const o of ['y', 'w_nk', 'y_dq']) assert.deepEqual(b[o].data, a[o].data, `${opts.kind} ${o}`);
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('edge blocks: all-zero block, constant block, one-signed block', () => {
  const K = 64;
  const w = new Float32Array(4 * K);
  for (let k = 0; k < K; k++) {
    w[K + k] = 0.25; // constant positive row
    w[2 * K + k] = -(k + 1) / 64; // negative only
    w[3 * K + k] = k % 2 ? 1 : -1; // both signs at the same magnitude: the symmetric scale grows by 8/7.5
  }
  for (const kind of ['int4', 'int8', 'nf4'] as const) {
    for (const symmetric of kind === 'nf4' ? [true] : [true, false]) {
      const q = quantizeLinear(w, 4, K, { kind, symmetric, blockSize: 32 }, 'e');
      checkHalfStep(q, w);
      const deq = dequantizeLinear(q);
      for (let k = 0; k < K; k++) assert.equal(deq[k], 0, `${kind} zero row stays 0`);
    }
  }
  // Asymmetric int4 represents a constant block exactly (0 and the max are both codes).
  const qa = dequantizeLinear(quantizeLinear(w, 4, K, { kind: 'int4', symmetric: false }, 'e'));
  for (let k = 0; k < K; k++) assert.equal(qa[K + k], 0.25);
});

test('option validation names the option and the allowed values', () => {
  const w = new Float32Array(64);
  assert.throws(() => quantizeLinear(w, 2, 32, { kind: 'int4', blockSize: 48 }, 'p'), /^Error: blockSize 48: must be a power of two in 16\.\.256/);
  assert.throws(() => quantizeLinear(w, 2, 32, { kind: 'nf4', blockSize: 8 }, 'p'), /blockSize 8: must be a power of two in 16\.\.256/);
  assert.throws(() => quantizeLinear(w, 2, 32, { kind: 'int4', blockSize: 512 }, 'p'), /blockSize 512/);
  assert.throws(() => quantizeLinear(w, 2, 32, { kind: 'q3' as 'int4' }, 'p'), /quant kind "q3": must be one of none, int4, nf4, int8/);
  assert.throws(() => quantizeLinear(w, 2, 32, { kind: 'int4', accuracyLevel: 5 }, 'p'), /accuracyLevel 5: must be 0, 1, 2, 3 or 4/);
  assert.throws(() => quantizeLinear(w, 2, 32, { kind: 'nf4', accuracyLevel: 4 }, 'p'), /accuracyLevel 4: only int4 and int8/);
  assert.throws(() => quantizeLinear(w, 2, 32, { kind: 'nf4', symmetric: false }, 'p'), /symmetric false: nf4 has no zero points/);
  assert.throws(() => quantizeLinear(w, 3, 32, { kind: 'int4' }, 'p'), /weight has 64 elements, expected N\*K = 3\*32 = 96/);
  const bad = new Float32Array(64);
  bad[40] = NaN;
  assert.throws(() => quantizeLinear(bad, 2, 32, { kind: 'int4' }, 'p'), /weight row 1, columns 0\.\.31: non-finite value/);
  bad[40] = Infinity;
  assert.throws(() => quantizeLinear(bad, 2, 32, { kind: 'nf4', blockSize: 16 }, 'p'), /weight elements 32\.\.47 \(row 1\): non-finite/);
});

