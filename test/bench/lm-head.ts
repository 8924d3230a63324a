import ort from 'onnxruntime-node';
import { Graph } from '../../kernels/ir.js';
import { serializeModel } from '../../kernels/onnx.js';
import { compileModel } from '../../src/engine/compile.js';
import { Engine } from '../../src/engine/engine.js';
import { LM_HEAD_QUANTS, lmHeadQuantOptions, quantizedLinear, type LmHeadQuant, type ModelQuant } from '../../src/models/linear.js';
import type { HostTensor } from '../../src/models/spec.js';
import { familyOf } from '../../src/models/families/index.js';
import { loadModelDir } from '../../src/models/load.js';
import { decodeTokensPerSecond } from './decode.js';

export interface LmHeadFigures {
  lmHead: LmHeadQuant;
  /** Bytes the head's weights take (and one decode step reads). */
  headBytes: number;
  /** The head alone at batch 1, best of 40 runs taken in turn with the other codecs (less noisy than whole steps). */
  headMsBatch1: number;
  batch1TokensPerSecond: number;
  batch8TokensPerSecond: number;
}

/** The best time of the head's matmul for one token, per codec, the codecs run in turn. */
async function headAloneMs(head: HostTensor, quant: ModelQuant, threads: number): Promise<Record<LmHeadQuant, number>> {
  const [V, H] = head.shape as [number, number];
  const sessions = new Map<LmHeadQuant, ort.InferenceSession>();
  for (const lmHead of LM_HEAD_QUANTS) {
    const g = new Graph('lm_head_probe');
    const x = g.input('x', 'float32', [1, 1, H]);
    g.output(quantizedLinear(lmHeadQuantOptions({ ...quant, lmHead }))(g, x, 'lm_head', head, null), 'y', [1, 1, V]);
    sessions.set(lmHead, await ort.InferenceSession.create(serializeModel(g.toOnnx()), { intraOpNumThreads: threads, extra: { session: { intra_op: { allow_spinning: '0' } } } }));
  }
  const feeds = { x: new ort.Tensor('float32', new Float32Array(H).fill(0.1), [1, 1, H]) };
  const best = { none: Infinity, int8: Infinity, int4: Infinity };
  for (let rep = 0; rep < 40; rep++) {
    for (const [lmHead, session] of sessions) {
      const t0 = performance.now();
      await session.run(feeds);
      best[lmHead] = Math.min(best[lmHead], performance.now() - t0);
    }
  }
  for (const session of sessions.values()) await session.release();
  return best;
}

/** Bytes of a [N, K] linear in a codec: packed codes + one float32 scale per block (float32 when none). */
export function linearBytes(N: number, K: number, q: ModelQuant): number {
  if (q.kind === 'none') return N * K * 4;
  const block = q.blockSize ?? 32;
  const bits = q.kind === 'int8' ? 8 : 4;
  return N * Math.ceil(K / block) * ((block * bits) / 8 + 4);
}

/** The decode cost of the output head's codec (lmHeadQuant): the same base, each head codec in turn. */
export async function lmHeadBench(modelDir: string, cacheDir: string, quant: ModelQuant, threads: number, log: (m: string) => void): Promise<LmHeadFigures[]> {
  const out: LmHeadFigures[] = [];
  const { spec, weights } = loadModelDir(modelDir);
  const headMs = await headAloneMs(weights.get(familyOf(spec).lmHeadWeight(spec, weights)), quant, threads);
  log(`lm_head alone, batch 1: ${LM_HEAD_QUANTS.map((h) => `${h} ${headMs[h].toFixed(2)} ms`).join(', ')}`);
  for (const lmHead of LM_HEAD_QUANTS) {
    const q = { ...quant, lmHead };
    const compiled = compileModel(modelDir, { quant: q, cacheDir });
    const engine = await Engine.start({ modelPath: compiled.modelPath, layout: compiled.layout, maxNumSeqs: 8, maxModelLen: 1024, slots: 2, maxLoraRank: 16, intraOpThreads: threads, allowSpinning: false });
    try {
      const b1 = await decodeTokensPerSecond(engine, 1, 32, 16);
      const b8 = await decodeTokensPerSecond(engine, 8, 32, 8);
      const { vocabSize: V, hiddenSize: H } = compiled.spec;
      out.push({ lmHead, headBytes: linearBytes(V, H, lmHeadQuantOptions(q)), headMsBatch1: +headMs[lmHead].toFixed(2), batch1TokensPerSecond: +b1.tokensPerSecond.toFixed(2), batch8TokensPerSecond: +b8.tokensPerSecond.toFixed(2) });
      log(`lm_head ${lmHead}: decode batch 1 ${b1.tokensPerSecond.toFixed(2)} tok/s, batch 8 ${b8.tokensPerSecond.toFixed(2)} tok/s`);
    } finally {
      await engine.close();
    }
  }
  return out;
}
