import { fsyncDir } from '../files/fsync.js';
import {
  openSync,
  readSync,
  writeSync,
  closeSync,
  fstatSync,
  fsyncSync,
  existsSync,
  readFileSync,
  renameSync,
  unlinkSync,
  mkdirSync,
} from 'node:fs';
import { randomBytes } from 'node:crypto';
import { basename, dirname, join } from 'node:path';
import { clipJson, parseJsonCapped, UntrustedJsonError } from '../files/json.js';
import type { HostTensor, WeightSource } from './spec.js';

/** Dtypes loraplex reads; anything else is named in the error. */
export type SafetensorsDtype = 'F32' | 'F16' | 'BF16';
const BYTES: Record<SafetensorsDtype, number> = { F32: 4, F16: 2, BF16: 2 };

interface Entry {
  file: string;
  dtype: SafetensorsDtype;
  shape: number[];
  /** Absolute byte range in the file. */
  begin: number;
  end: number;
  /** A descriptor the caller opened and owns (then `file` is only a label). */
  fd?: number;
}

export class SafetensorsError extends Error {}

/** Longest header read: real headers are a few KB to a few MB (one entry per tensor). */
const MAX_HEADER_BYTES = 100_000_000;
/** Header nesting: the file's object, a tensor's entry, its shape / offsets (plus slack for __metadata__). */
const MAX_HEADER_DEPTH = 8;

const clipName = (name: string): string => (name.length > 200 ? `${name.slice(0, 200)}...` : name);

/** Validates the JSON header (its bytes and where they sit in a file of `size` bytes) into entries. */
function parseHeader(headerBytes: Uint8Array, dataStart: number, size: number, file: string): Map<string, Entry> {
  let header: unknown;
  try {
    header = parseJsonCapped(headerBytes, { maxBytes: MAX_HEADER_BYTES, maxDepth: MAX_HEADER_DEPTH, what: 'header' });
  } catch (err) {
    if (err instanceof UntrustedJsonError) throw new SafetensorsError(`${file}: header ${err.detail}`);
    throw err;
  }
  if (typeof header !== 'object' || header === null || Array.isArray(header)) {
    throw new SafetensorsError(`${file}: header is not a JSON object`);
  }
  const entries = new Map<string, Entry>();
  for (const [name, value] of Object.entries(header as Record<string, unknown>)) {
    if (name === '__metadata__') continue;
    const info = value as { dtype?: unknown; shape?: unknown; data_offsets?: unknown } | null;
    if (
      typeof info !== 'object' ||
      info === null ||
      !Array.isArray(info.shape) ||
      !info.shape.every((d) => Number.isSafeInteger(d) && d >= 0) ||
      !Array.isArray(info.data_offsets) ||
      info.data_offsets.length !== 2 ||
      !info.data_offsets.every((o) => Number.isSafeInteger(o) && o >= 0)
    ) {
      throw new SafetensorsError(`${file}: tensor ${clipName(name)} has a malformed header entry ${clipJson(info)} (needs dtype, shape, data_offsets [begin, end])`);
    }
    if (typeof info.dtype !== 'string' || !Object.prototype.hasOwnProperty.call(BYTES, info.dtype)) {
      throw new SafetensorsError(`${file}: tensor ${clipName(name)} has dtype ${typeof info.dtype === 'string' ? clipName(info.dtype) : clipJson(info.dtype, 20)}; supported: F32, F16, BF16`);
    }
    const dtype = info.dtype as SafetensorsDtype;
    const shape = info.shape as number[];
    const count = shape.reduce((a, b) => a * b, 1);
    const [b, e] = info.data_offsets as [number, number];
    if (e - b !== count * BYTES[dtype]) {
      throw new SafetensorsError(`${file}: tensor ${clipName(name)} byte range [${b}, ${e}) does not match shape ${clipJson(shape, 60)} ${dtype}`);
    }
    if (dataStart + e > size) {
      throw new SafetensorsError(`${file}: tensor ${clipName(name)} ends at byte ${dataStart + e}, past the end of the file (${size} bytes; truncated?)`);
    }
    entries.set(name, { file, dtype, shape, begin: dataStart + b, end: dataStart + e });
  }
  return entries;
}

