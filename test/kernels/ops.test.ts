import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Graph } from '../../kernels/ir.js';
import { gather, reshape } from '../../kernels/ops/basic.js';
import { attentionContext, cachedAttention, embedding, gelu, layerNorm, loraDelta, rmsNorm, rotary, rotaryTables, swiglu } from '../../kernels/ops/nn.js';
import * as ref from '../../kernels/reference/transformer.js';
import { quantizedLinear } from '../../src/models/linear.js';
import { dequantizeLinear, quantizeLinear } from '../../kernels/quant/index.js';
import { f16ToF32, f32ToF16Bits } from '../../src/models/safetensors.js';
import { maxAbsDiff, randomFloats, runGraph } from '../helpers/ort.js';

// Each op's ONNX emission, run on onnxruntime, against its plain-TS reference in kernels/reference.
// Float32 kernels differ from float64 references by rounding only: 1e-5 absolute on O(1) values.
const TOL = 1e-5;

test('embedding: float32 and float16 tables', async () => {
  const vocab = 11, dim = 6, ids = [3, 0, 10, 3];
  const table = randomFloats(vocab * dim, 1);
  for (const fp16 of [false, true]) {
    const g = new Graph('embed');
    const x = g.input('ids', 'int64', [1, 4]);
    const t = fp16
      ? g.constant('table', 'float16', [vocab, dim], Uint16Array.from(table, (v) => f32ToF16Bits(v)))
      : g.constant('table', 'float32', [vocab, dim], table);
    g.output(embedding(g, t, x), 'y');
    const out = await runGraph(g, { ids: { type: 'int64', data: ids, dims: [1, 4] } });
    let expectTable = table;
    if (fp16) {
      expectTable = new Float32Array(table.length);
      f16ToF32(Uint16Array.from(table, (v) => f32ToF16Bits(v)), expectTable);
    }
    assert.equal(maxAbsDiff(out['y']!, ref.embed(expectTable, ids, vocab, dim)), 0);
  }
});

test('rmsNorm and layerNorm', async () => {
  const rows = 5, dim = 12;
  const x = randomFloats(rows * dim, 2, 3);
  const w = randomFloats(dim, 3);
  const b = randomFloats(dim, 4);
  const g = new Graph('norms');
  const xv = g.input('x', 'float32', [rows, dim]);
  g.output(rmsNorm(g, xv, g.constant('w', 'float32', [dim], w), 1e-5), 'rms');
  g.output(layerNorm(g, xv, g.constant('w2', 'float32', [dim], w), g.constant('b', 'float32', [dim], b), 1e-5), 'ln');
  const out = await runGraph(g, { x: { type: 'float32', data: x, dims: [rows, dim] } });
  assert.ok(maxAbsDiff(out['rms']!, ref.rmsNorm(x, w, rows, dim, 1e-5)) < TOL);
  assert.ok(maxAbsDiff(out['ln']!, ref.layerNorm(x, w, b, rows, dim, 1e-5)) < TOL);
});

test('rotary (rotate-half) at arbitrary positions', async () => {
  const seq = 4, heads = 3, hd = 8, maxPos = 300, theta = 10000;
  const positions = [0, 7, 150, 299];
  const x = randomFloats(seq * heads * hd, 5);
  const tables = rotaryTables(maxPos, hd, theta);
  const g = new Graph('rope');
  const xv = g.input('x', 'float32', [1, seq, heads, hd]);
  const pos = g.input('pos', 'int64', [1, seq]);
  const cos = reshape(g, gather(g, g.constant('cos', 'float32', [maxPos, hd / 2], tables.cos), pos), [0, 0, 1, hd / 2]);
  const sin = reshape(g, gather(g, g.constant('sin', 'float32', [maxPos, hd / 2], tables.sin), pos), [0, 0, 1, hd / 2]);
  g.output(rotary(g, xv, cos, sin, hd), 'y');
  const out = await runGraph(g, { x: { type: 'float32', data: x, dims: [1, seq, heads, hd] }, pos: { type: 'int64', data: positions, dims: [1, seq] } });
  const expected = x.slice();
  ref.applyRotary(expected, seq, heads, hd, positions, theta);
  // Angles are rounded to float32 as in HF, so large positions differ from the float64 reference by ~pos * 2^-24.
  assert.ok(maxAbsDiff(out['y']!, expected) < 1e-4);
});

