/**
 * kernels/autodiff.ts: tape walking (fan-out accumulation, unreachable and frozen values, errors), checkpoints, the
 * cross-entropy loss, and a composite training step (RMSNorm -> 4-bit linears with a LoRA pair -> SwiGLU ->
 * 4-bit head -> cross-entropy with ignored labels) whose gradients w.r.t. the input and the LoRA A/B match
 * central finite differences of a float64 plain-TS forward of the same composite (1e-3 of max |grad|).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Graph, type Value } from '../../kernels/ir.js';
import { gradients, quantizedLinearOp, stopGradient } from '../../kernels/autodiff.js';
import { add, matmul, mul, transpose, unary } from '../../kernels/ops/basic.js';
import { attentionContext, cachedAttention, rmsNorm, swiglu } from '../../kernels/ops/nn.js';
import { crossEntropy, crossEntropyLoss } from '../../kernels/ops/loss.js';
import { dequantizeLinear, emitLinear, quantizeLinear } from '../../kernels/quant/index.js';
import * as R from '../../kernels/reference/grad.js';
import { maxAbsDiff, randomFloats, runGraph, type Feed } from '../helpers/ort.js';

const TOL = 1e-3;

function weightedSum(g: Graph, y: Value, r: Float32Array, dims = [r.length]): Value {
  const w = g.op1('Mul', [y, g.constant('r', 'float32', dims, r)], { dtype: 'float32', shape: y.shape }, undefined, undefined, 'weighted');
  return g.op1('ReduceSum', [w], { dtype: 'float32', shape: [] }, { keepdims: 0 }, undefined, 'loss');
}

const f32 = (data: Float32Array, dims: number[]): Feed => ({ type: 'float32', data, dims });

/** The nodes gradients() appended. */
function backward(g: Graph, before: number) {
  return g.tape.slice(before);
}

test('fan-out: contributions to one value are summed (x*x + exp(x) + 3x)', async () => {
  const n = 6;
  const x = randomFloats(n, 1);
  const r = randomFloats(n, 2);
  const g = new Graph('fanout');
  const xv = g.input('x', 'float32', [n]);
  const y = add(g, add(g, mul(g, xv, xv), unary(g, 'Exp', xv)), mul(g, xv, g.scalar(3)));
  const loss = weightedSum(g, y, r);
  const before = g.tape.length;
  const [dx] = gradients(g, loss, [xv]);
  g.output(dx!, 'dx', [n]);
  // Four uses of x (Mul twice, Exp, Mul by 3): one Sum node joins them.
  assert.equal(backward(g, before).filter((t) => t.opType === 'Sum').length, 1);
  const out = await runGraph(g, { x: f32(x, [n]) });
  const expected = Array.from(x, (v, i) => r[i]! * (2 * v + Math.exp(v) + 3));
  assert.ok(R.relError(out['dx']!, expected) < 1e-6, `${R.relError(out['dx']!, expected)}`);
});

test('stopGradient: the backward takes the value as given and does not look through it (no rule needed behind it)', async () => {
  const n = 5;
  const x = randomFloats(n, 3);
  const g = new Graph('stop');
  const xv = g.input('x', 'float32', [n]);
  // loss = sum(x * stop(cos x)): d/dx = cos x, not cos x - x sin x; Cos has no rule, so looking through would throw.
  const loss = g.op1('ReduceSum', [mul(g, xv, stopGradient(g, unary(g, 'Cos', xv)))], { dtype: 'float32', shape: [] }, { keepdims: 0 }, undefined, 'loss');
  const [dx] = gradients(g, loss, [xv]);
  g.output(dx!, 'dx', [n]);
  const out = await runGraph(g, { x: f32(x, [n]) });
  assert.ok(R.relError(out['dx']!, Array.from(x, (v) => Math.cos(v))) < 1e-6);
});