/** The header length field, checked to fit a file of `size` bytes. */
function headerLength(lenBytes: Uint8Array, size: number, file: string): number {
  const headerLen = Number(Buffer.from(lenBytes.buffer, lenBytes.byteOffset, 8).readBigUInt64LE(0));
  if (headerLen > MAX_HEADER_BYTES || headerLen + 8 > size) {
    throw new SafetensorsError(`${file}: header length ${headerLen} does not fit the file (${size} bytes)`);
  }
  return headerLen;
}

/** Reads the JSON header of one .safetensors file (8-byte little-endian length, then JSON). */
export function readSafetensorsHeader(file: string): Map<string, Entry> {
  const fd = openSync(file, 'r');
  try {
    return fdHeader(fd, fstatSync(fd).size, file);
  } finally {
    closeSync(fd);
  }
}

/** The header of an open safetensors file of `size` bytes; `label` names it in messages. */
function fdHeader(fd: number, size: number, label: string): Map<string, Entry> {
  if (size < 8) throw new SafetensorsError(`${label}: too short for a safetensors header`);
  const lenBuf = Buffer.alloc(8);
  readFully(fd, lenBuf, 0, label);
  const headerLen = headerLength(lenBuf, size, label);
  const headerBuf = Buffer.alloc(headerLen);
  readFully(fd, headerBuf, 8, label);
  return parseHeader(headerBuf, 8 + headerLen, size, label);
}

/** bfloat16 is the top half of a float32. */
export function bf16ToF32(src: Uint16Array, dst: Float32Array): void {
  const u32 = new Uint32Array(dst.buffer, dst.byteOffset, dst.length);
  for (let i = 0; i < src.length; i++) u32[i] = src[i]! << 16;
}

const F16_TABLE = (() => {
  const t = new Float32Array(65536);
  for (let h = 0; h < 65536; h++) {
    const s = h & 0x8000 ? -1 : 1;
    const e = (h >> 10) & 0x1f;
    const m = h & 0x3ff;
    if (e === 0) t[h] = s * m * 2 ** -24;
    else if (e === 31) t[h] = m ? NaN : s * Infinity;
    else t[h] = s * (1 + m / 1024) * 2 ** (e - 15);
  }
  return t;
})();

export function f16ToF32(src: Uint16Array, dst: Float32Array): void {
  for (let i = 0; i < src.length; i++) dst[i] = F16_TABLE[src[i]!]!;
}

// Scratch view for the scalar converters, so they allocate nothing per call.
const SCRATCH_F32 = new Float32Array(1);
const SCRATCH_U32 = new Uint32Array(SCRATCH_F32.buffer);

/** float32 bit pattern -> float16 bits, round-to-nearest-even. */
function f32BitsToF16Bits(x: number): number {
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  let mant = x & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
  const e = exp - 127 + 15;
  if (e >= 31) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e;
    let half = mant >>> shift;
    const rem = mant & ((1 << shift) - 1);
    const mid = 1 << (shift - 1);
    if (rem > mid || (rem === mid && half & 1)) half++;
    return sign | half;
  }
  let half = (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  // A carry out of the mantissa correctly bumps the exponent (up to infinity).
  if (rem > 0x1000 || (rem === 0x1000 && half & 1)) half++;
  return sign | half;
}

/** float32 bit pattern -> bfloat16 bits, round-to-nearest-even; NaN stays NaN. */
function f32BitsToBf16Bits(x: number): number {
  if ((x & 0x7fffffff) > 0x7f800000) return ((x >>> 16) | 0x40) & 0xffff;
  return ((x + 0x7fff + ((x >>> 16) & 1)) >>> 16) & 0xffff;
}

/** Round-to-nearest-even float32 -> float16 bits. */
export function f32ToF16Bits(value: number): number {
  SCRATCH_F32[0] = value;
  return f32BitsToF16Bits(SCRATCH_U32[0]!);
}

/** A float32 array as float16 bits (round to nearest even). */
export function f32ArrayToF16Bits(data: Float32Array): Uint16Array {
  const out = new Uint16Array(data.length);
  for (let i = 0; i < data.length; i++) out[i] = f32ToF16Bits(data[i]!);
  return out;
}

