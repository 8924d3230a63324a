/**
 * The ONNX model description that the graph IR lowers to, and its serialization.
 * Implementation: see serializeModel / writeOnnxModel below.
 */
import { create, fromBinary, toBinary } from '@bufbuild/protobuf';
import {
  AttributeProtoSchema,
  AttributeProto_AttributeType,
  GraphProtoSchema,
  ModelProtoSchema,
  NodeProtoSchema,
  OperatorSetIdProtoSchema,
  StringStringEntryProtoSchema,
  TensorProtoSchema,
  TensorProto_DataLocation,
  TensorProto_DataType,
  TensorShapeProtoSchema,
  TensorShapeProto_DimensionSchema,
  TypeProtoSchema,
  TypeProto_TensorSchema,
  ValueInfoProtoSchema,
  type AttributeProto,
  type TensorProto,
  type ValueInfoProto,
} from 'onnx-buf';
import * as fs from 'node:fs';
import * as path from 'node:path';

export type OnnxDataType = 'float32' | 'float16' | 'uint8' | 'int8' | 'int32' | 'int64' | 'bool' | 'uint4' | 'int4';

export type OnnxTensorData = Float32Array | Uint8Array | Int8Array | Int32Array | BigInt64Array | Uint16Array;

export interface OnnxTensor {
  name: string;
  dataType: OnnxDataType;
  dims: number[];
  /** Raw element data; for uint4/int4 the packed bytes (two elements per byte, low nibble first). Empty with `external`. */
  data: OnnxTensorData;
  /** The bytes already lie in a data file beside the model: writeOnnxModel references them and copies nothing. */
  external?: ExternalRef;
}

/** A tensor's bytes in an ONNX external data file: `location` is a file name in the model's own directory. */
export interface ExternalRef {
  location: string;
  offset: number;
  length: number;
}

export type OnnxAttributeValue = number | number[] | string | OnnxTensor | { float: number } | { floats: number[] };

export interface OnnxNode {
  opType: string;
  /** '' (default ONNX domain) or 'com.microsoft'. */
  domain?: string;
  name?: string;
  inputs: string[];
  outputs: string[];
  /** Integers as number (int64), number[] as ints; use { float } / { floats } for float attributes. */
  attributes?: Record<string, OnnxAttributeValue>;
}

export interface OnnxValueInfo {
  name: string;
  dataType: OnnxDataType;
  /** A number for a fixed dim, a string for a symbolic one (dim_param). */
  dims: (number | string)[];
}

export interface OnnxGraphDef {
  name: string;
  inputs: OnnxValueInfo[];
  outputs: OnnxValueInfo[];
  nodes: OnnxNode[];
  initializers: OnnxTensor[];
  opsets: { domain: string; version: number }[];
}

// ---------------------------------------------------------------------------------------------
// Serialization (onnx-buf = ONNX schema compiled by protoc-gen-es, @bufbuild/protobuf v2)
// ---------------------------------------------------------------------------------------------

const IR_VERSION = 10n;
const PRODUCER = 'loraplex';
/** ORT maps external data with mmap only when each tensor's offset is page aligned. */
const EXTERNAL_ALIGN = 4096;
/** protobuf messages (and so a .onnx without external data) cannot exceed 2 GiB. */
const PROTOBUF_LIMIT = 2 ** 31 - 1;

const ONNX_TYPE: Record<OnnxDataType, TensorProto_DataType> = {
  float32: TensorProto_DataType.FLOAT,
  float16: TensorProto_DataType.FLOAT16,
  uint8: TensorProto_DataType.UINT8,
  int8: TensorProto_DataType.INT8,
  int32: TensorProto_DataType.INT32,
  int64: TensorProto_DataType.INT64,
  bool: TensorProto_DataType.BOOL,
  uint4: TensorProto_DataType.UINT4,
  int4: TensorProto_DataType.INT4,
};

/** Bytes per element, or 0.5 for the packed 4-bit types. */
const ELEMENT_BYTES: Record<OnnxDataType, number> = {
  float32: 4, float16: 2, uint8: 1, int8: 1, int32: 4, int64: 8, bool: 1, uint4: 0.5, int4: 0.5,
};

