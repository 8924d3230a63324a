/**
 * Serialization tests: small graphs written by serializeModel / writeOnnxModel, run by onnxruntime-node and
 * compared with plain TS computations. Float outputs are compared to 1e-5 relative (float32 sums of a few terms).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as ort from 'onnxruntime-node';
import { fromBinary } from '@bufbuild/protobuf';
import { ModelProtoSchema, TensorProto_DataLocation } from 'onnx-buf';
import { readInitializers, serializeModel, storedBytes, storedSlice, writeOnnxModel, type OnnxGraphDef, type OnnxTensor } from '../../kernels/onnx.js';

const SESSION_OPTS: ort.InferenceSession.SessionOptions = {
  intraOpNumThreads: 1,
  extra: { session: { intra_op: { allow_spinning: '0' } } },
};

function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 2 ** 32 - 0.5;
  };
}

function randn(n: number, seed: number): Float32Array {
  const r = rng(seed);
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = r() * 2;
  return a;
}

/** y[M, N] = x[M, K] w[K, N] + b[N] in double. */
function matmulAdd(x: Float32Array, w: Float32Array, b: Float32Array | null, M: number, K: number, N: number): Float64Array {
  const y = new Float64Array(M * N);
  for (let m = 0; m < M; m++) {
    for (let n = 0; n < N; n++) {
      let s = b ? b[n] : 0;
      for (let k = 0; k < K; k++) s += x[m * K + k] * w[k * N + n];
      y[m * N + n] = s;
    }
  }
  return y;
}

function assertClose(actual: ArrayLike<number>, expected: ArrayLike<number>, rel: number, what: string): void {
  assert.equal(actual.length, expected.length, `${what}: length`);
  let scale = 0;
  for (let i = 0; i < expected.length; i++) scale = Math.max(scale, Math.abs(expected[i]));
  for (let i = 0; i < expected.length; i++) {
    const d = Math.abs(actual[i] - expected[i]);
    assert.ok(d <= rel * (scale + 1e-30), `${what}[${i}]: ${actual[i]} vs ${expected[i]} (|diff| ${d} > ${rel} * ${scale})`);
  }
}

async function run(model: Uint8Array | string, feeds: Record<string, ort.Tensor>): Promise<ort.InferenceSession.OnnxValueMapType> {
  const s = typeof model === 'string' ? await ort.InferenceSession.create(model, SESSION_OPTS) : await ort.InferenceSession.create(model, SESSION_OPTS);
  try {
    return await s.run(feeds);
  } finally {
    await s.release();
  }
}

function matmulAddGraph(K: number, N: number, batch: number | string, w: Float32Array, b: Float32Array): OnnxGraphDef {
  return {
    name: 'matmul_add',
    inputs: [{ name: 'x', dataType: 'float32', dims: [batch, K] }],
    outputs: [{ name: 'y', dataType: 'float32', dims: [batch, N] }],
    nodes: [
      { opType: 'MatMul', inputs: ['x', 'w'], outputs: ['xw'] },
      { opType: 'Add', inputs: ['xw', 'b'], outputs: ['y'] },
    ],
    initializers: [
      { name: 'w', dataType: 'float32', dims: [K, N], data: w },
      { name: 'b', dataType: 'float32', dims: [N], data: b },
    ],
    opsets: [{ domain: '', version: 21 }],
  };
}

function tmpDir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'loraplex-onnx-'));
}

test('MatMul + Add with initializers, inline', async () => {
  const [M, K, N] = [2, 3, 4];
  const w = randn(K * N, 1);
  const b = randn(N, 2);
  const x = randn(M * K, 3);
  const bytes = serializeModel(matmulAddGraph(K, N, M, w, b));
  const out = await run(bytes, { x: new ort.Tensor('float32', x, [M, K]) });
  assert.deepEqual(out.y.dims, [M, N]);
  assertClose(out.y.data as Float32Array, matmulAdd(x, w, b, M, K, N), 1e-5, 'y');

  const m = fromBinary(ModelProtoSchema, bytes);
  assert.equal(m.irVersion, 10n);
  assert.equal(m.producerName, 'loraplex');
  assert.equal(m.graph!.input[0].type!.value.case, 'tensorType');
});

