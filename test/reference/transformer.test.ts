import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { HostTensor, ModelSpec } from '../../src/models/spec.js';
import { SafetensorsSource } from '../../src/models/safetensors.js';
import {
  ReferenceDecoder,
  argmax,
  erf,
  erfc,
  referenceForward,
  referenceGreedy,
  referenceWeights,
  type ReferenceLora,
} from '../../kernels/reference/transformer.js';

const STORIES = '/work/shared/models/stories260K';

interface ReferenceCase {
  prompt_ids_with_bos: number[];
  greedy_new_ids: number[];
  logits_pos0: number[];
  logits_last_prompt_pos: number[];
}

/** A llama ModelSpec straight from config.json (kept local: the test must not depend on the engine's parser). */
function llamaSpec(dir: string): ModelSpec {
  const c = JSON.parse(readFileSync(join(dir, 'config.json'), 'utf8'));
  return {
    family: 'llama',
    modelType: c.model_type,
    hiddenSize: c.hidden_size,
    intermediateSize: c.intermediate_size,
    numLayers: c.num_hidden_layers,
    numHeads: c.num_attention_heads,
    numKvHeads: c.num_key_value_heads ?? c.num_attention_heads,
    headDim: c.head_dim ?? c.hidden_size / c.num_attention_heads,
    vocabSize: c.vocab_size,
    maxPositions: c.max_position_embeddings,
    normEps: c.rms_norm_eps,
    ropeTheta: c.rope_theta,
    attentionBias: !!c.attention_bias,
    outputBias: false,
    mlpBias: !!c.mlp_bias,
    hiddenAct: 'silu',
    tieWordEmbeddings: !!c.tie_word_embeddings,
    bosTokenId: c.bos_token_id,
    eosTokenIds: [c.eos_token_id],
  };
}

const storiesSpec = llamaSpec(STORIES);
const storiesWeights = referenceWeights(SafetensorsSource.fromModelDir(STORIES));
const refCase = (JSON.parse(readFileSync(join(STORIES, 'reference.json'), 'utf8')) as { cases: ReferenceCase[] }).cases[0]!;

function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>, aOff = 0, bOff = 0, n = b.length): number {
  let m = 0;
  for (let i = 0; i < n; i++) m = Math.max(m, Math.abs(a[aOff + i]! - b[bOff + i]!));
  return m;
}

/** Deterministic uniform numbers in [-scale, scale). */
function rng(seed: number): (scale?: number) => number {
  let s = seed >>> 0;
  return (scale = 1) => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((((t ^ (t >>> 14)) >>> 0) / 4294967296) * 2 - 1) * scale;
  };
}

function randomArray(n: number, r: (s?: number) => number, scale: number, offset = 0): Float32Array {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = offset + r(scale);
  return a;
}

// ---------------------------------------------------------------------------------------------------------
// stories260K against llama2.c

test('stories260K: logits match llama2.c reference.json within 1e-4', (t) => {
  const V = storiesSpec.vocabSize;
  const ids = refCase.prompt_ids_with_bos;
  const logits = referenceForward(storiesSpec, storiesWeights, ids);
  assert.equal(logits.length, ids.length * V);
  const e0 = maxAbsDiff(logits, refCase.logits_pos0, 0);
  const eLast = maxAbsDiff(logits, refCase.logits_last_prompt_pos, (ids.length - 1) * V);
  t.diagnostic(`max |logit error| pos0 ${e0.toExponential(3)}, last prompt pos ${eLast.toExponential(3)}`);
  assert.ok(e0 < 1e-4, `pos0 max error ${e0}`);
  assert.ok(eLast < 1e-4, `last prompt pos max error ${eLast}`);
});