/** Round-to-nearest-even float32 -> bfloat16 bits. */
export function f32ToBf16Bits(value: number): number {
  SCRATCH_F32[0] = value;
  return f32BitsToBf16Bits(SCRATCH_U32[0]!);
}

/** Bulk float32 -> float16 bits (dst.length >= src.length). */
export function f32ToF16(src: Float32Array, dst: Uint16Array): void {
  const u = new Uint32Array(src.buffer, src.byteOffset, src.length);
  for (let i = 0; i < u.length; i++) dst[i] = f32BitsToF16Bits(u[i]!);
}

/** Bulk float32 -> bfloat16 bits (dst.length >= src.length). */
export function f32ToBf16(src: Float32Array, dst: Uint16Array): void {
  const u = new Uint32Array(src.buffer, src.byteOffset, src.length);
  for (let i = 0; i < u.length; i++) {
    const x = u[i]!;
    dst[i] = (x & 0x7fffffff) > 0x7f800000 ? ((x >>> 16) | 0x40) & 0xffff : ((x + 0x7fff + ((x >>> 16) & 1)) >>> 16) & 0xffff;
  }
}

/** Reads tensors from one safetensors file or a sharded set (model.safetensors.index.json). */
export class SafetensorsSource implements WeightSource {
  private readonly entries = new Map<string, Entry>();

  constructor(files: string[]) {
    for (const f of files) for (const [k, v] of readSafetensorsHeader(f)) this.entries.set(k, v);
  }

  /**
   * A safetensors file the caller opened (and closes after the last read), `size` bytes by its fstat: the header
   * is read now, tensors on demand (decodeInto), so the file is never held whole in memory.
   */
  static fromFd(fd: number, size: number, label: string): SafetensorsSource {
    const source = new SafetensorsSource([]);
    for (const [k, v] of fdHeader(fd, size, label)) source.entries.set(k, { ...v, fd });
    return source;
  }

  /**
   * Decodes a tensor as float32 into `dst` (exactly its element count) and returns the sum of its squares in
   * float64, in the same pass. That sum is finite exactly when every value is (a NaN or an infinity poisons it,
   * while squares of finite float32 values, at most 1.2e77 each, cannot overflow it). Half floats go through a
   * small reused chunk buffer, float32 is read straight into `dst`: nothing the size of the tensor is allocated.
   */
  decodeInto(name: string, dst: Float32Array): number {
    const e = this.entry(name);
    const count = e.shape.reduce((a, b) => a * b, 1);
    if (dst.length !== count) throw new RangeError(`decodeInto ${name}: dst holds ${dst.length} values, the tensor ${count}`);
    const { fd } = e;
    if (fd === undefined) throw new SafetensorsError(`${e.file}: decodeInto reads sources made by fromFd`);
    // A file that shrinks while read ends early: the error names the tensor.
    const fill = (into: Uint8Array, pos: number) => readFully(fd, into, pos, `${e.file}: tensor ${clipName(name)}`);
    if (e.dtype === 'F32') {
      fill(new Uint8Array(dst.buffer, dst.byteOffset, dst.byteLength), e.begin);
      return sumSquaresF32(dst);
    }
    const chunk = decodeChunk();
    const halves = new Uint16Array(chunk.buffer, chunk.byteOffset, chunk.length / 2);
    const bits = new Uint32Array(dst.buffer, dst.byteOffset, dst.length);
    let sum = 0;
    for (let done = 0; done < count; ) {
      const n = Math.min(halves.length, count - done);
      fill(chunk.subarray(0, n * 2), e.begin + done * 2);
      sum += e.dtype === 'F16' ? decodeF16Chunk(halves, n, dst, done) : decodeBf16Chunk(halves, n, bits, dst, done);
      done += n;
    }
    return sum;
  }

  /** Every file the tensors come from (one, or the shards). */
  files(): string[] {
    return [...new Set([...this.entries.values()].map((e) => e.file))];
  }