test('two uses are joined with one Add; a gradient w.r.t. an intermediate value; loss of shape [1]', async () => {
  const g = new Graph('add_join');
  const xv = g.input('x', 'float32', [3]);
  const h = unary(g, 'Tanh', xv);
  const y = mul(g, h, unary(g, 'Exp', h)); // h used twice
  const r = new Float32Array([0.5, -1, 2]);
  const s = weightedSum(g, y, r);
  const loss = g.op1('Reshape', [s, g.ints([1])], { dtype: 'float32', shape: [1] });
  const before = g.tape.length;
  const [dx, dh] = gradients(g, loss, [xv, h]);
  assert.equal(backward(g, before).filter((t) => t.opType === 'Add').length, 1);
  g.output(dx!, 'dx', [3]);
  g.output(dh!, 'dh', [3]);
  const x = new Float32Array([0.3, -0.7, 1.1]);
  const out = await runGraph(g, { x: f32(x, [3]) });
  const dhRef = Array.from(x, (v, i) => { const t = Math.tanh(v); return r[i]! * Math.exp(t) * (1 + t); });
  assert.ok(R.relError(out['dh']!, dhRef) < 1e-6);
  assert.ok(R.relError(out['dx']!, dhRef.map((d, i) => d * (1 - Math.tanh(x[i]!) ** 2))) < 1e-6);
});

test('unreachable wrt values get zeros of their shape (static and symbolic)', async () => {
  const g = new Graph('unreachable');
  const xv = g.input('x', 'float32', [4]);
  const a = g.input('a', 'float32', [2, 3]);
  const b = g.input('b', 'float32', ['n', 3]);
  const loss = weightedSum(g, unary(g, 'Exp', xv), new Float32Array([1, 2, 3, 4]));
  const [da, db, dx] = gradients(g, loss, [a, b, xv]);
  g.output(da!, 'da', [2, 3]);
  g.output(db!, 'db');
  g.output(dx!, 'dx', [4]);
  const out = await runGraph(g, { x: f32(new Float32Array(4), [4]), a: f32(new Float32Array(6).fill(1), [2, 3]), b: f32(new Float32Array(15).fill(1), [5, 3]) });
  assert.deepEqual(Array.from(out['da']!), new Array(6).fill(0));
  assert.deepEqual(Array.from(out['db']!), new Array(15).fill(0));
  assert.deepEqual(Array.from(out['dx']!), [1, 2, 3, 4]);
});

test('frozen branches and masks cost nothing: only nodes on a wrt -> loss path are differentiated', () => {
  const g = new Graph('frozen');
  const xv = g.input('x', 'float32', [2, 4]);
  const c = g.input('c', 'float32', [2, 5]); // not differentiated
  const w = g.constant('w', 'float32', [4, 3], randomFloats(12, 3));
  const w2 = g.constant('w2', 'float32', [5, 3], randomFloats(15, 4));
  const frozen = unary(g, 'Cos', matmul(g, c, w2)); // Cos has no rule: visiting it would throw
  const y = add(g, matmul(g, xv, w), frozen);
  const loss = weightedSum(g, y, randomFloats(6, 5));
  const before = g.tape.length;
  gradients(g, loss, [xv]);
  const nodes = backward(g, before);
  const frozenNames = new Set([c.name, w2.name, frozen.name]);
  assert.ok(nodes.every((n) => n.inputs.every((v) => !v || !frozenNames.has(v.name))), 'a backward node reads the frozen branch');
  // ReduceSum -> Expand, Mul -> Mul by R, Add -> pass-through, MatMul -> Transpose(W) + MatMul.
  assert.deepEqual(nodes.map((n) => n.opType).sort(), ['Expand', 'MatMul', 'Mul', 'Transpose']);
});

