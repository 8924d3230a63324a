import ort from 'onnxruntime-node';
import { serializeModel } from '../../kernels/onnx.js';
import type { Graph } from '../../kernels/ir.js';

export type Feed = { type: 'float32'; data: Float32Array; dims: number[] } | { type: 'int64'; data: number[]; dims: number[] };

/** Runs an IR graph once on onnxruntime (CPU, one thread) and returns every output as float32. */
export async function runGraph(g: Graph, feeds: Record<string, Feed>): Promise<Record<string, Float32Array>> {
  const session = await ort.InferenceSession.create(serializeModel(g.toOnnx()), {
    intraOpNumThreads: 1,
    extra: { session: { intra_op: { allow_spinning: '0' } } },
  });
  try {
    const inputs: Record<string, ort.Tensor> = {};
    for (const [name, f] of Object.entries(feeds)) {
      inputs[name] = f.type === 'int64' ? new ort.Tensor('int64', BigInt64Array.from(f.data.map(BigInt)), f.dims) : new ort.Tensor('float32', f.data, f.dims);
    }
    const out = await session.run(inputs);
    const result: Record<string, Float32Array> = {};
    for (const [k, v] of Object.entries(out)) result[k] = v.data as Float32Array;
    return result;
  } finally {
    await session.release();
  }
}

export function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new Error(`length ${a.length} != ${b.length}`);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}

/** Deterministic pseudo-random floats in [-scale, scale). */
export function randomFloats(n: number, seed: number, scale = 1): Float32Array {
  let s = seed >>> 0 || 1;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    out[i] = ((s >>> 0) / 2 ** 32 * 2 - 1) * scale;
  }
  return out;
}