test('symbolic batch dim is a dim_param and accepts any batch', async () => {
  const [K, N] = [5, 3];
  const w = randn(K * N, 4);
  const b = randn(N, 5);
  const bytes = serializeModel(matmulAddGraph(K, N, 'batch', w, b));
  const m = fromBinary(ModelProtoSchema, bytes);
  const dims = (m.graph!.input[0].type!.value.value as { shape: { dim: { value: { case: string; value: unknown } }[] } }).shape.dim;
  assert.deepEqual(dims.map((d) => d.value), [{ case: 'dimParam', value: 'batch' }, { case: 'dimValue', value: 5n }]);
  for (const M of [1, 7]) {
    const x = randn(M * K, 10 + M);
    const out = await run(bytes, { x: new ort.Tensor('float32', x, [M, K]) });
    assert.deepEqual(out.y.dims, [M, N]);
    assertClose(out.y.data as Float32Array, matmulAdd(x, w, b, M, K, N), 1e-5, `y (batch ${M})`);
  }
});

test('attributes: INT, INTS, FLOAT, FLOATS, STRING, TENSOR, and element types', async () => {
  // Gemm: alpha FLOAT, transB INT; Transpose: perm INTS; ConstantOfShape: value TENSOR; Cast: to INT;
  // Pad: mode STRING; Where over a bool initializer; float16, int64, int8, int4 and uint4 initializers.
  const x = randn(6, 7);
  const wT = randn(4 * 3, 8); // [N=4, K=3], used with transB
  const cond = new Uint8Array([1, 0, 1, 0]);
  const f16 = new Uint16Array([0x3c00, 0x4000, 0xc200, 0x3800]); // 1, 2, -3, 0.5
  const i4 = new Uint8Array([0x21, 0xf8]); // int4 values [1, 2, -8, -1]
  const u4 = new Uint8Array([0x21, 0xf8]); // uint4 values [1, 2, 8, 15]
  const i8 = new Int8Array([-128, -1, 0, 127]);
  const graph: OnnxGraphDef = {
    name: 'attrs',
    inputs: [{ name: 'x', dataType: 'float32', dims: [2, 3] }],
    outputs: [
      { name: 'gemm', dataType: 'float32', dims: [2, 4] },
      { name: 'xt', dataType: 'float32', dims: [3, 2] },
      { name: 'sevens', dataType: 'float32', dims: [2, 2] },
      { name: 'where', dataType: 'float32', dims: [4] },
      { name: 'padded', dataType: 'float32', dims: [2, 5] },
      { name: 'h', dataType: 'float32', dims: [4] },
      { name: 'i4f', dataType: 'float32', dims: [4] },
      { name: 'u4f', dataType: 'float32', dims: [4] },
      { name: 'i8f', dataType: 'float32', dims: [4] },
    ],
    nodes: [
      { opType: 'Gemm', inputs: ['x', 'wT'], outputs: ['gemm'], attributes: { alpha: { float: 0.5 }, transB: 1 } },
      { opType: 'Transpose', inputs: ['x'], outputs: ['xt'], attributes: { perm: [1, 0] } },
      {
        opType: 'ConstantOfShape', inputs: ['shape22'], outputs: ['sevens'],
        attributes: { value: { name: 'v', dataType: 'float32', dims: [1], data: new Float32Array([7]) } },
      },
      { opType: 'Where', inputs: ['cond', 'a4', 'b4'], outputs: ['where'] },
      { opType: 'Pad', inputs: ['x', 'pads'], outputs: ['padded'], attributes: { mode: 'constant' } },
      { opType: 'Cast', inputs: ['f16'], outputs: ['h'], attributes: { to: 1 } },
      { opType: 'DequantizeLinear', inputs: ['i4', 'one'], outputs: ['i4f'] },
      { opType: 'DequantizeLinear', inputs: ['u4', 'one'], outputs: ['u4f'] },
      { opType: 'Cast', inputs: ['i8'], outputs: ['i8f'], attributes: { to: 1 } },
      // An unused node carrying a FLOATS attribute is not allowed by ORT, so FLOATS is checked by decoding below.
    ],
    initializers: [
      { name: 'wT', dataType: 'float32', dims: [4, 3], data: wT },
      { name: 'shape22', dataType: 'int64', dims: [2], data: new BigInt64Array([2n, 2n]) },
      { name: 'cond', dataType: 'bool', dims: [4], data: cond },
      { name: 'a4', dataType: 'float32', dims: [4], data: new Float32Array([1, 2, 3, 4]) },
      { name: 'b4', dataType: 'float32', dims: [4], data: new Float32Array([-1, -2, -3, -4]) },
      { name: 'pads', dataType: 'int64', dims: [4], data: new BigInt64Array([0n, 1n, 0n, 1n]) },
      { name: 'f16', dataType: 'float16', dims: [4], data: f16 },
      { name: 'i4', dataType: 'int4', dims: [4], data: i4 },
      { name: 'u4', dataType: 'uint4', dims: [4], data: u4 },
      { name: 'one', dataType: 'float32', dims: [], data: new Float32Array([1]) },
      { name: 'i8', dataType: 'int8', dims: [4], data: i8 },
    ],
    opsets: [{ domain: '', version: 21 }],
  };
  const out = await run(serializeModel(graph), { x: new ort.Tensor('float32', x, [2, 3]) });
  const w = new Float32Array(12);
  for (let n = 0; n < 4; n++) for (let k = 0; k < 3; k++) w[k * 4 + n] = wT[n * 3 + k];
  assertClose(out.gemm.data as Float32Array, Array.from(matmulAdd(x, w, null, 2, 3, 4), (v) => v * 0.5), 1e-5, 'gemm');
  assert.deepEqual(Array.from(out.xt.data as Float32Array), [x[0], x[3], x[1], x[4], x[2], x[5]]);
  assert.deepEqual(Array.from(out.sevens.data as Float32Array), [7, 7, 7, 7]);
  assert.deepEqual(Array.from(out.where.data as Float32Array), [1, -2, 3, -4]);
  assert.deepEqual(Array.from(out.padded.data as Float32Array), [0, x[0], x[1], x[2], 0, 0, x[3], x[4], x[5], 0]);
  assert.deepEqual(Array.from(out.h.data as Float32Array), [1, 2, -3, 0.5]);
  assert.deepEqual(Array.from(out.i4f.data as Float32Array), [1, 2, -8, -1]);
  assert.deepEqual(Array.from(out.u4f.data as Float32Array), [1, 2, 8, 15]);
  assert.deepEqual(Array.from(out.i8f.data as Float32Array), [-128, -1, 0, 127]);

  // FLOATS / STRING / INT 0 as stored.
  const g2: OnnxGraphDef = { ...graph, nodes: [{ opType: 'X', inputs: [], outputs: ['o'], attributes: { fs: { floats: [0.25, -1.5] }, s: 'RIGHT', z: 0 } }] };
  const a = fromBinary(ModelProtoSchema, serializeModel(g2)).graph!.node[0].attribute;
  assert.deepEqual(a.map((t) => [t.name, t.type]), [['fs', 6], ['s', 3], ['z', 2]]);
  assert.deepEqual(a[0].floats, [0.25, -1.5]);
  assert.equal(new TextDecoder().decode(a[1].s), 'RIGHT');
  assert.equal(a[2].i, 0n);
});