test('stories260K: greedy decoding of 48 tokens equals llama2.c', () => {
  const got = referenceGreedy(storiesSpec, storiesWeights, refCase.prompt_ids_with_bos, refCase.greedy_new_ids.length);
  assert.deepEqual(got, refCase.greedy_new_ids);
  // The full (non-cached) forward over prompt + generated agrees: teacher-forced argmax at every step.
  const seq = [...refCase.prompt_ids_with_bos, ...refCase.greedy_new_ids];
  const logits = referenceForward(storiesSpec, storiesWeights, seq.slice(0, -1));
  const V = storiesSpec.vocabSize;
  const P = refCase.prompt_ids_with_bos.length;
  const teacher = refCase.greedy_new_ids.map((_, i) => argmax(logits, (P - 1 + i) * V, V));
  assert.deepEqual(teacher, refCase.greedy_new_ids);
});

test('stories260K: incremental decoding equals the full forward; kvCache has the HF layout', () => {
  const seq = [...refCase.prompt_ids_with_bos, ...refCase.greedy_new_ids.slice(0, 11)];
  const full = referenceForward(storiesSpec, storiesWeights, seq);
  const dec = new ReferenceDecoder(storiesSpec, storiesWeights);
  const parts = [dec.step(seq.slice(0, 5)), dec.step(seq.slice(5, 6)), dec.step(seq.slice(6))];
  const inc = new Float32Array(full.length);
  let off = 0;
  for (const p of parts) {
    inc.set(p, off);
    off += p.length;
  }
  assert.equal(maxAbsDiff(inc, full), 0);
  assert.equal(dec.length, seq.length);
  const { key, value } = dec.kvCache(0);
  assert.equal(key.length, storiesSpec.numKvHeads * seq.length * storiesSpec.headDim);
  assert.equal(value.length, key.length);
});

test('stories260K: grouped-query attention equals MHA with each kv head repeated', () => {
  // Head h reads kv head floor(h / group): repeating k/v rows per head must give the same logits.
  const s = storiesSpec;
  const group = s.numHeads / s.numKvHeads;
  assert.ok(group > 1, 'stories260K uses GQA');
  const D = s.headDim;
  const H = s.hiddenSize;
  const expand = (w: Float32Array) => {
    const out = new Float32Array(s.numHeads * D * H);
    for (let h = 0; h < s.numHeads; h++) out.set(w.subarray(Math.floor(h / group) * D * H, (Math.floor(h / group) + 1) * D * H), h * D * H);
    return out;
  };
  const overrides = new Map<string, HostTensor>();
  for (let i = 0; i < s.numLayers; i++) {
    for (const m of ['k_proj', 'v_proj']) {
      const name = `model.layers.${i}.self_attn.${m}.weight`;
      overrides.set(name, { shape: [s.numHeads * D, H], data: expand(storiesWeights.get(name).data) });
    }
  }
  const mha = { ...s, numKvHeads: s.numHeads };
  const wMha = (name: string) => overrides.get(name) ?? storiesWeights.get(name);
  const ids = refCase.prompt_ids_with_bos;
  const e = maxAbsDiff(referenceForward(mha, wMha, ids), referenceForward(s, storiesWeights, ids));
  assert.ok(e < 1e-6, `GQA vs repeated MHA: ${e}`);
});

test('referenceWeights: overrides replace tensors and must keep their shape', () => {
  const src = SafetensorsSource.fromModelDir(STORIES);
  const name = 'model.norm.weight';
  const zero = { shape: [storiesSpec.hiddenSize], data: new Float32Array(storiesSpec.hiddenSize) };
  const w = referenceWeights(src, { [name]: zero });
  // A zero final norm zeroes every logit.
  const logits = referenceForward(storiesSpec, w, [1, 2, 3]);
  assert.ok(logits.every((v) => v === 0));
  const bad = referenceWeights(src, new Map([[name, { shape: [3], data: new Float32Array(3) }]]));
  assert.throws(() => bad.get(name), /shape/);
});

// ---------------------------------------------------------------------------------------------------------
// LoRA

/** W [out, in] + scale * B A, as a new tensor. */
function mergeLinear(w: Float32Array, l: ReferenceLora, inDim: number, outDim: number): Float32Array {
  const m = Float32Array.from(w);
  for (let o = 0; o < outDim; o++) {
    for (let i = 0; i < inDim; i++) {
      let d = 0;
      for (let k = 0; k < l.r; k++) d += l.b[o * l.r + k]! * l.a[k * inDim + i]!;
      m[o * inDim + i] = m[o * inDim + i]! + l.scale * d;
    }
  }
  return m;
}