test('errors: a node without a rule on the path, a raw emitted node on the path, a non-scalar loss', () => {
  {
    const g = new Graph('norule');
    const xv = g.input('x', 'float32', [3]);
    const loss = weightedSum(g, unary(g, 'Cos', xv), new Float32Array(3).fill(1));
    assert.throws(() => gradients(g, loss, [xv]), /no gradient rule for op Cos/);
  }
  {
    const g = new Graph('raw');
    const xv = g.input('x', 'float32', [2, 32]);
    const q = quantizeLinear(randomFloats(4 * 32, 6), 4, 32, { kind: 'int4' }, 'proj');
    for (const t of q.tensors) g.addInitializer(t);
    const y = g.fresh('proj.y');
    g.emit(emitLinear(q, xv.name, y));
    const loss = weightedSum(g, { name: y, dtype: 'float32', shape: [2, 4] }, new Float32Array(8).fill(1));
    assert.throws(() => gradients(g, loss, [xv]), /Graph\.emit.*quantizedLinearOp/);
  }
  {
    const g = new Graph('nonscalar');
    const xv = g.input('x', 'float32', [3]);
    assert.throws(() => gradients(g, unary(g, 'Exp', xv), [xv]), /must be a scalar/);
  }
});

test('checkpoints: recomputed segments give the same gradients, the backward reads no forward intermediate, bad segments are refused', async () => {
  const n = 5;
  const x = randomFloats(n, 11);
  const r = randomFloats(n, 12);
  // Two segments: h1 = tanh(x) * exp(tanh(x)), h2 = sigmoid(h1) * h1 + h1; loss = sum(r * h2).
  const build = (checkpointed: boolean) => {
    const g = new Graph('checkpoints');
    const xv = g.input('x', 'float32', [n]);
    const h0 = mul(g, xv, g.scalar(1.5));
    const a = unary(g, 'Tanh', h0);
    const e = unary(g, 'Exp', a);
    const h1 = mul(g, a, e);
    const sig = unary(g, 'Sigmoid', h1);
    const gated = mul(g, sig, h1);
    const h2 = add(g, gated, h1);
    const loss = weightedSum(g, h2, r);
    const before = g.tape.length;
    const [dx] = gradients(g, loss, [xv], { checkpoints: checkpointed ? [{ start: h0, end: h1 }, { start: h1, end: h2 }] : [] });
    g.output(dx!, 'dx', [n]);
    // Inside the segments only their starts (h0, h1) may be read by the backward: the rest is recomputed.
    const inside = new Set([a, e, sig, gated].map((v) => v.name));
    const read = backward(g, before).flatMap((t) => t.inputs.flatMap((v) => (v && inside.has(v.name) ? [v.name] : [])));
    return { g, read };
  };
  const plain = build(false);
  assert.ok(plain.read.length > 0, 'without checkpoints the backward reads the forward\'s values');
  const checkpointed = build(true);
  assert.deepEqual(checkpointed.read, [], 'the backward reads forward intermediates');
  const [ref, out] = [await runGraph(plain.g, { x: f32(x, [n]) }), await runGraph(checkpointed.g, { x: f32(x, [n]) })];
  assert.ok(maxAbsDiff(out['dx']!, ref['dx']!) <= 1e-6, `checkpointed dx differs by ${maxAbsDiff(out['dx']!, ref['dx']!)}`);
  {
    const bad = new Graph('overlap');
    const xv2 = bad.input('x', 'float32', [n]);
    const p = unary(bad, 'Exp', xv2);
    const q = unary(bad, 'Tanh', p);
    const loss = weightedSum(bad, q, r);
    assert.throws(() => gradients(bad, loss, [xv2], { checkpoints: [{ start: xv2, end: q }, { start: p, end: q }] }), /overlap/);
    assert.throws(() => gradients(bad, loss, [xv2], { checkpoints: [{ start: q, end: p }] }), /not a forward range/);
  }
});