test('cached attention: ragged rows over a block-paged cache, scattered blocks, grouped-query', async () => {
  const heads = 4, kvHeads = 2, hd = 4, kvDim = kvHeads * hd, blockLen = 4, numBlocks = 7;
  const pastLens = [5, 2]; // two batch rows
  // Row 0's positions live in blocks 5 then 2 (out of order); row 1's in block 3, padded with block 0.
  const tables = [[5, 2], [3, 0]];
  const seq = 2;
  // Full per-row K/V for positions 0..past+seq-1 (the reference sees them all).
  const fullK = pastLens.map((p, i) => randomFloats((p + seq) * kvDim, 10 + i));
  const fullV = pastLens.map((p, i) => randomFloats((p + seq) * kvDim, 20 + i));
  const q = randomFloats(2 * seq * heads * hd, 30);
  // Garbage wherever a row has nothing cached (other blocks, the padding, stale data): it must be masked out.
  const poolK = randomFloats(numBlocks * blockLen * kvDim, 40, 100);
  const poolV = randomFloats(numBlocks * blockLen * kvDim, 41, 100);
  const at = (b: number, t: number) => (tables[b]![Math.floor(t / blockLen)]! * blockLen + (t % blockLen)) * kvDim;
  pastLens.forEach((p, b) => {
    for (let t = 0; t < p; t++) {
      poolK.set(fullK[b]!.subarray(t * kvDim, (t + 1) * kvDim), at(b, t));
      poolV.set(fullV[b]!.subarray(t * kvDim, (t + 1) * kvDim), at(b, t));
    }
  });
  const newK = new Float32Array(2 * seq * kvDim);
  const newV = new Float32Array(2 * seq * kvDim);
  pastLens.forEach((p, b) => {
    newK.set(fullK[b]!.subarray(p * kvDim), b * seq * kvDim);
    newV.set(fullV[b]!.subarray(p * kvDim), b * seq * kvDim);
  });
  const g = new Graph('attn');
  const pos = g.input('positions', 'int64', [2, seq]);
  const kb = g.input('kv_blocks', 'int64', [2, 'nblocks']);
  const qv = g.input('q', 'float32', [2, seq, heads * hd]);
  const kv = g.input('k', 'float32', [2, seq, kvDim]);
  const vv = g.input('v', 'float32', [2, seq, kvDim]);
  const pk = g.input('pk', 'float32', ['blocks', blockLen, kvDim]);
  const pv = g.input('pv', 'float32', ['blocks', blockLen, kvDim]);
  const ctx = attentionContext(g, pos, kb, pk);
  g.output(cachedAttention(g, { numHeads: heads, numKvHeads: kvHeads, headDim: hd }, qv, kv, vv, pk, pv, kb, ctx), 'y');
  const out = await runGraph(g, {
    positions: { type: 'int64', data: pastLens.flatMap((p) => [p, p + 1]), dims: [2, seq] },
    kv_blocks: { type: 'int64', data: tables.flat(), dims: [2, 2] },
    q: { type: 'float32', data: q, dims: [2, seq, heads * hd] },
    k: { type: 'float32', data: newK, dims: [2, seq, kvDim] },
    v: { type: 'float32', data: newV, dims: [2, seq, kvDim] },
    pk: { type: 'float32', data: poolK, dims: [numBlocks, blockLen, kvDim] },
    pv: { type: 'float32', data: poolV, dims: [numBlocks, blockLen, kvDim] },
  });
  for (let b = 0; b < 2; b++) {
    const p = pastLens[b]!;
    const expected = ref.attention(q.subarray(b * seq * heads * hd, (b + 1) * seq * heads * hd), fullK[b]!, fullV[b]!, seq, p + seq, heads, kvHeads, hd, p);
    assert.ok(maxAbsDiff(out['y']!.subarray(b * seq * heads * hd, (b + 1) * seq * heads * hd), expected) < TOL, `row ${b}`);
  }
});