function randomLora(module: string, r: number, inDim: number, outDim: number, scale: number, seed: number): ReferenceLora {
  const g = rng(seed);
  return { module, r, scale, a: randomArray(r * inDim, g, 0.3), b: randomArray(outDim * r, g, 0.3) };
}

test('LoRA on a llama module equals the dense merge W + scale * B A', (t) => {
  const s = storiesSpec;
  const ids = refCase.prompt_ids_with_bos;
  const cases: { module: string; inDim: number; outDim: number }[] = [
    { module: 'model.layers.0.self_attn.q_proj', inDim: s.hiddenSize, outDim: s.numHeads * s.headDim },
    { module: 'model.layers.3.mlp.down_proj', inDim: s.intermediateSize, outDim: s.hiddenSize },
  ];
  for (const [ci, c] of cases.entries()) {
    const loras = [randomLora(c.module, 4, c.inDim, c.outDim, 2, 10 + ci), randomLora(c.module, 2, c.inDim, c.outDim, 0.5, 20 + ci)];
    const withLora = referenceForward(s, storiesWeights, ids, { lora: loras });
    const base = referenceForward(s, storiesWeights, ids);
    assert.ok(maxAbsDiff(withLora, base) > 1e-2, 'the adapter changes the logits');
    // Several adapters on one module add up: merge each in turn.
    let merged = storiesWeights.get(`${c.module}.weight`).data;
    for (const l of loras) merged = mergeLinear(merged, l, c.inDim, c.outDim);
    const w = referenceWeights(storiesWeights, { [`${c.module}.weight`]: { shape: [c.outDim, c.inDim], data: merged } });
    const e = maxAbsDiff(withLora, referenceForward(s, w, ids));
    t.diagnostic(`${c.module}: LoRA vs merged max |diff| ${e.toExponential(3)}`);
    assert.ok(e < 1e-5, `${c.module}: ${e}`);
  }
  assert.throws(() => referenceForward(s, storiesWeights, ids, { lora: [randomLora('model.layers.0.self_attn.qproj', 1, 64, 64, 1, 1)] }), /not a module/);
  assert.throws(() => referenceForward(s, storiesWeights, ids, { lora: [randomLora(cases[0]!.module, 1, 63, 64, 1, 1)] }), /expected/);
});

// ---------------------------------------------------------------------------------------------------------
// GPT-2

function gpt2Spec(numLayers: number, hiddenAct: 'gelu_new' | 'gelu'): ModelSpec {
  return {
    family: 'gpt2',
    modelType: 'gpt2',
    hiddenSize: 16,
    intermediateSize: 64,
    numLayers,
    numHeads: 2,
    numKvHeads: 2,
    headDim: 8,
    vocabSize: 50,
    maxPositions: 32,
    normEps: 1e-5,
    ropeTheta: 0,
    attentionBias: true,
    outputBias: true,
    mlpBias: true,
    hiddenAct,
    tieWordEmbeddings: true,
    bosTokenId: null,
    eosTokenIds: [0],
  };
}

function gpt2Weights(s: ModelSpec, seed: number): Map<string, HostTensor> {
  const g = rng(seed);
  const H = s.hiddenSize;
  const I = s.intermediateSize;
  const w = new Map<string, HostTensor>();
  const put = (name: string, shape: number[], scale: number, offset = 0) =>
    w.set(name, { shape, data: randomArray(shape.reduce((a, b) => a * b, 1), g, scale, offset) });
  put('wte.weight', [s.vocabSize, H], 0.5);
  put('wpe.weight', [s.maxPositions, H], 0.3);
  for (let i = 0; i < s.numLayers; i++) {
    put(`h.${i}.ln_1.weight`, [H], 0.2, 1);
    put(`h.${i}.ln_1.bias`, [H], 0.1);
    put(`h.${i}.attn.c_attn.weight`, [H, 3 * H], 0.4);
    put(`h.${i}.attn.c_attn.bias`, [3 * H], 0.1);
    put(`h.${i}.attn.c_proj.weight`, [H, H], 0.3);
    put(`h.${i}.attn.c_proj.bias`, [H], 0.1);
    put(`h.${i}.ln_2.weight`, [H], 0.2, 1);
    put(`h.${i}.ln_2.bias`, [H], 0.1);
    put(`h.${i}.mlp.c_fc.weight`, [H, I], 0.4);
    put(`h.${i}.mlp.c_fc.bias`, [I], 0.3);
    put(`h.${i}.mlp.c_proj.weight`, [I, H], 0.2);
    put(`h.${i}.mlp.c_proj.bias`, [H], 0.1);
  }
  put('ln_f.weight', [H], 0.2, 1);
  put('ln_f.bias', [H], 0.1);
  return w;
}