test('crossEntropy: value, token count, gradient w.r.t. logits (finite differences), all-ignored batch', async () => {
  const batch = 2, seq = 4, V = 7;
  const logits = randomFloats(batch * seq * V, 11, 3);
  const labels = [3, -100, 0, 6, -100, 2, 2, 5];
  const g = new Graph('ce');
  const lv = g.input('logits', 'float32', ['batch', 'seq', V]);
  const yv = g.input('labels', 'int64', ['batch', 'seq']);
  const { loss, tokenCount } = crossEntropyLoss(g, lv, yv);
  const sum = crossEntropyLoss(g, lv, yv, { reduction: 'sum' }).loss;
  const [dl] = gradients(g, loss, [lv]);
  g.output(loss, 'loss', []);
  g.output(sum, 'sum', []);
  g.output(tokenCount, 'count', []);
  g.output(dl!, 'dlogits', [batch, seq, V]);
  const feeds = (lab: number[]): Record<string, Feed> => ({ logits: f32(logits, [batch, seq, V]), labels: { type: 'int64', data: lab, dims: [batch, seq] } });
  const out = await runGraph(g, feeds(labels));
  const l64 = R.t64([batch, seq, V], logits);
  const ref = R.crossEntropy(l64, labels);
  assert.ok(Math.abs(out['loss']![0]! - ref) < 1e-6 * Math.max(1, ref));
  assert.ok(Math.abs(out['sum']![0]! - ref * 6) < 1e-5 * Math.max(1, ref));
  assert.equal(out['count']![0], 6);
  const fd = R.numericGradient(() => R.crossEntropy(l64, labels), l64.data);
  const rel = R.relError(out['dlogits']!, fd);
  assert.ok(rel < TOL, `crossEntropy d/dlogits rel error ${rel}`);
  console.log(`crossEntropy d/dlogits: max rel error ${rel.toExponential(2)}`);
  // Ignored rows get exactly zero gradient.
  for (const t of [1, 4]) assert.equal(maxAbsDiff(out['dlogits']!.subarray(t * V, (t + 1) * V), new Float32Array(V)), 0);
  const none = await runGraph(g, feeds(new Array(batch * seq).fill(-100)));
  assert.equal(none['loss']![0], 0);
  assert.equal(none['count']![0], 0);
  assert.equal(maxAbsDiff(none['dlogits']!, new Float32Array(batch * seq * V)), 0);
});

