import assert from 'node:assert/strict';
import { test } from 'node:test';
import { closeSync, fstatSync, openSync, readdirSync, readFileSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import {
  bf16ToF32,
  f16ToF32,
  f32ToBf16,
  f32ToBf16Bits,
  f32ToF16,
  f32ToF16Bits,
  readSafetensorsHeader,
  SafetensorsError,
  SafetensorsSource,
  type SafetensorsDtype,
  type TensorToWrite,
  writeSafetensors,
  writeShardedSafetensors,
} from '../../src/models/safetensors.js';
import { randomArray, removeDir, tempDir } from './fixtures.js';

/** What a value reads back as after a round trip through dtype. */
function rounded(data: Float32Array, dtype: SafetensorsDtype): Float32Array {
  if (dtype === 'F32') return data;
  const bits = Uint16Array.from(data, (v) => (dtype === 'F16' ? f32ToF16Bits(v) : f32ToBf16Bits(v)));
  const out = new Float32Array(data.length);
  if (dtype === 'F16') f16ToF32(bits, out);
  else bf16ToF32(bits, out);
  return out;
}

const TENSORS: TensorToWrite[] = [
  { name: 'a.weight', shape: [3, 5], data: randomArray(15, 1) },
  { name: 'b.bias', shape: [7], data: randomArray(7, 2, 100) },
  { name: 'scalar', shape: [], data: new Float32Array([0.1]) },
  { name: 'empty', shape: [0, 4], data: new Float32Array(0) },
  // Longer than one write chunk (1 << 20 elements), to exercise chunked conversion.
  { name: 'big', shape: [1100, 1000], data: randomArray(1_100_000, 3) },
];

for (const dtype of ['F32', 'F16', 'BF16'] as const) {
  test(`writeSafetensors round-trips ${dtype}`, () => {
    const dir = tempDir('st');
    try {
      const file = join(dir, 'x.safetensors');
      writeSafetensors(file, TENSORS, dtype);
      const src = new SafetensorsSource([file]);
      assert.deepEqual(src.names(), TENSORS.map((t) => t.name));
      for (const t of TENSORS) {
        assert.equal(src.dtype(t.name), dtype);
        const got = src.get(t.name);
        assert.deepEqual(got.shape, t.shape);
        assert.deepEqual(got.data, rounded(t.data as Float32Array, dtype), t.name);
      }
      // Header length is a multiple of 8 and the JSON carries __metadata__.
      const buf = readFileSync(file);
      const len = Number(buf.readBigUInt64LE(0));
      assert.equal(len % 8, 0);
      const header = JSON.parse(buf.subarray(8, 8 + len).toString('utf8'));
      assert.deepEqual(header.__metadata__, { format: 'pt' });
      // No temp file is left behind.
      assert.deepEqual(readdirSync(dir), ['x.safetensors']);
    } finally {
      removeDir(dir);
    }
  });
}

test('bulk f32 -> f16/bf16 converters agree with the scalar ones, specials included', () => {
  const specials = [0, -0, 1, -1, 65504, 65520, 1e-8, 6e-8, 5.96e-8, 3e-5, 1e30, -1e30, Infinity, -Infinity, NaN, 2 ** -149, 1.00048828125, 1.0009765625];
  const data = Float32Array.from([...specials, ...randomArray(10000, 9, 1000), ...randomArray(1000, 10, 1e-6)]);
  const f16 = new Uint16Array(data.length);
  const bf16 = new Uint16Array(data.length);
  f32ToF16(data, f16);
  f32ToBf16(data, bf16);
  for (let i = 0; i < data.length; i++) {
    assert.equal(f16[i], f32ToF16Bits(data[i]!), `f16 of ${data[i]}`);
    assert.equal(bf16[i], f32ToBf16Bits(data[i]!), `bf16 of ${data[i]}`);
  }
  // Round to nearest: no neighbouring half-precision value is closer.
  const one = new Float32Array(1);
  const decode = (bits: number, bf: boolean) => {
    if (bf) bf16ToF32(Uint16Array.of(bits), one);
    else f16ToF32(Uint16Array.of(bits), one);
    return one[0]!;
  };
  for (let i = 0; i < 3000; i++) {
    const x = data[specials.length + i]!;
    for (const bf of [false, true]) {
      const h = bf ? bf16[specials.length + i]! : f16[specials.length + i]!;
      const err = Math.abs(decode(h, bf) - x);
      for (const n of [h - 1, h + 1]) {
        const v = decode(n & 0xffff, bf);
        if (Number.isFinite(v)) assert.ok(Math.abs(v - x) >= err, `${x}: ${bf ? 'bf16' : 'f16'} ${h} not nearest (${n} closer)`);
      }
    }
  }
  // Spot checks of rounding.
  assert.equal(f32ToF16Bits(65520), 0x7c00); // rounds up to infinity
  assert.equal(f32ToF16Bits(1.00048828125), 0x3c00); // tie to even
  assert.equal(f32ToBf16Bits(1.00390625), 0x3f80); // tie to even
  assert.equal(f32ToBf16Bits(NaN) & 0x7fc0, 0x7fc0);
});

test('lazy tensor data is generated during the write, and a bad length is an error that leaves no file', () => {
  const dir = tempDir('st');
  try {
    let calls = 0;
    const file = join(dir, 'lazy.safetensors');
    writeSafetensors(file, [{ name: 'x', shape: [4], data: () => (calls++, new Float32Array([1, 2, 3, 4])) }], 'F32');
    assert.equal(calls, 1);
    assert.deepEqual([...new SafetensorsSource([file]).get('x').data], [1, 2, 3, 4]);
    assert.throws(() => writeSafetensors(join(dir, 'bad.safetensors'), [{ name: 'x', shape: [5], data: new Float32Array(4) }], 'F32'), SafetensorsError);
    assert.throws(
      () =>
        writeSafetensors(join(dir, 'dup.safetensors'), [
          { name: 'x', shape: [1], data: new Float32Array(1) },
          { name: 'x', shape: [1], data: new Float32Array(1) },
        ], 'F32'),
      /duplicated/,
    );
    assert.deepEqual(readdirSync(dir), ['lazy.safetensors']);
  } finally {
    removeDir(dir);
  }
});

test('writeSafetensors replaces an existing file atomically', () => {
  const dir = tempDir('st');
  try {
    const file = join(dir, 'm.safetensors');
    writeSafetensors(file, [{ name: 'x', shape: [1], data: new Float32Array([1]) }], 'F32');
    writeSafetensors(file, [{ name: 'y', shape: [2], data: new Float32Array([2, 3]) }], 'BF16');
    const src = new SafetensorsSource([file]);
    assert.deepEqual(src.names(), ['y']);
    assert.deepEqual([...src.get('y').data], [2, 3]);
  } finally {
    removeDir(dir);
  }
});

test('writeShardedSafetensors writes shards + index that SafetensorsSource.fromModelDir reads', () => {
  const dir = tempDir('st');
  try {
    const tensors: TensorToWrite[] = Array.from({ length: 7 }, (_, i) => ({
      name: `layer.${i}.weight`,
      shape: [10, 10 + i],
      data: randomArray(10 * (10 + i), 100 + i),
    }));
    // F16: 200..320 bytes per tensor; 700 bytes per shard -> several shards; one tensor never splits.
    const shards = writeShardedSafetensors(dir, tensors, 'F16', 700);
    assert.ok(shards.length >= 3, `got ${shards.length} shards`);
    shards.forEach((s, i) => assert.equal(s, `model-${String(i + 1).padStart(5, '0')}-of-${String(shards.length).padStart(5, '0')}.safetensors`));
    const index = JSON.parse(readFileSync(join(dir, 'model.safetensors.index.json'), 'utf8'));
    assert.equal(index.metadata.total_size, tensors.reduce((n, t) => n + t.shape[0]! * t.shape[1]! * 2, 0));
    assert.deepEqual(Object.keys(index.weight_map).sort(), tensors.map((t) => t.name).sort());
    const src = SafetensorsSource.fromModelDir(dir);
    assert.equal(src.files().length, shards.length);
    for (const t of tensors) assert.deepEqual(src.get(t.name).data, rounded(t.data as Float32Array, 'F16'));
    // A tensor larger than the shard limit gets its own shard.
    const dir2 = join(dir, 'big');
    const big = writeShardedSafetensors(dir2, [tensors[0]!, { name: 'huge', shape: [1000], data: randomArray(1000, 5) }, tensors[1]!], 'F32', 1000);
    assert.equal(big.length, 3);
    assert.deepEqual(SafetensorsSource.fromModelDir(dir2).shape('huge'), [1000]);
  } finally {
    removeDir(dir);
  }
});

test('an index naming a missing shard or a tensor not in its shard is an error', () => {
  const dir = tempDir('st');
  try {
    writeShardedSafetensors(dir, [{ name: 'x', shape: [2], data: new Float32Array(2) }], 'F32', 100);
    const indexFile = join(dir, 'model.safetensors.index.json');
    const index = JSON.parse(readFileSync(indexFile, 'utf8'));
    writeFileSync(indexFile, JSON.stringify({ ...index, weight_map: { ...index.weight_map, y: 'model-00001-of-00001.safetensors' } }));
    assert.throws(() => SafetensorsSource.fromModelDir(dir), /maps y to model-00001-of-00001.safetensors, which does not hold it/);
    writeFileSync(indexFile, JSON.stringify({ weight_map: { x: 'nope.safetensors' } }));
    assert.throws(() => SafetensorsSource.fromModelDir(dir), /nope.safetensors, which is missing/);
    writeFileSync(indexFile, '{not json');
    assert.throws(() => SafetensorsSource.fromModelDir(dir), /not valid JSON/);
  } finally {
    removeDir(dir);
  }
});

test('corrupt safetensors files give clear errors', () => {
  const dir = tempDir('st');
  try {
    const good = join(dir, 'good.safetensors');
    writeSafetensors(good, [{ name: 'w', shape: [2, 2], data: new Float32Array([1, 2, 3, 4]) }], 'F32');
    const bytes = readFileSync(good);
    const headerLen = Number(bytes.readBigUInt64LE(0));
    const header = JSON.parse(bytes.subarray(8, 8 + headerLen).toString('utf8'));
    const withHeader = (h: unknown, data = bytes.subarray(8 + headerLen)) => {
      const json = Buffer.from(JSON.stringify(h));
      const len = Buffer.alloc(8);
      len.writeBigUInt64LE(BigInt(json.length));
      return Buffer.concat([len, json, data]);
    };
    const cases: [string, Buffer, RegExp][] = [
      ['short', Buffer.from([1, 2, 3]), /too short for a safetensors header/],
      ['hugelen', Buffer.concat([Buffer.from([0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]), Buffer.alloc(16)]), /header length \d+ does not fit/],
      ['truncated', bytes.subarray(0, bytes.length - 4), /tensor w ends at byte \d+, past the end of the file \(\d+ bytes; truncated\?\)/],
      ['badjson', Buffer.concat([bytes.subarray(0, 8), Buffer.from('{'.padEnd(headerLen, 'x')), bytes.subarray(8 + headerLen)]), /header is not valid JSON/],
      ['array', withHeader([1, 2]), /header is not a JSON object/],
      ['dtype', withHeader({ w: { ...header.w, dtype: 'I8' } }), /tensor w has dtype I8; supported: F32, F16, BF16/],
      ['shape', withHeader({ w: { ...header.w, shape: [2, 3] } }), /tensor w byte range \[0, 16\) does not match shape \[2,3\] F32/],
      ['malformed', withHeader({ w: { dtype: 'F32', shape: 'x', data_offsets: [0, 16] } }), /malformed header entry/],
      ['offsets', withHeader({ w: { ...header.w, data_offsets: [0] } }), /malformed header entry/],
    ];
    for (const [name, content, re] of cases) {
      const file = join(dir, `${name}.safetensors`);
      writeFileSync(file, content);
      assert.throws(() => readSafetensorsHeader(file), (err: Error) => err instanceof SafetensorsError && re.test(err.message) && err.message.includes(file), name);
    }
    assert.throws(() => SafetensorsSource.fromModelDir(join(dir, 'nothing')), /no model.safetensors/);
  } finally {
    removeDir(dir);
  }
});

/** f on a source over `file` opened by descriptor (fromFd), closed afterwards. */
function withFdSource<T>(file: string, f: (src: SafetensorsSource) => T): T {
  const fd = openSync(file, 'r');
  try {
    return f(SafetensorsSource.fromFd(fd, fstatSync(fd).size, 'x.safetensors'));
  } finally {
    closeSync(fd);
  }
}

test('decodeInto: the same values as get() in F32, F16 and BF16, with their sum of squares', () => {
  const dir = tempDir('st-decode');
  try {
    // Over a million values, so F16 and BF16 cross decodeInto's chunk boundary; the tail holds specials; the tensor
    // before it puts its bytes at an offset.
    const data = randomArray((1 << 20) + 37, 5);
    data.set([0, -0, 6e-8, -1e-6, 60000, 1.5e-40], data.length - 6);
    for (const dtype of ['F32', 'F16', 'BF16'] as const) {
      const file = join(dir, `${dtype}.safetensors`);
      writeSafetensors(file, [{ name: 'head', shape: [3], data: new Float32Array([1, 2, 3]) }, { name: 'w', shape: [data.length], data }], dtype);
      const want = rounded(data, dtype);
      let wantSum = 0;
      for (const v of want) wantSum += v * v;
      withFdSource(file, (src) => {
        // Into shared memory at an offset, as the adapter reader lays tensors out.
        const dst = new Float32Array(new SharedArrayBuffer((data.length + 1) * 4), 4, data.length);
        const sum = src.decodeInto('w', dst);
        assert.deepEqual(dst, want, dtype);
        assert.deepEqual(src.get('w').data, want, dtype);
        assert.ok(Math.abs(sum - wantSum) <= 1e-9 * wantSum, `${dtype}: sum ${sum} vs ${wantSum}`);
        assert.throws(() => src.decodeInto('w', new Float32Array(3)), RangeError);
      });
    }
    // A non-finite value makes the sum non-finite, in every dtype.
    for (const dtype of ['F32', 'F16', 'BF16'] as const) {
      const file = join(dir, `nan-${dtype}.safetensors`);
      writeSafetensors(file, [{ name: 'w', shape: [4], data: new Float32Array([1, NaN, 2, 3]) }], dtype);
      assert.ok(!Number.isFinite(withFdSource(file, (src) => src.decodeInto('w', new Float32Array(4)))), dtype);
    }
    // A file that shrinks after its header was read: the error names the tensor, nothing hangs.
    const file = join(dir, 'F16.safetensors');
    withFdSource(file, (src) => {
      truncateSync(file, 200);
      assert.throws(() => src.decodeInto('w', new Float32Array(data.length)), (e: Error) => e instanceof SafetensorsError && /x\.safetensors: tensor w: unexpected end of file/.test(e.message));
    });
  } finally {
    removeDir(dir);
  }
});

test('reads the real stories260K weights', async () => {
  const { STORIES260K } = await import('./fixtures.js');
  const src = SafetensorsSource.fromModelDir(STORIES260K);
  assert.deepEqual(src.shape('model.embed_tokens.weight'), [512, 64]);
  const w = src.get('model.layers.0.self_attn.k_proj.weight');
  assert.deepEqual(w.shape, [32, 64]);
  assert.ok(w.data.every(Number.isFinite));
  assert.ok(w.data.some((v) => v !== 0));
});
