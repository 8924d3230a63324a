import { test } from 'node:test';
import assert from 'node:assert/strict';
import ort from 'onnxruntime-node';
import { serializeModel } from '../../kernels/onnx.js';
import { dequantizeLinear, quantizeLinear, type QuantOptions } from '../../kernels/quant/index.js';
import { referenceForward, type ReferenceLora } from '../../kernels/reference/transformer.js';
import { lmHeadQuantOptions } from '../../src/models/linear.js';
import { buildTrainingGraph } from '../../src/models/train-graph.js';
import { loadModelDir } from '../../src/models/load.js';
import { makeModel } from '../../src/models/make.js';
import { linearModules } from '../../src/adapters/peft.js';
import type { HostTensor, ModelSpec, WeightSource } from '../../src/models/spec.js';
import { randomFloats } from '../helpers/ort.js';
import { fp16Round, tempDir } from '../helpers/engine.js';

/**
 * The weights the training graph computes with: linears dequantized with the same codec, a quantized base's
 * embedding rounded to float16 (as served), the rest as stored.
 */
function trainedBase(spec: ModelSpec, w: WeightSource, quant: QuantOptions): { spec: ModelSpec; get: (n: string) => HostTensor | undefined } {
  const linear = spec.family === 'gpt2' ? /\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$/ : /\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$/;
  const dq = (t: HostTensor, transposeIt: boolean, q: QuantOptions = quant): HostTensor => {
    if (q.kind === 'none') return t;
    const [r0, c0] = t.shape as [number, number];
    const tr = (d: Float32Array, r: number, c: number) => {
      const o = new Float32Array(r * c);
      for (let i = 0; i < r; i++) for (let j = 0; j < c; j++) o[j * r + i] = d[i * c + j]!;
      return o;
    };
    const wNK = transposeIt ? tr(t.data, r0, c0) : t.data;
    const [N, K] = transposeIt ? [c0, r0] : [r0, c0];
    const deq = dequantizeLinear(quantizeLinear(wNK, N, K, q, 'w'));
    return { shape: t.shape, data: transposeIt ? tr(deq, N, K) : deq };
  };
  const headName = spec.family === 'gpt2' ? 'wte.weight' : !spec.tieWordEmbeddings && w.has('lm_head.weight') ? 'lm_head.weight' : 'model.embed_tokens.weight';
  // The head in its own codec (lmHeadQuant, int8 by default), dequantized like the other linears.
  const head = dq(w.get(headName), false, lmHeadQuantOptions(quant));
  return {
    spec: { ...spec, tieWordEmbeddings: false },
    get: (name) => {
      if (name === 'lm_head.weight') return head;
      if (!w.has(name)) return undefined;
      const t = w.get(name);
      if (quant.kind !== 'none' && (name === 'model.embed_tokens.weight' || name === 'wte.weight')) return fp16Round(t);
      return linear.test(name) ? dq(t, spec.family === 'gpt2') : t;
    },
  };
}

function crossEntropy(logits: Float32Array, labels: number[], vocab: number): number {
  let sum = 0;
  let count = 0;
  labels.forEach((label, t) => {
    if (label < 0) return;
    let max = -Infinity;
    for (let v = 0; v < vocab; v++) max = Math.max(max, logits[t * vocab + v]!);
    let z = 0;
    for (let v = 0; v < vocab; v++) z += Math.exp(logits[t * vocab + v]! - max);
    sum -= logits[t * vocab + label]! - max - Math.log(z);
    count++;
  });
  return sum / count;
}