for (const dequantized of [false, true]) test(`composite${dequantized ? ', int4 forward dequantized on the tape' : ''}: RMSNorm -> int4 gate + LoRA, nf4 up -> SwiGLU -> int4 head (padded K, zero points) -> cross-entropy; d/dx, dA, dB vs finite differences`, async () => {
  const batch = 2, seq = 3, H = 32, I = 48, V = 20, r = 4, scale = 0.5, eps = 1e-5;
  const x = randomFloats(batch * seq * H, 21, 1.5);
  const normW = randomFloats(H, 22, 0.5).map((v) => 1 + v);
  const qg = quantizeLinear(randomFloats(I * H, 23, 0.3), I, H, { kind: 'int4', blockSize: 32 }, 'gate_proj');
  const qu = quantizeLinear(randomFloats(I * H, 24, 0.3), I, H, { kind: 'nf4', blockSize: 64 }, 'up_proj');
  const qd = quantizeLinear(randomFloats(V * I, 25, 0.3), V, I, { kind: 'int4', blockSize: 32, symmetric: false }, 'lm_head'); // K=48: padded block
  const loraA = randomFloats(r * H, 26, 0.3); // [r, in], PEFT layout
  const loraB = randomFloats(I * r, 27, 0.3); // [out, r]
  const labels = [4, -100, 19, 0, 7, -100];

  const g = new Graph('composite');
  const xv = g.input('x', 'float32', ['batch', 'seq', H]);
  const yv = g.input('labels', 'int64', ['batch', 'seq']);
  const av = g.input('lora_a', 'float32', [r, H]);
  const bv = g.input('lora_b', 'float32', [I, r]);
  const h = rmsNorm(g, xv, g.constant('norm_w', 'float32', [H], normW), eps);
  const xa = matmul(g, h, transpose(g, av, [1, 0]), 'lora_xa');
  const gate = add(g, quantizedLinearOp(g, h, qg, undefined, { dequantized }), matmul(g, mul(g, xa, g.scalar(scale)), transpose(g, bv, [1, 0]), 'lora_delta'));
  const act = swiglu(g, gate, quantizedLinearOp(g, h, qu));
  const logits = quantizedLinearOp(g, act, qd, undefined, { dequantized });
  const loss = crossEntropy(g, logits, yv);
  const before = g.tape.length;
  const [dx, dA, dB] = gradients(g, loss, [xv, av, bv]);
  const nodes = backward(g, before);
  g.output(loss, 'loss', []);
  g.output(dx!, 'dx', [batch, seq, H]);
  g.output(dA!, 'dA', [r, H]);
  g.output(dB!, 'dB', [I, r]);
  const out = await runGraph(g, {
    x: f32(x, [batch, seq, H]), labels: { type: 'int64', data: labels, dims: [batch, seq] },
    lora_a: f32(loraA, [r, H]), lora_b: f32(loraB, [I, r]),
  });

  // float64 forward of the same composite, through the dequantized weights.
  const wT = (q: typeof qg) => R.transpose(R.t64([q.N, q.K], dequantizeLinear(q)), [1, 0]);
  const [wgT, wuT, wdT] = [wT(qg), wT(qu), wT(qd)];
  const x64 = R.t64([batch, seq, H], x);
  const a64 = R.t64([r, H], loraA);
  const b64 = R.t64([I, r], loraB);
  const w64 = R.t64([H], normW);
  const forward = () => {
    const hh = R.rmsNorm(x64, w64, Math.fround(eps));
    const delta = R.matmul(R.mul(R.matmul(hh, R.transpose(a64, [1, 0])), R.scalar(scale)), R.transpose(b64, [1, 0]));
    const gt = R.add(R.matmul(hh, wgT), delta);
    const up = R.matmul(hh, wuT);
    const a = R.map([gt, up], (gv, u) => gv! * R.sigmoid(gv!) * u!);
    return R.crossEntropy(R.matmul(a, wdT), labels);
  };
  assert.ok(Math.abs(out['loss']![0]! - forward()) < 1e-5, `loss ${out['loss']![0]} vs ${forward()}`);
  const errors: Record<string, number> = {};
  for (const [name, t] of [['dx', x64], ['dA', a64], ['dB', b64]] as const) {
    const fd = R.numericGradient(forward, t.data);
    errors[name] = R.relError(out[name]!, fd);
    assert.ok(errors[name]! < TOL, `composite ${name}: rel error ${errors[name]}`);
  }
  console.log(`composite: max rel errors ${Object.entries(errors).map(([k, v]) => `${k} ${v.toExponential(2)}`).join(', ')}; ${nodes.length} backward nodes`);
  // Lean: one dequantized copy per frozen weight, none for the norm weight's gradient.
  assert.equal(nodes.filter((n) => n.raw && n.opType === 'DequantizeLinear').length, 2);
  assert.equal(nodes.filter((n) => n.raw && n.opType === 'Gather').length, 1); // the nf4 table lookup
});