test('bad attributes and tensors give clear errors', () => {
  const base = matmulAddGraph(2, 2, 1, new Float32Array(4), new Float32Array(2));
  assert.throws(
    () => serializeModel({ ...base, nodes: [{ opType: 'LayerNormalization', inputs: [], outputs: [], attributes: { epsilon: 1e-5 } }] }),
    /epsilon=0.00001 is not an integer; give a float attribute as \{ float/,
  );
  assert.throws(
    () => serializeModel({ ...base, initializers: [{ name: 'w', dataType: 'float32', dims: [3, 2], data: new Float32Array(4) }] }),
    /tensor w: float32 \[3,2\] needs 24 bytes of data, got 16/,
  );
  assert.throws(
    () => serializeModel({ ...base, initializers: [{ name: 'w', dataType: 'int32', dims: [4], data: new Float32Array(4) }] }),
    /tensor w: int32 data must be Int32Array, got Float32Array/,
  );
  assert.throws(
    () => serializeModel({ ...base, initializers: [{ name: 'u', dataType: 'uint4', dims: [5], data: new Uint8Array(2) }] }),
    /uint4 \[5\] needs 3 bytes/,
  );
});

test('writeOnnxModel: big initializers go to aligned external data, loaded by path', async () => {
  const dir = tmpDir();
  try {
    const [K, N] = [64, 48]; // w: 12 KiB -> external; b: 192 B -> inline
    const w = randn(K * N, 20);
    const b = randn(N, 21);
    const g = matmulAddGraph(K, N, 'batch', w, b);
    // A second initializer sharing w's exact bytes (stored once) and a second big one after it.
    const w2: OnnxTensor = { name: 'w_alias', dataType: 'float32', dims: [K, N], data: w };
    const c = randn(N * N, 22);
    g.initializers.push(w2, { name: 'c', dataType: 'float32', dims: [N, N], data: c });
    g.nodes.push({ opType: 'MatMul', inputs: ['x', 'w_alias'], outputs: ['y2'] }, { opType: 'MatMul', inputs: ['y', 'c'], outputs: ['z'] });
    g.outputs.push({ name: 'y2', dataType: 'float32', dims: ['batch', N] }, { name: 'z', dataType: 'float32', dims: ['batch', N] });

    // Pre-existing files get replaced.
    fs.writeFileSync(path.join(dir, 'm.onnx'), 'old');
    fs.writeFileSync(path.join(dir, 'm.onnx.data'), 'old');
    const { modelPath, dataPath } = writeOnnxModel(g, dir, 'm');
    assert.equal(modelPath, path.join(dir, 'm.onnx'));
    assert.equal(dataPath, path.join(dir, 'm.onnx.data'));
    assert.deepEqual(fs.readdirSync(dir).sort(), ['m.onnx', 'm.onnx.data'], 'no temporary files left');

    const m = fromBinary(ModelProtoSchema, fs.readFileSync(modelPath));
    const inits = new Map(m.graph!.initializer.map((t) => [t.name, t]));
    const ext = (name: string) => Object.fromEntries(inits.get(name)!.externalData.map((e) => [e.key, e.value]));
    assert.equal(inits.get('b')!.dataLocation, TensorProto_DataLocation.DEFAULT);
    assert.equal(inits.get('b')!.rawData.byteLength, N * 4);
    for (const name of ['w', 'w_alias', 'c']) {
      assert.equal(inits.get(name)!.dataLocation, TensorProto_DataLocation.EXTERNAL, name);
      assert.equal(inits.get(name)!.rawData.byteLength, 0, name);
      assert.equal(ext(name).location, 'm.onnx.data');
      assert.equal(Number(ext(name).offset) % 4096, 0, `${name} offset aligned`);
    }
    assert.deepEqual(ext('w'), ext('w_alias'), 'same bytes stored once');
    assert.deepEqual(ext('c'), { location: 'm.onnx.data', offset: '12288', length: String(N * N * 4) });
    assert.equal(fs.statSync(dataPath).size, 12288 + N * N * 4);
    const data = fs.readFileSync(dataPath);
    assert.deepEqual(new Float32Array(data.buffer.slice(data.byteOffset, data.byteOffset + K * N * 4)), w);

    const M = 3;
    const x = randn(M * K, 23);
    const out = await run(modelPath, { x: new ort.Tensor('float32', x, [M, K]) });
    const y = matmulAdd(x, w, b, M, K, N);
    assertClose(out.y.data as Float32Array, y, 1e-5, 'y');
    assertClose(out.y2.data as Float32Array, matmulAdd(x, w, null, M, K, N), 1e-5, 'y2');
    assertClose(out.z.data as Float32Array, matmulAdd(new Float32Array(out.y.data as Float32Array), c, null, M, N, N), 1e-5, 'z');

    // A threshold above every tensor keeps everything inline; the data file is then empty.
    writeOnnxModel(g, dir, 'inline', { externalThresholdBytes: 1 << 30 });
    assert.equal(fs.statSync(path.join(dir, 'inline.onnx.data')).size, 0);
    const out2 = await run(path.join(dir, 'inline.onnx'), { x: new ort.Tensor('float32', x, [M, K]) });
    assert.deepEqual(out2.y.data, out.y.data);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('writeOnnxModel leaves no files behind when serialization fails', () => {
  const dir = tmpDir();
  try {
    const g = matmulAddGraph(2, 2, 1, new Float32Array(4), new Float32Array(2));
    g.nodes[0].attributes = { bad: 0.5 };
    assert.throws(() => writeOnnxModel(g, dir, 'm'), /not an integer/);
    assert.deepEqual(fs.readdirSync(dir), []);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('external references: another model reads stored tensors (whole, a row range, inline bytes) where they lie', async () => {
  const dir = tmpDir();
  try {
    const [K, N] = [64, 48];
    const w = randn(K * N, 30);
    const b = randn(N, 31); // 192 B: stays inline
    writeOnnxModel(matmulAddGraph(K, N, 'batch', w, b), dir, 'src');
    const stored = readInitializers(path.join(dir, 'src.onnx'));
    assert.deepEqual([...stored.keys()].sort(), ['b', 'w']);
    assert.equal(stored.get('b')!.external, null);
    assert.deepEqual(stored.get('w')!.external, { location: 'src.onnx.data', offset: 0, length: K * N * 4 });
    // The data file under the name the new model gives it (here a hard link, as a training job does).
    fs.linkSync(path.join(dir, 'src.onnx.data'), path.join(dir, 'base.data'));
    // Rows 16..47 of w [K, N] seen as [32, N], and the last 8 entries of b, by reference / copy.
    const rows = storedSlice(stored.get('w')!, 16 * N * 4, { name: 'w_rows', dataType: 'float32', dims: [32, N] }, 'base.data');
    assert.deepEqual(rows.external, { location: 'base.data', offset: 16 * N * 4, length: 32 * N * 4 });
    assert.equal(rows.data.length, 0);
    const tail = storedSlice(stored.get('b')!, 40 * 4, { name: 'b_tail', dataType: 'float32', dims: [8] }, 'base.data');
    assert.deepEqual(tail.data, b.slice(40));
    assert.deepEqual(storedBytes(stored.get('w')!, 4, 8, path.join(dir, 'base.data')), new Uint8Array(w.buffer, 4, 8));
    assert.throws(() => storedSlice(stored.get('b')!, 44 * 4, { name: 'x', dataType: 'float32', dims: [8] }, 'base.data'), /outside its 192 bytes/);

    const g: OnnxGraphDef = {
      name: 'rows', opsets: [{ domain: '', version: 17 }],
      inputs: [{ name: 'x', dataType: 'float32', dims: [1, 32] }],
      outputs: [{ name: 'y', dataType: 'float32', dims: [1, N] }, { name: 't', dataType: 'float32', dims: [8] }],
      nodes: [{ opType: 'MatMul', inputs: ['x', 'w_rows'], outputs: ['y'] }, { opType: 'Identity', inputs: ['b_tail'], outputs: ['t'] }],
      initializers: [rows, tail],
    };
    const { dataPath } = writeOnnxModel(g, dir, 'user');
    assert.equal(fs.statSync(dataPath).size, 0, 'nothing copied');
    const x = randn(32, 32);
    const out = await run(path.join(dir, 'user.onnx'), { x: new ort.Tensor('float32', x, [1, 32]) });
    assertClose(out.y.data as Float32Array, matmulAdd(x, w.slice(16 * N, 48 * N), null, 1, 32, N), 1e-5, 'y');
    assert.deepEqual(out.t.data, b.slice(40));

    // A reference must be a file name in the model's directory, of the tensor's size; it cannot be inlined.
    const bad = (ref: { location: string; offset: number; length: number }) => ({ ...g, initializers: [{ ...rows, external: ref }, tail] });
    assert.throws(() => writeOnnxModel(bad({ location: '../base.data', offset: 0, length: 32 * N * 4 }), dir, 'bad'), /must be a file name in the model's directory/);
    assert.throws(() => writeOnnxModel(bad({ location: 'base.data', offset: 0, length: 4 }), dir, 'bad'), /needs 6144 bytes/);
    assert.throws(() => serializeModel(g), /must be written with writeOnnxModel/);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