  /** The weights of a Hugging Face model directory, single file or sharded. */
  static fromModelDir(dir: string): SafetensorsSource {
    const index = join(dir, 'model.safetensors.index.json');
    if (existsSync(index)) {
      let map: { weight_map?: Record<string, string> };
      try {
        map = parseJsonCapped(readFileSync(index), { maxBytes: MAX_HEADER_BYTES, maxDepth: MAX_HEADER_DEPTH, what: index }) as typeof map;
      } catch (err) {
        if (err instanceof UntrustedJsonError) throw new SafetensorsError(err.message);
        throw err;
      }
      if (typeof map !== 'object' || map === null || typeof map.weight_map !== 'object' || map.weight_map === null) {
        throw new SafetensorsError(`${index}: no weight_map`);
      }
      const shards = [...new Set(Object.values(map.weight_map))].map((f) => join(dir, f));
      for (const s of shards) if (!existsSync(s)) throw new SafetensorsError(`${index} names ${s}, which is missing`);
      const source = new SafetensorsSource(shards);
      for (const [tensor, shard] of Object.entries(map.weight_map)) {
        const e = source.entries.get(tensor);
        if (!e || basename(e.file) !== basename(shard)) {
          throw new SafetensorsError(`${index} maps ${tensor} to ${shard}, which does not hold it`);
        }
      }
      return source;
    }
    const single = join(dir, 'model.safetensors');
    if (!existsSync(single)) {
      throw new SafetensorsError(`${dir}: no model.safetensors or model.safetensors.index.json (only safetensors weights are supported)`);
    }
    return new SafetensorsSource([single]);
  }

  names(): string[] {
    return [...this.entries.keys()];
  }
  has(name: string): boolean {
    return this.entries.has(name);
  }
  dtype(name: string): SafetensorsDtype {
    return this.entry(name).dtype;
  }
  shape(name: string): number[] {
    return [...this.entry(name).shape];
  }
  /** The file and byte range of a tensor, for content hashing without conversion. */
  location(name: string): { file: string; begin: number; end: number } {
    const e = this.entry(name);
    return { file: e.file, begin: e.begin, end: e.end };
  }

  get(name: string): HostTensor {
    const e = this.entry(name);
    const bytes = e.end - e.begin;
    // A fresh ArrayBuffer is aligned, so the typed views below need no extra copy.
    const raw = new Uint8Array(bytes);
    // A caller's descriptor (fromFd) stays open: its owner closes it.
    const fd = e.fd ?? openSync(e.file, 'r');
    try {
      readFully(fd, raw, e.begin, e.file);
    } finally {
      if (e.fd === undefined) closeSync(fd);
    }
    if (e.dtype === 'F32') return { shape: [...e.shape], data: new Float32Array(raw.buffer) };
    const data = new Float32Array(bytes / 2);
    if (e.dtype === 'BF16') bf16ToF32(new Uint16Array(raw.buffer), data);
    else f16ToF32(new Uint16Array(raw.buffer), data);
    return { shape: [...e.shape], data };
  }

  private entry(name: string): Entry {
    const e = this.entries.get(name);
    if (!e) throw new SafetensorsError(`missing tensor ${name}`);
    return e;
  }
}

// decodeInto's loops keep four partial sums: one float64 accumulator is a chain of dependent adds that takes
// longer than the decode itself (four make the F16 loop about 1.5x faster on 12.6M values).

/** Sum of squares of a float32 array, in float64. */
function sumSquaresF32(x: Float32Array): number {
  const n = x.length;
  let s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  let i = 0;
  for (; i + 3 < n; i += 4) {
    const a = x[i]!, b = x[i + 1]!, c = x[i + 2]!, d = x[i + 3]!;
    s0 += a * a; s1 += b * b; s2 += c * c; s3 += d * d;
  }
  for (; i < n; i++) s0 += x[i]! * x[i]!;
  return s0 + s1 + s2 + s3;
}

/** halves[0..n) as float16 -> dst[at..at+n), returning their sum of squares. */
function decodeF16Chunk(halves: Uint16Array, n: number, dst: Float32Array, at: number): number {
  let s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  let i = 0;
  for (; i + 3 < n; i += 4) {
    const a = F16_TABLE[halves[i]!]!, b = F16_TABLE[halves[i + 1]!]!, c = F16_TABLE[halves[i + 2]!]!, d = F16_TABLE[halves[i + 3]!]!;
    dst[at + i] = a; dst[at + i + 1] = b; dst[at + i + 2] = c; dst[at + i + 3] = d;
    s0 += a * a; s1 += b * b; s2 += c * c; s3 += d * d;
  }
  for (; i < n; i++) {
    const v = F16_TABLE[halves[i]!]!;
    dst[at + i] = v;
    s0 += v * v;
  }
  return s0 + s1 + s2 + s3;
}