/** erf by Simpson's rule on 2/sqrt(pi) e^{-u^2}: independent of the series/continued fraction under test. */
function erfBySimpson(x: number): number {
  const n = 4000;
  const h = x / n;
  let s = 1 + Math.exp(-x * x);
  for (let i = 1; i < n; i++) s += (i % 2 ? 4 : 2) * Math.exp(-((i * h) ** 2));
  return ((2 / Math.sqrt(Math.PI)) * s * h) / 3;
}

/**
 * GPT-2 written out directly from the formulas, one scalar at a time in float64 with nested number arrays,
 * sharing no code with the reference.
 */
function directGpt2(s: ModelSpec, P: Map<string, HostTensor>, ids: number[]): number[][] {
  const H = s.hiddenSize;
  const I = s.intermediateSize;
  const D = s.headDim;
  const W = (n: string) => P.get(n)!.data;
  const T = ids.length;
  const ln = (v: number[], w: Float32Array, b: Float32Array) => {
    const mu = v.reduce((a, c) => a + c, 0) / v.length;
    const va = v.reduce((a, c) => a + (c - mu) * (c - mu), 0) / v.length;
    return v.map((c, j) => ((c - mu) / Math.sqrt(va + s.normEps)) * w[j]! + b[j]!);
  };
  // y[o] = b[o] + sum_i v[i] W[i][o], W stored [in, out].
  const conv = (v: number[], w: Float32Array, b: Float32Array, outDim: number) =>
    Array.from({ length: outDim }, (_, o) => v.reduce((a, c, i) => a + c * w[i * outDim + o]!, b[o]!));
  const act = (u: number) =>
    s.hiddenAct === 'gelu'
      ? 0.5 * u * (1 + erfBySimpson(u / Math.SQRT2))
      : 0.5 * u * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (u + 0.044715 * u ** 3)));
  let x = ids.map((id, t) => Array.from({ length: H }, (_, j) => W('wte.weight')[id * H + j]! + W('wpe.weight')[t * H + j]!));
  for (let l = 0; l < s.numLayers; l++) {
    const p = `h.${l}`;
    const qkv = x.map((v) => conv(ln(v, W(`${p}.ln_1.weight`), W(`${p}.ln_1.bias`)), W(`${p}.attn.c_attn.weight`), W(`${p}.attn.c_attn.bias`), 3 * H));
    const att = x.map((_, t) => {
      const out: number[] = [];
      for (let h = 0; h < s.numHeads; h++) {
        const dot = (u: number) => {
          let d = 0;
          for (let e = 0; e < D; e++) d += qkv[t]![h * D + e]! * qkv[u]![H + h * D + e]!;
          return d / Math.sqrt(D);
        };
        const scores = Array.from({ length: t + 1 }, (_, u) => Math.exp(dot(u)));
        const z = scores.reduce((a, c) => a + c, 0);
        for (let e = 0; e < D; e++) out.push(scores.reduce((a, c, u) => a + (c / z) * qkv[u]![2 * H + h * D + e]!, 0));
      }
      return out;
    });
    x = x.map((v, t) => {
      const o = conv(att[t]!, W(`${p}.attn.c_proj.weight`), W(`${p}.attn.c_proj.bias`), H);
      return v.map((c, j) => c + o[j]!);
    });
    x = x.map((v) => {
      const f = conv(ln(v, W(`${p}.ln_2.weight`), W(`${p}.ln_2.bias`)), W(`${p}.mlp.c_fc.weight`), W(`${p}.mlp.c_fc.bias`), I).map(act);
      const m = conv(f, W(`${p}.mlp.c_proj.weight`), W(`${p}.mlp.c_proj.bias`), H);
      return v.map((c, j) => c + m[j]!);
    });
  }
  return x.map((v) => {
    const f = ln(v, W('ln_f.weight'), W('ln_f.bias'));
    return Array.from({ length: s.vocabSize }, (_, k) => f.reduce((a, c, j) => a + c * W('wte.weight')[k * H + j]!, 0));
  });
}