test('SwiGLU and GELU (tanh and erf)', async () => {
  const n = 40;
  const a = randomFloats(n, 50, 4);
  const b = randomFloats(n, 51, 2);
  const g = new Graph('act');
  const av = g.input('a', 'float32', [n]);
  const bv = g.input('b', 'float32', [n]);
  g.output(swiglu(g, av, bv), 'swiglu');
  g.output(gelu(g, av, 'tanh'), 'gelu_tanh');
  g.output(gelu(g, av, 'none'), 'gelu_erf');
  const out = await runGraph(g, { a: { type: 'float32', data: a, dims: [n] }, b: { type: 'float32', data: b, dims: [n] } });
  const s = ref.silu(a, new Float32Array(n)).map((v, i) => v * b[i]!);
  assert.ok(maxAbsDiff(out['swiglu']!, s) < TOL);
  assert.ok(maxAbsDiff(out['gelu_tanh']!, ref.geluNew(a, new Float32Array(n))) < TOL);
  assert.ok(maxAbsDiff(out['gelu_erf']!, ref.gelu(a, new Float32Array(n))) < TOL);
});

test('4-bit linear and per-row LoRA from pooled slots', async () => {
  const inF = 72, outF = 20, rMax = 4, slots = 3, batch = 3, seq = 2;
  const w = randomFloats(outF * inF, 60, 0.5);
  const x = randomFloats(batch * seq * inF, 61);
  // Slot 1: rank 2, slot 2: rank 4; rows use slots [2, 0, 1].
  const adapters = [null, { r: 2, a: randomFloats(2 * inF, 62), b: randomFloats(outF * 2, 63), scale: 0.5 }, { r: 4, a: randomFloats(4 * inF, 64), b: randomFloats(outF * 4, 65), scale: 2 }];
  const poolA = new Float32Array(slots * inF * rMax);
  const poolB = new Float32Array(slots * rMax * outF);
  adapters.forEach((ad, s) => {
    if (!ad) return;
    for (let j = 0; j < ad.r; j++) {
      for (let i = 0; i < inF; i++) poolA[(s * rMax + j) * inF + i] = ad.a[j * inF + i]!;
      for (let o = 0; o < outF; o++) poolB[(s * outF + o) * rMax + j] = ad.b[o * ad.r + j]!;
    }
  });
  const slotOfRow = [2, 0, 1];
  const rowScale = [1, 1, -0.5]; // a request may scale its adapter (adapter_scale)
  const quant = { kind: 'int4' as const, blockSize: 32, accuracyLevel: 0 };
  const g = new Graph('lora');
  const xv = g.input('x', 'float32', [batch, seq, inF]);
  const slot = g.input('slot', 'int64', [batch]);
  const pa = g.input('pa', 'float32', [slots, rMax, inF]);
  const pb = g.input('pb', 'float32', [slots, outF, rMax]);
  const base = quantizedLinear(quant)(g, xv, 'proj', { shape: [outF, inF], data: w }, null);
  g.output(base, 'base');
  const scale = reshape(g, g.input('scale', 'float32', [batch]), [-1, 1, 1]);
  g.output(loraDelta(g, xv, pa, pb, slot, scale), 'delta');
  const out = await runGraph(g, {
    x: { type: 'float32', data: x, dims: [batch, seq, inF] },
    slot: { type: 'int64', data: slotOfRow, dims: [batch] },
    pa: { type: 'float32', data: poolA, dims: [slots, rMax, inF] },
    pb: { type: 'float32', data: poolB, dims: [slots, outF, rMax] },
    // The pool holds PEFT's A and B; each row's scale is the adapter's scaling times the request's weight.
    scale: { type: 'float32', data: Float32Array.from(slotOfRow, (s, b) => (adapters[s]?.scale ?? 0) * rowScale[b]!), dims: [batch] },
  });
  const wq = dequantizeLinear(quantizeLinear(w, outF, inF, quant, 'proj'));
  assert.ok(maxAbsDiff(out['base']!, ref.linear(x, wq, null, batch * seq, inF, outF)) < 1e-4);
  const zero = new Float32Array(outF * inF);
  for (let b = 0; b < batch; b++) {
    const ad = adapters[slotOfRow[b]!];
    const loras = ad ? [{ module: 'proj', ...ad, scale: ad.scale * rowScale[b]! }] : [];
    const expected = ref.linear(x.subarray(b * seq * inF, (b + 1) * seq * inF), zero, null, seq, inF, outF, loras);
    assert.ok(maxAbsDiff(out['delta']!.subarray(b * seq * outF, (b + 1) * seq * outF), expected) < TOL, `row ${b}`);
  }
});