/** halves[0..n) as bfloat16 (the top half of a float32) -> dst[at..at+n) through its bits, returning their sum of squares. */
function decodeBf16Chunk(halves: Uint16Array, n: number, bits: Uint32Array, dst: Float32Array, at: number): number {
  let s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  let i = 0;
  for (; i + 3 < n; i += 4) {
    bits[at + i] = halves[i]! << 16; bits[at + i + 1] = halves[i + 1]! << 16; bits[at + i + 2] = halves[i + 2]! << 16; bits[at + i + 3] = halves[i + 3]! << 16;
    const a = dst[at + i]!, b = dst[at + i + 1]!, c = dst[at + i + 2]!, d = dst[at + i + 3]!;
    s0 += a * a; s1 += b * b; s2 += c * c; s3 += d * d;
  }
  for (; i < n; i++) {
    bits[at + i] = halves[i]! << 16;
    s0 += dst[at + i]! * dst[at + i]!;
  }
  return s0 + s1 + s2 + s3;
}

/** decodeInto's chunk buffer for half floats, one per thread, reused (its pages stay in cache). */
let chunkBuffer: Uint8Array | null = null;
const decodeChunk = (): Uint8Array => (chunkBuffer ??= new Uint8Array(1 << 20));

/** Reads exactly buf.length bytes at pos; a short file is an error, never an endless loop. */
function readFully(fd: number, buf: Uint8Array, pos: number, file: string): void {
  let done = 0;
  while (done < buf.length) {
    const n = readSync(fd, buf, done, buf.length - done, pos + done);
    if (n === 0) throw new SafetensorsError(`${file}: unexpected end of file at byte ${pos + done}`);
    done += n;
  }
}

function writeFully(fd: number, buf: Uint8Array): void {
  let done = 0;
  while (done < buf.length) done += writeSync(fd, buf, done, buf.length - done);
}

/** A tensor to write; `data` may be a thunk so that huge models are generated one tensor at a time. */
export interface TensorToWrite {
  name: string;
  shape: number[];
  data: Float32Array | (() => Float32Array);
}

/** Elements converted per write: bounds the staging buffer to a few MB whatever the tensor size. */
const CHUNK = 1 << 20;

function tensorCount(t: TensorToWrite): number {
  if (!t.shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
    throw new SafetensorsError(`tensor ${t.name}: bad shape ${JSON.stringify(t.shape)}`);
  }
  return t.shape.reduce((a, b) => a * b, 1);
}