export function onnxDataTypeCode(t: OnnxDataType): number {
  return ONNX_TYPE[t];
}

/** Number of elements of a tensor with these dims (1 for a scalar). */
export function numElements(dims: readonly number[]): number {
  let n = 1;
  for (const d of dims) n *= d;
  return n;
}

/** Size in bytes of the raw data of a tensor of this type and shape (4-bit types: 2 per byte, rounded up). */
export function tensorByteLength(dataType: OnnxDataType, dims: readonly number[]): number {
  const n = numElements(dims);
  return dataType === 'uint4' || dataType === 'int4' ? Math.ceil(n / 2) : n * ELEMENT_BYTES[dataType];
}

/** The typed arrays accepted as data of each type (bytes are taken as they are, little-endian). */
const DATA_CTORS: Record<OnnxDataType, string[]> = {
  float32: ['Float32Array'], float16: ['Uint16Array'], uint8: ['Uint8Array'], int8: ['Int8Array', 'Uint8Array'],
  int32: ['Int32Array'], int64: ['BigInt64Array'], bool: ['Uint8Array'], uint4: ['Uint8Array'], int4: ['Uint8Array', 'Int8Array'],
};

/** A byte view of the tensor's data (no copy), after checking that it fits the type and dims. */
function tensorBytes(t: OnnxTensor): Uint8Array<ArrayBuffer> {
  for (const d of t.dims) {
    if (!Number.isInteger(d) || d < 0) throw new Error(`tensor ${t.name}: bad dim ${d} in [${t.dims}]`);
  }
  const want = tensorByteLength(t.dataType, t.dims);
  if (t.data.byteLength !== want) {
    throw new Error(`tensor ${t.name}: ${t.dataType} [${t.dims}] needs ${want} bytes of data, got ${t.data.byteLength}`);
  }
  // Guard against e.g. a Float32Array given for an int32 tensor (same size, wrong meaning).
  const ctor = t.data.constructor.name;
  if (!DATA_CTORS[t.dataType].includes(ctor)) {
    throw new Error(`tensor ${t.name}: ${t.dataType} data must be ${DATA_CTORS[t.dataType].join(' or ')}, got ${ctor}`);
  }
  return new Uint8Array(t.data.buffer as ArrayBuffer, t.data.byteOffset, t.data.byteLength);
}

function tensorProto(t: OnnxTensor, raw: Uint8Array<ArrayBuffer> | null): TensorProto {
  return create(TensorProtoSchema, {
    name: t.name,
    dataType: ONNX_TYPE[t.dataType],
    dims: t.dims.map((d) => BigInt(d)),
    ...(raw ? { rawData: raw } : {}),
  });
}

function attributeProto(name: string, v: OnnxAttributeValue, where: string): AttributeProto {
  const T = AttributeProto_AttributeType;
  if (typeof v === 'number') {
    // A plain number is always an INT: silently turning 1e-5 into FLOAT but 1.0 into INT would make an
    // attribute's type depend on its value.
    if (!Number.isInteger(v)) throw new Error(`${where}: attribute ${name}=${v} is not an integer; give a float attribute as { float: ${v} }`);
    return create(AttributeProtoSchema, { name, type: T.INT, i: BigInt(v) });
  }
  if (typeof v === 'string') {
    return create(AttributeProtoSchema, { name, type: T.STRING, s: new TextEncoder().encode(v) as Uint8Array<ArrayBuffer> });
  }
  if (Array.isArray(v)) {
    for (const x of v) if (!Number.isInteger(x)) throw new Error(`${where}: attribute ${name}=[${v}] has a non-integer; give floats as { floats: [...] }`);
    return create(AttributeProtoSchema, { name, type: T.INTS, ints: v.map((x) => BigInt(x)) });
  }
  if ('dataType' in v) return create(AttributeProtoSchema, { name, type: T.TENSOR, t: tensorProto(v, tensorBytes(v)) });
  if ('float' in v) return create(AttributeProtoSchema, { name, type: T.FLOAT, f: v.float });
  if ('floats' in v) return create(AttributeProtoSchema, { name, type: T.FLOATS, floats: v.floats });
  throw new Error(`${where}: attribute ${name} has an unsupported value`);
}