test('gpt2: the reference equals a direct formula-by-formula computation', (t) => {
  const ids = [3, 17, 42, 0, 49, 8, 8, 25, 11, 30];
  for (const act of ['gelu_new', 'gelu'] as const) {
    for (const layers of [1, 2]) {
      const s = gpt2Spec(layers, act);
      const w = gpt2Weights(s, 7 + layers);
      const logits = referenceForward(s, w, ids);
      const direct = directGpt2(s, w, ids);
      let e = 0;
      let scale = 0;
      direct.forEach((row, r) => {
        e = Math.max(e, maxAbsDiff(logits, row, r * s.vocabSize));
        for (const v of row) scale = Math.max(scale, Math.abs(v));
      });
      t.diagnostic(`gpt2 ${act}, ${layers} layer(s): max |diff| ${e.toExponential(3)} (max |logit| ${scale.toFixed(2)})`);
      assert.ok(scale > 1, 'logits are not trivially small');
      assert.ok(e < 1e-5, `${act} ${layers} layers: ${e}`);
      // The tolerance is tight enough to tell exact gelu from its tanh approximation.
      const other = referenceForward({ ...s, hiddenAct: act === 'gelu' ? 'gelu_new' : 'gelu' }, w, ids);
      assert.ok(maxAbsDiff(logits, other) > 1e-4, 'gelu and gelu_new differ visibly');
    }
  }
});

test('gpt2 and llama: changing a later token never changes earlier logits', () => {
  const s = gpt2Spec(2, 'gelu_new');
  const w = gpt2Weights(s, 99);
  const ids = [5, 6, 7, 8, 9, 10, 11, 12];
  const models: [ModelSpec, Parameters<typeof referenceForward>[1], number[]][] = [
    [s, w, ids],
    [storiesSpec, storiesWeights, refCase.prompt_ids_with_bos.concat(refCase.greedy_new_ids.slice(0, 3))],
  ];
  for (const [spec, weights, seq] of models) {
    const V = spec.vocabSize;
    const a = referenceForward(spec, weights, seq);
    for (const k of [1, Math.floor(seq.length / 2), seq.length - 1]) {
      const changed = [...seq];
      changed[k] = (changed[k]! + 13) % V;
      const b = referenceForward(spec, weights, changed);
      assert.equal(maxAbsDiff(a.subarray(0, k * V), b.subarray(0, k * V)), 0, `${spec.modelType}: rows before ${k} unchanged`);
      assert.ok(maxAbsDiff(a.subarray(k * V), b.subarray(k * V)) > 1e-3, `${spec.modelType}: rows from ${k} change`);
    }
  }
});

test('gpt2: LoRA on the Conv1D c_attn equals the dense merge', () => {
  const s = gpt2Spec(2, 'gelu_new');
  const w = gpt2Weights(s, 5);
  const H = s.hiddenSize;
  const l = randomLora('h.1.attn.c_attn', 3, H, 3 * H, 1.5, 77);
  const ids = [1, 2, 3, 4, 5, 6];
  const withLora = referenceForward(s, w, ids, { lora: [l] });
  // Conv1D stores W [in, out]: W[i, o] += scale * (B A)[o, i].
  const name = 'h.1.attn.c_attn.weight';
  const m = Float32Array.from(w.get(name)!.data);
  for (let i = 0; i < H; i++) for (let o = 0; o < 3 * H; o++) {
    let d = 0;
    for (let k = 0; k < l.r; k++) d += l.b[o * l.r + k]! * l.a[k * H + i]!;
    m[i * 3 * H + o] = m[i * 3 * H + o]! + l.scale * d;
  }
  const merged = new Map(w);
  merged.set(name, { shape: [H, 3 * H], data: m });
  assert.ok(maxAbsDiff(withLora, referenceForward(s, w, ids)) > 1e-2);
  const e = maxAbsDiff(withLora, referenceForward(s, merged, ids));
  assert.ok(e < 1e-5, `${e}`);
});