/** Builds the safetensors header: 8-byte length, then JSON padded with spaces to a multiple of 8. */
function buildHeader(tensors: TensorToWrite[], dtype: SafetensorsDtype, metadata: Record<string, string>): Buffer {
  const header: Record<string, unknown> = { __metadata__: metadata };
  let offset = 0;
  for (const t of tensors) {
    if (t.name === '__metadata__' || Object.prototype.hasOwnProperty.call(header, t.name)) {
      throw new SafetensorsError(`tensor name ${t.name} is reserved or duplicated`);
    }
    const bytes = tensorCount(t) * BYTES[dtype];
    header[t.name] = { dtype, shape: t.shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  const json = Buffer.from(JSON.stringify(header), 'utf8');
  // Padding keeps the data section 8-byte aligned, so readers can map it straight into typed arrays.
  const padded = Math.ceil(json.length / 8) * 8;
  const out = Buffer.alloc(8 + padded, 0x20);
  out.writeBigUInt64LE(BigInt(padded), 0);
  json.copy(out, 8);
  return out;
}

/**
 * Writes one .safetensors file atomically (temp file in the same directory, fsync, rename), tensor by
 * tensor and in chunks, so memory stays at one tensor plus a few MB whatever the file size.
 */
export function writeSafetensors(
  file: string,
  tensors: TensorToWrite[],
  dtype: SafetensorsDtype,
  metadata: Record<string, string> = { format: 'pt' },
): void {
  if (!Object.prototype.hasOwnProperty.call(BYTES, dtype)) throw new SafetensorsError(`cannot write dtype ${dtype}; supported: F32, F16, BF16`);
  const header = buildHeader(tensors, dtype, metadata);
  mkdirSync(dirname(file), { recursive: true });
  const tmp = join(dirname(file), `.${basename(file)}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`);
  const fd = openSync(tmp, 'w');
  let ok = false;
  try {
    writeFully(fd, header);
    const staging = dtype === 'F32' ? null : new Uint16Array(CHUNK);
    for (const t of tensors) {
      const data = typeof t.data === 'function' ? t.data() : t.data;
      const count = tensorCount(t);
      if (data.length !== count) {
        throw new SafetensorsError(`tensor ${t.name}: ${data.length} values for shape ${JSON.stringify(t.shape)} (${count})`);
      }
      for (let i = 0; i < count; i += CHUNK) {
        const part = data.subarray(i, Math.min(count, i + CHUNK));
        if (staging === null) {
          // safetensors is little-endian, as is every host onnxruntime-node runs on.
          writeFully(fd, new Uint8Array(part.buffer, part.byteOffset, part.byteLength));
        } else {
          if (dtype === 'BF16') f32ToBf16(part, staging);
          else f32ToF16(part, staging);
          writeFully(fd, new Uint8Array(staging.buffer, 0, part.length * 2));
        }
      }
    }
    fsyncSync(fd);
    ok = true;
  } finally {
    closeSync(fd);
    if (!ok) {
      try {
        unlinkSync(tmp);
      } catch {
        /* already gone */
      }
    }
  }
  renameSync(tmp, file);
  fsyncDir(dirname(file));
}

/** Writes a file atomically (temp + fsync + rename). */
export function writeFileAtomic(file: string, content: string | Uint8Array): void {
  mkdirSync(dirname(file), { recursive: true });
  const tmp = join(dirname(file), `.${basename(file)}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`);
  const fd = openSync(tmp, 'w');
  try {
    writeFully(fd, typeof content === 'string' ? Buffer.from(content, 'utf8') : content);
    fsyncSync(fd);
  } catch (err) {
    closeSync(fd);
    unlinkSync(tmp);
    throw err;
  }
  closeSync(fd);
  renameSync(tmp, file);
  fsyncDir(dirname(file));
}

/**
 * Writes model-0000i-of-0000n.safetensors shards of at most maxShardBytes each (a larger single tensor
 * gets a shard of its own, as transformers does) and then model.safetensors.index.json, last, so that a
 * crash never leaves an index pointing at missing shards. Returns the shard file names.
 */
export function writeShardedSafetensors(
  dir: string,
  tensors: TensorToWrite[],
  dtype: SafetensorsDtype,
  maxShardBytes: number,
  metadata: Record<string, string> = { format: 'pt' },
): string[] {
  if (!(maxShardBytes > 0)) throw new SafetensorsError(`maxShardBytes must be positive, got ${maxShardBytes}`);
  const groups: TensorToWrite[][] = [];
  let current: TensorToWrite[] = [];
  let currentBytes = 0;
  let total = 0;
  for (const t of tensors) {
    const bytes = tensorCount(t) * BYTES[dtype];
    if (current.length > 0 && currentBytes + bytes > maxShardBytes) {
      groups.push(current);
      current = [];
      currentBytes = 0;
    }
    current.push(t);
    currentBytes += bytes;
    total += bytes;
  }
  if (current.length > 0 || groups.length === 0) groups.push(current);
  const n = groups.length;
  const pad = (i: number) => String(i).padStart(5, '0');
  const weightMap: Record<string, string> = {};
  const names: string[] = [];
  groups.forEach((group, i) => {
    const name = `model-${pad(i + 1)}-of-${pad(n)}.safetensors`;
    writeSafetensors(join(dir, name), group, dtype, metadata);
    for (const t of group) weightMap[t.name] = name;
    names.push(name);
  });
  const sorted = Object.fromEntries(Object.keys(weightMap).sort().map((k) => [k, weightMap[k]!]));
  writeFileAtomic(
    join(dir, 'model.safetensors.index.json'),
    JSON.stringify({ metadata: { total_size: total }, weight_map: sorted }, null, 2) + '\n',
  );
  return names;
}