function valueInfo(v: OnnxValueInfo): ValueInfoProto {
  const dim = v.dims.map((d) =>
    create(TensorShapeProto_DimensionSchema, {
      value: typeof d === 'string' ? { case: 'dimParam', value: d } : { case: 'dimValue', value: BigInt(d) },
    }),
  );
  return create(ValueInfoProtoSchema, {
    name: v.name,
    type: create(TypeProtoSchema, {
      value: {
        case: 'tensorType',
        value: create(TypeProto_TensorSchema, { elemType: ONNX_TYPE[v.dataType], shape: create(TensorShapeProtoSchema, { dim }) }),
      },
    }),
  });
}

function modelBytes(graph: OnnxGraphDef, initializers: TensorProto[]): Uint8Array {
  const names = new Set<string>();
  for (const t of graph.initializers) {
    if (names.has(t.name)) throw new Error(`graph ${graph.name}: duplicate initializer ${t.name}`);
    names.add(t.name);
  }
  const g = create(GraphProtoSchema, {
    name: graph.name,
    input: graph.inputs.map(valueInfo),
    output: graph.outputs.map(valueInfo),
    initializer: initializers,
    node: graph.nodes.map((n, i) => {
      const where = `node ${n.name ?? i} (${n.opType})`;
      return create(NodeProtoSchema, {
        opType: n.opType,
        domain: n.domain ?? '',
        name: n.name ?? `${n.opType}_${i}`,
        input: n.inputs,
        output: n.outputs,
        attribute: Object.entries(n.attributes ?? {}).map(([k, v]) => attributeProto(k, v, where)),
      });
    }),
  });
  const model = create(ModelProtoSchema, {
    irVersion: IR_VERSION,
    producerName: PRODUCER,
    opsetImport: graph.opsets.map((o) => create(OperatorSetIdProtoSchema, { domain: o.domain, version: BigInt(o.version) })),
    graph: g,
  });
  return toBinary(ModelProtoSchema, model);
}

/** The whole model as one .onnx byte array, all initializer data inline (raw_data). */
export function serializeModel(graph: OnnxGraphDef): Uint8Array {
  let total = 0;
  for (const t of graph.initializers) {
    if (t.external) throw new Error(`tensor ${t.name}: refers to ${t.external.location}; a model with external references must be written with writeOnnxModel`);
    total += t.data.byteLength;
  }
  if (total > PROTOBUF_LIMIT - (64 << 20)) {
    throw new Error(`graph ${graph.name}: ${total} bytes of initializers exceed protobuf's 2 GiB limit; use writeOnnxModel (external data)`);
  }
  return modelBytes(graph, graph.initializers.map((t) => tensorProto(t, tensorBytes(t))));
}

function externalProto(t: OnnxTensor, ref: ExternalRef): TensorProto {
  const want = tensorByteLength(t.dataType, t.dims);
  if (ref.length !== want) throw new Error(`tensor ${t.name}: ${t.dataType} [${t.dims}] needs ${want} bytes, its reference to ${ref.location} has ${ref.length}`);
  // onnxruntime refuses data outside the model's directory; a bare file name also cannot be made to point elsewhere.
  if (path.basename(ref.location) !== ref.location || ref.location === '..' || ref.location === '.') {
    throw new Error(`tensor ${t.name}: external data location ${JSON.stringify(ref.location)} must be a file name in the model's directory`);
  }
  const p = tensorProto(t, null);
  p.dataLocation = TensorProto_DataLocation.EXTERNAL;
  p.externalData = [
    create(StringStringEntryProtoSchema, { key: 'location', value: ref.location }),
    create(StringStringEntryProtoSchema, { key: 'offset', value: String(ref.offset) }),
    create(StringStringEntryProtoSchema, { key: 'length', value: String(ref.length) }),
  ];
  return p;
}

/** Writes all of `bytes` at `position` (writeSync may write less than asked; one call is also capped near 2 GiB). */
function writeAllAt(fd: number, bytes: Uint8Array, position: number): void {
  const CHUNK = 256 << 20;
  let done = 0;
  while (done < bytes.byteLength) {
    const len = Math.min(CHUNK, bytes.byteLength - done);
    done += fs.writeSync(fd, bytes, done, len, position + done);
  }
}