test('cached attention of nn.ts (Gather, ScatterND, grouped-query MatMul broadcast, Softmax): d/dq, dk, dv vs finite differences', async () => {
  const heads = 4, kvHeads = 2, hd = 4, kvDim = kvHeads * hd, blockLen = 4, numBlocks = 6, batch = 2, seq = 2;
  const pastLens = [3, 1];
  // Block tables, scattered and padded (row 1 fits in one block).
  const tables = [[4, 1], [2, 0]];
  const at = (b: number, t: number) => (tables[b]![Math.floor(t / blockLen)]! * blockLen + (t % blockLen)) * kvDim;
  const q = randomFloats(batch * seq * heads * hd, 41);
  const k = randomFloats(batch * seq * kvDim, 42);
  const v = randomFloats(batch * seq * kvDim, 43);
  const pk = randomFloats(numBlocks * blockLen * kvDim, 44);
  const pv = randomFloats(numBlocks * blockLen * kvDim, 45);
  const rw = randomFloats(batch * seq * heads * hd, 46);
  const positions = pastLens.flatMap((p) => [p, p + 1]);
  const g = new Graph('attn_grad');
  const pos = g.input('positions', 'int64', ['batch', 'seq']);
  const kb = g.input('kv_blocks', 'int64', ['batch', 'nblocks']);
  const qv = g.input('q', 'float32', ['batch', 'seq', heads * hd]);
  const kv = g.input('k', 'float32', ['batch', 'seq', kvDim]);
  const vv = g.input('v', 'float32', ['batch', 'seq', kvDim]);
  const pkv = g.input('pk', 'float32', ['blocks', blockLen, kvDim]);
  const pvv = g.input('pv', 'float32', ['blocks', blockLen, kvDim]);
  const y = cachedAttention(g, { numHeads: heads, numKvHeads: kvHeads, headDim: hd }, qv, kv, vv, pkv, pvv, kb, attentionContext(g, pos, kb, pkv));
  const loss = weightedSum(g, y, rw, [batch, seq, heads * hd]);
  const [dq, dk, dv] = gradients(g, loss, [qv, kv, vv]);
  g.output(dq!, 'dq', [batch, seq, heads * hd]);
  g.output(dk!, 'dk', [batch, seq, kvDim]);
  g.output(dv!, 'dv', [batch, seq, kvDim]);
  const out = await runGraph(g, {
    positions: { type: 'int64', data: positions, dims: [batch, seq] }, kv_blocks: { type: 'int64', data: tables.flat(), dims: [batch, 2] },
    q: f32(q, [batch, seq, heads * hd]), k: f32(k, [batch, seq, kvDim]), v: f32(v, [batch, seq, kvDim]),
    pk: f32(pk, [numBlocks, blockLen, kvDim]), pv: f32(pv, [numBlocks, blockLen, kvDim]),
  });
  // float64 reference: row b's keys are its cached rows 0..p-1 then its new tokens.
  const q64 = Float64Array.from(q), k64 = Float64Array.from(k), v64 = Float64Array.from(v);
  const forward = () => {
    let total = 0;
    for (let b = 0; b < batch; b++) {
      const p = pastLens[b]!;
      const key = (t: number, h: number, d: number, src: Float64Array, cache: Float32Array) =>
        t < p ? cache[at(b, t) + h * hd + d]! : src[(b * seq + t - p) * kvDim + h * hd + d]!;
      for (let s = 0; s < seq; s++) {
        for (let h = 0; h < heads; h++) {
          const kh = Math.floor(h / (heads / kvHeads));
          const scores: number[] = [];
          for (let t = 0; t <= p + s; t++) {
            let dot = 0;
            for (let d = 0; d < hd; d++) dot += q64[((b * seq + s) * heads + h) * hd + d]! * key(t, kh, d, k64, pk);
            scores.push(dot / Math.sqrt(hd));
          }
          const m = Math.max(...scores);
          const e = scores.map((x) => Math.exp(x - m));
          const z = e.reduce((a, b2) => a + b2, 0);
          for (let d = 0; d < hd; d++) {
            let o = 0;
            e.forEach((w, t) => { o += (w / z) * key(t, kh, d, v64, pv); });
            total += o * rw[((b * seq + s) * heads + h) * hd + d]!;
          }
        }
      }
    }
    return total;
  };
  const errors: string[] = [];
  for (const [name, t] of [['dq', q64], ['dk', k64], ['dv', v64]] as const) {
    const rel = R.relError(out[name]!, R.numericGradient(forward, t));
    errors.push(`${name} ${rel.toExponential(2)}`);
    assert.ok(rel < TOL, `attention ${name}: rel error ${rel}`);
  }
  console.log(`cached attention: max rel errors ${errors.join(', ')}`);
});