const int4: QuantOptions = { kind: 'int4', blockSize: 32, accuracyLevel: 0 };
// Checkpointing on (the default) and off; the frozen forward through DequantizeLinear + sgemm (the default) and
// through MatMulNBits; a maxSeqLength past the 7 tokens leaves empty chunks of the output head.
const cases: [string, QuantOptions, boolean, boolean][] = [
  ['llama', { kind: 'none' }, true, true], ['llama', int4, true, true], ['llama', int4, false, true], ['llama', int4, true, false],
  ['gpt2', int4, true, true], ['gpt2', int4, false, true],
];
for (const [arch, quant, checkpointing, dequantizedForward] of cases) {
  test(`whole tiny ${arch} (${quant.kind}, checkpointing ${checkpointing ? 'on' : 'off'}${dequantizedForward ? '' : ', MatMulNBits forward'}): LoRA gradients of the training graph match finite differences of the plain-TS forward`, async () => {
    const dir = tempDir(`train-${arch}`);
    await makeModel({ arch: arch as 'llama' | 'gpt2', size: 'tiny', outDir: dir, seed: 5 });
    const { spec, weights } = loadModelDir(dir);
    const r = 2;
    const scaling = 1.5;
    const modules = linearModules(spec).filter((m, i) => i % 3 === 0).map((m) => ({ module: m.module, inFeatures: m.inFeatures, outFeatures: m.outFeatures }));
    const { graph } = buildTrainingGraph(spec, weights, { quant, modules, r, scaling, checkpointing, dequantizedForward, maxSeqLength: 300 });
    const session = await ort.InferenceSession.create(serializeModel(graph.toOnnx()), { intraOpNumThreads: 1, extra: { session: { intra_op: { allow_spinning: '0' } } } });
    const seq = 7;
    const ids = [1, 17, 40, 99, 5, 250, 3];
    const labels = [17, 40, -100, 5, 250, 3, 8];
    const lora = modules.map((m, i) => ({ ...m, a: randomFloats(r * m.inFeatures, 100 + i, 0.3), b: randomFloats(m.outFeatures * r, 200 + i, 0.3) }));
    const feeds: Record<string, ort.Tensor> = {
      input_ids: new ort.Tensor('int64', BigInt64Array.from(ids.map(BigInt)), [1, seq]),
      labels: new ort.Tensor('int64', BigInt64Array.from(labels.map(BigInt)), [1, seq]),
    };
    for (const m of lora) {
      feeds[`lora_a.${m.module}`] = new ort.Tensor('float32', m.a, [r, m.inFeatures]);
      feeds[`lora_b.${m.module}`] = new ort.Tensor('float32', m.b, [m.outFeatures, r]);
    }
    const out = await session.run(feeds);
    await session.release();
    const base = trainedBase(spec, weights, quant);
    const loss = (l: typeof lora) => {
      const refLora: ReferenceLora[] = l.map((m) => ({ module: m.module, a: m.a, b: m.b, r, scale: scaling }));
      return crossEntropy(referenceForward(base.spec, base.get, ids, { lora: refLora }), labels, spec.vocabSize);
    };
    assert.ok(Math.abs((out['loss']!.data as Float32Array)[0]! - loss(lora)) < 1e-4, 'loss equals the reference');
    // Central differences on a sample of A and B entries of every trained module, in float64 on the reference.
    let worst = 0;
    let scale = 0;
    for (const [mi, m] of lora.entries()) {
      for (const which of ['a', 'b'] as const) {
        const grad = out[`grad_${which}.${m.module}`]!.data as Float32Array;
        const t = m[which];
        for (let k = 0; k < 3; k++) {
          const idx = (k * 7919 + mi * 31) % t.length;
          const h = 1e-3;
          const orig = t[idx]!;
          t[idx] = orig + h;
          const hi = t[idx]!; // the step as float32 really stores it
          const up = loss(lora);
          t[idx] = orig - h;
          const lo = t[idx]!;
          const down = loss(lora);
          t[idx] = orig;
          const fd = (up - down) / (hi - lo);
          worst = Math.max(worst, Math.abs(fd - grad[idx]!));
          scale = Math.max(scale, Math.abs(fd));
        }
      }
    }
    // float32 graph vs float64 finite differences (step 1e-3, float32 weights): 1e-3 of the largest gradient.
    assert.ok(worst <= 2e-3 * scale + 1e-5, `max |grad - fd| ${worst} vs max |fd| ${scale}`);
  });
}