function tmpName(finalPath: string): string {
  return `${finalPath}.tmp-${process.pid}-${Math.random().toString(36).slice(2, 10)}`;
}

/**
 * Writes `${dir}/${baseName}.onnx` and `${dir}/${baseName}.onnx.data`. Initializers bigger than
 * externalThresholdBytes (default 1024) go to the data file, each at a 4096-aligned offset so ORT can mmap them;
 * tensors are written one by one (no buffer of the whole model). Initializers that share the very same data view
 * (same buffer, offset and length, e.g. one packed weight seen as uint8 and as uint4) are stored once.
 * Both files are written under temporary names, fsynced, then renamed (data first, so a model file never names
 * data that is not there yet). Between the two renames a reader could still pair an OLD .onnx with the NEW data;
 * a writer racing with readers of the same baseName should write under a new baseName instead.
 */
export function writeOnnxModel(
  graph: OnnxGraphDef,
  dir: string,
  baseName: string,
  opts: { externalThresholdBytes?: number } = {},
): { modelPath: string; dataPath: string } {
  const threshold = opts.externalThresholdBytes ?? 1024;
  const modelPath = path.join(dir, `${baseName}.onnx`);
  const dataPath = path.join(dir, `${baseName}.onnx.data`);
  const dataName = `${baseName}.onnx.data`;
  const dataTmp = tmpName(dataPath);
  const modelTmp = tmpName(modelPath);
  fs.mkdirSync(dir, { recursive: true });

  let ok = false;
  try {
    const protos: TensorProto[] = [];
    const written = new Map<ArrayBufferLike, { byteOffset: number; byteLength: number; at: number }[]>();
    const fd = fs.openSync(dataTmp, 'w');
    try {
      let end = 0;
      for (const t of graph.initializers) {
        if (t.external) {
          protos.push(externalProto(t, t.external));
          continue;
        }
        const bytes = tensorBytes(t);
        if (bytes.byteLength <= threshold) {
          protos.push(tensorProto(t, bytes));
          continue;
        }
        const same = written.get(t.data.buffer)?.find((w) => w.byteOffset === bytes.byteOffset && w.byteLength === bytes.byteLength);
        let at: number;
        if (same) {
          at = same.at;
        } else {
          at = Math.ceil(end / EXTERNAL_ALIGN) * EXTERNAL_ALIGN;
          writeAllAt(fd, bytes, at);
          end = at + bytes.byteLength;
          const list = written.get(t.data.buffer) ?? [];
          list.push({ byteOffset: bytes.byteOffset, byteLength: bytes.byteLength, at });
          written.set(t.data.buffer, list);
        }
        protos.push(externalProto(t, { location: dataName, offset: at, length: bytes.byteLength }));
      }
      // Holes between aligned tensors read as zeros; make the file end exactly after the last tensor.
      fs.ftruncateSync(fd, end);
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }

    const model = modelBytes(graph, protos);
    const mfd = fs.openSync(modelTmp, 'w');
    try {
      writeAllAt(mfd, model, 0);
      fs.fsyncSync(mfd);
    } finally {
      fs.closeSync(mfd);
    }
    fs.renameSync(dataTmp, dataPath);
    fs.renameSync(modelTmp, modelPath);
    ok = true;
    // Make the renames durable too.
    try {
      const dfd = fs.openSync(dir, 'r');
      try { fs.fsyncSync(dfd); } finally { fs.closeSync(dfd); }
    } catch { /* some file systems refuse fsync on a directory; the data itself is already synced */ }
  } finally {
    if (!ok) {
      for (const p of [dataTmp, modelTmp]) { try { fs.unlinkSync(p); } catch { /* not created */ } }
    }
  }
  return { modelPath, dataPath };
}

// ---------------------------------------------------------------------------------------------
// Reading a written model's initializers back (to refer to their bytes from another graph)
// ---------------------------------------------------------------------------------------------

/** An initializer of a model on disk: its bytes inline (raw) or where they lie in its data file (external). */
export interface StoredTensor {
  name: string;
  dataType: OnnxDataType;
  dims: number[];
  raw: Uint8Array | null;
  external: ExternalRef | null;
}