test('erf / erfc match known values', () => {
  // Values from a libm erf/erfc (float64).
  const known: [number, number, number][] = [
    [0.1, 0.1124629160182849, 0.8875370839817152],
    [0.5, 0.5204998778130465, 0.4795001221869535],
    [1, 0.8427007929497149, 0.15729920705028513],
    [2, 0.9953222650189527, 0.004677734981047265],
    [2.5, 0.999593047982555, 0.0004069520174449589],
    [3, 0.9999779095030014, 2.2090496998585438e-5],
    [4, 0.9999999845827421, 1.541725790028002e-8],
    [5, 0.9999999999984626, 1.5374597944280351e-12],
  ];
  for (const [x, e, c] of known) {
    assert.ok(Math.abs(erf(x) - e) < 1e-14, `erf(${x}) = ${erf(x)}`);
    assert.ok(Math.abs(erf(-x) + e) < 1e-14);
    assert.ok(Math.abs(erfc(x) - c) <= 1e-13 * c + 1e-16, `erfc(${x}) = ${erfc(x)}`);
  }
});

test('llama with attention bias: a v_proj bias equals the o_proj bias W_o b_v', () => {
  // Softmax weights sum to 1, so a v bias passes through attention unchanged and o_proj maps it to W_o b_v.
  const s: ModelSpec = { ...storiesSpec, modelType: 'qwen2', attentionBias: true, outputBias: true };
  const { hiddenSize: H, numHeads: NH, numKvHeads: NKV, headDim: D } = s;
  const g = rng(3);
  const extra = new Map<string, HostTensor>();
  const extra2 = new Map<string, HostTensor>();
  for (let i = 0; i < s.numLayers; i++) {
    const p = `model.layers.${i}.self_attn`;
    const bv = randomArray(NKV * D, g, 0.5);
    const wo = storiesWeights.get(`${p}.o_proj.weight`).data; // [H, NH*D]
    const bo = new Float32Array(H);
    for (let o = 0; o < H; o++) {
      let sum = 0;
      for (let h = 0; h < NH; h++) for (let d = 0; d < D; d++) sum += wo[o * NH * D + h * D + d]! * bv[Math.floor(h / (NH / NKV)) * D + d]!;
      bo[o] = sum;
    }
    for (const m of [extra, extra2]) {
      m.set(`${p}.q_proj.bias`, { shape: [NH * D], data: new Float32Array(NH * D) });
      m.set(`${p}.k_proj.bias`, { shape: [NKV * D], data: new Float32Array(NKV * D) });
    }
    extra.set(`${p}.v_proj.bias`, { shape: [NKV * D], data: bv });
    extra.set(`${p}.o_proj.bias`, { shape: [H], data: new Float32Array(H) });
    extra2.set(`${p}.v_proj.bias`, { shape: [NKV * D], data: new Float32Array(NKV * D) });
    extra2.set(`${p}.o_proj.bias`, { shape: [H], data: bo });
  }
  const ids = refCase.prompt_ids_with_bos;
  const a = referenceForward(s, referenceWeights(storiesWeights, extra), ids);
  const b = referenceForward(s, referenceWeights(storiesWeights, extra2), ids);
  assert.ok(maxAbsDiff(a, referenceForward(storiesSpec, storiesWeights, ids)) > 1e-2, 'the bias matters');
  const e = maxAbsDiff(a, b);
  assert.ok(e < 1e-5, `${e}`);
});