test('LoRA dropout: eval runs without it (deterministic), every training step draws fresh masks', async () => {
  const { spec, weights } = loadModelDir(new URL('../../../../shared/models/stories260K', import.meta.url).pathname);
  const modules = linearModules(spec).slice(0, 4).map((m) => ({ module: m.module, inFeatures: m.inFeatures, outFeatures: m.outFeatures }));
  const { graph } = buildTrainingGraph(spec, weights, { quant: { kind: 'none' }, modules, r: 2, scaling: 2, dropout: 0.5, seed: 3 });
  const session = await ort.InferenceSession.create(serializeModel(graph.toOnnx()), { intraOpNumThreads: 1 });
  const ids = [1, 17, 40, 99, 5, 250, 3];
  const feeds = (train: boolean): Record<string, ort.Tensor> => {
    const f: Record<string, ort.Tensor> = {
      input_ids: new ort.Tensor('int64', BigInt64Array.from(ids.map(BigInt)), [1, 7]),
      labels: new ort.Tensor('int64', BigInt64Array.from([17, 40, 99, 5, 250, 3, 8].map(BigInt)), [1, 7]),
      train_mode: new ort.Tensor('bool', new Uint8Array([train ? 1 : 0]), []),
    };
    modules.forEach((m, i) => {
      f[`lora_a.${m.module}`] = new ort.Tensor('float32', randomFloats(2 * m.inFeatures, 300 + i, 0.3), [2, m.inFeatures]);
      f[`lora_b.${m.module}`] = new ort.Tensor('float32', randomFloats(m.outFeatures * 2, 400 + i, 0.3), [m.outFeatures, 2]);
    });
    return f;
  };
  const evalA = (await session.run(feeds(false)))['loss']!.data[0];
  const evalB = (await session.run(feeds(false)))['loss']!.data[0];
  assert.equal(evalA, evalB, 'no dropout in eval');
  const t1 = await session.run(feeds(true));
  const t2 = await session.run(feeds(true));
  assert.notEqual(t1['loss']!.data[0], t2['loss']!.data[0], 'fresh masks every training step');
  await session.release();
  // Checkpointed layers recompute the LoRA input with the forward's own mask: the same seed gives the same masks,
  // so the first step's loss and gradients equal those without checkpointing. (onnxruntime's optimizations are off
  // in both: they rewrite the unrecomputed graph's Dropout into kernels that draw other masks.)
  const firstStep = async (checkpointing: boolean) => {
    const built = buildTrainingGraph(spec, weights, { quant: { kind: 'none' }, modules, r: 2, scaling: 2, dropout: 0.5, seed: 3, checkpointing }).graph;
    const s = await ort.InferenceSession.create(serializeModel(built.toOnnx()), { intraOpNumThreads: 1, graphOptimizationLevel: 'disabled' });
    const out = await s.run(feeds(true));
    await s.release();
    return out;
  };
  const [kept, recomputed] = [await firstStep(false), await firstStep(true)];
  assert.equal(recomputed['loss']!.data[0], kept['loss']!.data[0], 'loss');
  for (const name of Object.keys(kept)) {
    const [x, y] = [recomputed[name]!.data as Float32Array, kept[name]!.data as Float32Array];
    const scale = Math.max(...y.map(Math.abs));
    assert.ok(scale > 0 && x.every((v, i) => Math.abs(v - y[i]!) <= 1e-5 * scale), `${name}: checkpointed gradient differs`);
  }
  // Off (eval mode), the dropout graph's loss and gradients are the no-dropout graph's, bit for bit.
  const plain = buildTrainingGraph(spec, weights, { quant: { kind: 'none' }, modules, r: 2, scaling: 2 }).graph;
  const plainSession = await ort.InferenceSession.create(serializeModel(plain.toOnnx()), { intraOpNumThreads: 1 });
  const withTrainMode = feeds(false);
  const off = await (await ort.InferenceSession.create(serializeModel(graph.toOnnx()), { intraOpNumThreads: 1 })).run(withTrainMode);
  delete withTrainMode['train_mode'];
  const ref = await plainSession.run(withTrainMode);
  for (const name of Object.keys(ref)) assert.deepEqual(off[name]!.data, ref[name]!.data, name);
  await plainSession.release();
});