const DATA_TYPE_OF = new Map<number, OnnxDataType>(Object.entries(ONNX_TYPE).map(([k, v]) => [v, k as OnnxDataType]));

/**
 * The initializers of a model written by writeOnnxModel, without reading its data file. Only the description is
 * parsed (small: weights are external). Tensors of types this module does not write are left out.
 */
export function readInitializers(modelPath: string): Map<string, StoredTensor> {
  const model = fromBinary(ModelProtoSchema, fs.readFileSync(modelPath));
  const out = new Map<string, StoredTensor>();
  for (const t of model.graph?.initializer ?? []) {
    const dataType = DATA_TYPE_OF.get(t.dataType);
    if (!dataType) continue;
    const dims = t.dims.map(Number);
    let external: ExternalRef | null = null;
    if (t.dataLocation === TensorProto_DataLocation.EXTERNAL) {
      const kv = new Map(t.externalData.map((e) => [e.key, e.value]));
      external = { location: kv.get('location') ?? '', offset: Number(kv.get('offset') ?? 0), length: Number(kv.get('length') ?? tensorByteLength(dataType, dims)) };
    }
    out.set(t.name, { name: t.name, dataType, dims, raw: external ? null : t.rawData, external });
  }
  return out;
}

/** Typed array constructors for data rebuilt from bytes (copied: raw bytes need not be aligned). */
function dataFromBytes(dataType: OnnxDataType, bytes: Uint8Array): OnnxTensorData {
  // Uint8Array.from copies (a Buffer's slice() would be a view of the whole file's memory).
  const copy = Uint8Array.from(bytes).buffer;
  switch (dataType) {
    case 'float32': return new Float32Array(copy);
    case 'float16': return new Uint16Array(copy);
    case 'int32': return new Int32Array(copy);
    case 'int64': return new BigInt64Array(copy);
    case 'int8': return new Int8Array(copy);
    default: return new Uint8Array(copy);
  }
}

const EMPTY: Record<OnnxDataType, () => OnnxTensorData> = {
  float32: () => new Float32Array(0), float16: () => new Uint16Array(0), uint8: () => new Uint8Array(0), int8: () => new Int8Array(0),
  int32: () => new Int32Array(0), int64: () => new BigInt64Array(0), bool: () => new Uint8Array(0), uint4: () => new Uint8Array(0), int4: () => new Uint8Array(0),
};

/**
 * A tensor `name` of the given type and dims whose bytes are those of `t` from byte `byteStart` on: a reference
 * into t's data file (relocated to `location`, the name that file has beside the new model), or a copy of t's
 * inline bytes.
 */
export function storedSlice(t: StoredTensor, byteStart: number, view: { name: string; dataType: OnnxDataType; dims: number[] }, location: string): OnnxTensor {
  const length = tensorByteLength(view.dataType, view.dims);
  const have = t.external ? t.external.length : t.raw!.byteLength;
  if (byteStart < 0 || byteStart + length > have) throw new Error(`stored tensor ${t.name}: bytes [${byteStart}, ${byteStart + length}) are outside its ${have} bytes`);
  if (t.external) return { ...view, data: EMPTY[view.dataType](), external: { location, offset: t.external.offset + byteStart, length } };
  return { ...view, data: dataFromBytes(view.dataType, t.raw!.subarray(byteStart, byteStart + length)) };
}

/** Bytes [byteStart, byteStart + length) of a stored tensor, read from `dataPath` (its data file) when external. */
export function storedBytes(t: StoredTensor, byteStart: number, length: number, dataPath: string): Uint8Array {
  if (!t.external) return Uint8Array.from(t.raw!.subarray(byteStart, byteStart + length));
  const out = new Uint8Array(length);
  const fd = fs.openSync(dataPath, 'r');
  try {
    let done = 0;
    while (done < length) {
      const n = fs.readSync(fd, out, done, length - done, t.external.offset + byteStart + done);
      if (n === 0) throw new Error(`${dataPath}: ends before the bytes of ${t.name}`);
      done += n;
    }
  } finally {
    fs.closeSync(fd);
  }
  return out;
}
