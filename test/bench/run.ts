/**
 * `npm run bench`: speed and memory on the `1b` (TinyLlama-shaped) random model with int4, as JSON.
 * Figures are reported next to a baseline measured in the same run (this machine's read bandwidth via an ORT
 * reduction over a buffer far larger than cache), never asserted in tests.
 * LORAPLEX_BENCH_ONLY=stalls|prefix|start|lmhead|train-in-serve|adapter-load|peer runs one section alone;
 * LORAPLEX_BENCH_SKIP_<SECTION> leaves one out. The peer section sets loraplex beside llama.cpp on the same weights
 * when node-llama-cpp is installed beside the project (see test/bench/peer.ts).
 */
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import ort from 'onnxruntime-node';
import { Graph } from '../../kernels/ir.js';
import { serializeModel } from '../../kernels/onnx.js';
import { lmHeadQuantOptions, type ModelQuant } from '../../src/models/linear.js';
import { compileModel } from '../../src/engine/compile.js';
import { Engine } from '../../src/engine/engine.js';
import { makeModel } from '../../src/models/make.js';
import { adapterLoadBench } from './adapter-load.js';
import { peerBench } from './peer.js';
import { prefixBench } from './prefix.js';
import { servingBench } from './serving.js';
import { startBench } from './start.js';
import { stallBench } from './stalls.js';
import { trainingBench } from './training.js';
import { trainInServeBench } from './train-in-serve.js';
import { decodeTokensPerSecond } from './decode.js';
import { lmHeadBench, linearBytes } from './lm-head.js';
import type { ModelSpec } from '../../src/models/spec.js';

const ROOT = process.env['LORAPLEX_BENCH_DIR'] ?? join(process.cwd(), '.cache', 'bench');
const THREADS = Number(process.env['LORAPLEX_BENCH_THREADS'] ?? 2);
const SIZE = (process.env['LORAPLEX_BENCH_SIZE'] ?? '1b') as '1b' | 'small' | 'tiny';

function log(msg: string): void {
  process.stderr.write(`[bench] ${msg}\n`);
}

/** Machines of one kind differ (Intel with AMX, AMD Zen 5): every result names its CPU and the flags that matter. */
function cpuInfo(): { model: string; flags: string[] } {
  const text = existsSync('/proc/cpuinfo') ? readFileSync('/proc/cpuinfo', 'utf8') : '';
  const field = (name: string) => new RegExp(`^${name}\\s*:\\s*(.*)$`, 'm').exec(text)?.[1] ?? 'unknown';
  const flags = field('flags').split(' ');
  return { model: field('model name'), flags: ['avx2', 'avx512f', 'avx512_vnni', 'avx512_bf16', 'amx_tile', 'amx_int8', 'amx_bf16'].filter((f) => flags.includes(f)) };
}

/** Bytes of weights read by one decode step: every quantized linear (packed codes + scales), the head in its codec. */
function decodeWeightBytes(spec: ModelSpec, quant: ModelQuant): number {
  const linear = (N: number, K: number) => linearBytes(N, K, quant);
  const { hiddenSize: H, intermediateSize: I, numLayers: L, vocabSize: V } = spec;
  const kv = spec.numKvHeads * spec.headDim;
  const perLayer = linear(H, H) + 2 * linear(kv, H) + linear(H, H) + 2 * linear(I, H) + linear(H, I);
  return L * perLayer + linearBytes(V, H, lmHeadQuantOptions(quant));
}

/**
 * Read bandwidth as ORT sees it: ReduceSum over 1 GiB of float32 split into rows (ORT parallelizes across rows;
 * a full reduction to one scalar runs on one thread), best shape and best of 5 runs.
 */
async function bandwidthProbe(threads: number): Promise<number> {
  const n = 256 * 1024 * 1024;
  const data = new Float32Array(n).fill(1);
  let best = 0;
  for (const rows of [16, 64, 256]) {
    const g = new Graph('bandwidth_probe');
    const x = g.input('x', 'float32', [rows, n / rows]);
    g.output(g.op1('ReduceSum', [x, g.ints([-1])], { dtype: 'float32', shape: [rows, 1] }, { keepdims: 1 }), 'y', [rows, 1]);
    const session = await ort.InferenceSession.create(serializeModel(g.toOnnx()), { intraOpNumThreads: threads, extra: { session: { intra_op: { allow_spinning: '0' } } } });
    const feeds = { x: new ort.Tensor('float32', data, [rows, n / rows]) };
    await session.run(feeds);
    for (let i = 0; i < 5; i++) {
      const t0 = performance.now();
      await session.run(feeds);
      best = Math.max(best, (n * 4) / ((performance.now() - t0) / 1000));
    }
    await session.release();
  }
  return best;
}

async function main(): Promise<void> {
  mkdirSync(ROOT, { recursive: true });
  const modelDir = join(ROOT, `llama-${SIZE}`);
  if (!existsSync(join(modelDir, 'config.json'))) {
    log(`writing the random ${SIZE} model to ${modelDir}`);
    const t0 = performance.now();
    await makeModel({ arch: 'llama', size: SIZE, outDir: modelDir, seed: 1 });
    log(`  ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  }
  const quant: ModelQuant = { kind: 'int4', blockSize: Number(process.env['LORAPLEX_BENCH_BLOCK'] ?? 32), accuracyLevel: 4 };
  const cpu = cpuInfo();
  log(`cpu: ${cpu.model} (${cpu.flags.join(' ')})`);
  const only = process.env['LORAPLEX_BENCH_ONLY'];
  if (only === 'adapter-load') {
    // Its own graph cache, kept between runs: this section times adapter loads, not compiles.
    const figures = await adapterLoadBench(modelDir, ROOT, join(ROOT, 'graph-cache-load'), quant, THREADS, log);
    process.stdout.write(`${JSON.stringify({ model: `llama-${SIZE}`, quant, threads: THREADS, machine: { cpu }, adapterLoad: figures }, null, 2)}\n`);
    return;
  }
  const cacheDir = join(ROOT, 'graph-cache');
  rmSync(cacheDir, { recursive: true, force: true });
  if (only === 'peer') {
    const figures = await peerBench(ROOT, cacheDir, quant, THREADS, log);
    process.stdout.write(`${JSON.stringify({ model: 'peer-tinyllama (random weights, TinyLlama shape)', quant, threads: THREADS, machine: { cpu }, peer: figures }, null, 2)}\n`);
    return;
  }
  if (only === 'stalls' || only === 'prefix' || only === 'start' || only === 'lmhead' || only === 'train-in-serve') {
    const sections = { stalls: stallBench, prefix: prefixBench, start: startBench, lmhead: lmHeadBench, 'train-in-serve': trainInServeBench } as const;
    const figures = await sections[only](modelDir, cacheDir, quant, THREADS, log);
    process.stdout.write(`${JSON.stringify({ model: `llama-${SIZE}`, quant, threads: THREADS, machine: { cpu }, [only]: figures }, null, 2)}\n`);
    return;
  }

  const start = async (allowSpinning = false) => {
    const t0 = performance.now();
    const compiled = compileModel(modelDir, { quant, cacheDir });
    const engine = await Engine.start({ modelPath: compiled.modelPath, layout: compiled.layout, maxNumSeqs: 8, maxModelLen: 1024, slots: 2, maxLoraRank: 16, intraOpThreads: THREADS, allowSpinning });
    return { compiled, engine, seconds: (performance.now() - t0) / 1000 };
  };
  log('cold start (quantize + write cache + session)');
  const cold = await start();
  await cold.engine.close();
  log(`  ${cold.seconds.toFixed(1)} s; cached start`);
  const { engine, compiled, seconds: cachedSeconds } = await start();
  log(`  ${cachedSeconds.toFixed(1)} s`);

  const bandwidth = await bandwidthProbe(THREADS);
  log(`read bandwidth ${(bandwidth / 1e9).toFixed(1)} GB/s`);
  const b1 = await decodeTokensPerSecond(engine, 1, 32, 16);
  log(`decode batch 1: ${b1.tokensPerSecond.toFixed(2)} tok/s`);
  const b8 = await decodeTokensPerSecond(engine, 8, 32, 8);
  log(`decode batch 8: ${b8.tokensPerSecond.toFixed(2)} tok/s`);
  const prefillTokens = 256;
  const prompt = Array.from({ length: prefillTokens }, (_, i) => 10 + i);
  await engine.step([{ kvRow: 0, slot: 0, pastLen: 0, tokens: prompt.slice(0, 16) }]);
  const t0 = performance.now();
  await engine.step([{ kvRow: 0, slot: 0, pastLen: 0, tokens: prompt }]);
  const prefillTokensPerSecond = prefillTokens / ((performance.now() - t0) / 1000);
  log(`prefill: ${prefillTokensPerSecond.toFixed(1)} tok/s`);
  const servingRss = process.memoryUsage().rss;
  await engine.close();
  const spinning = await start(true);
  const b1Spin = await decodeTokensPerSecond(spinning.engine, 1, 32, 16);
  log(`decode batch 1 with allowSpinning: ${b1Spin.tokensPerSecond.toFixed(2)} tok/s`);
  await spinning.engine.close();

  const serving = process.env['LORAPLEX_BENCH_SKIP_SERVING'] ? null : await servingBench(modelDir, ROOT, cacheDir, quant, THREADS, log);

  const training = process.env['LORAPLEX_BENCH_SKIP_TRAINING'] ? null : await trainingBench(modelDir, THREADS, log);
  const trainInServe = process.env['LORAPLEX_BENCH_SKIP_TRAIN_IN_SERVE'] ? null : await trainInServeBench(modelDir, cacheDir, quant, THREADS, log);

  const stalls = process.env['LORAPLEX_BENCH_SKIP_STALLS'] ? null : await stallBench(modelDir, cacheDir, quant, THREADS, log);

  const lmHead = process.env['LORAPLEX_BENCH_SKIP_LMHEAD'] ? null : await lmHeadBench(modelDir, cacheDir, quant, THREADS, log);

  const prefix = process.env['LORAPLEX_BENCH_SKIP_PREFIX'] ? null : await prefixBench(modelDir, cacheDir, quant, THREADS, log);

  // The graph cache exists by now, so both spawned starts are cached ones.
  const serveStart = process.env['LORAPLEX_BENCH_SKIP_START'] ? null : await startBench(modelDir, cacheDir, quant, THREADS, log);

  const peer = process.env['LORAPLEX_BENCH_SKIP_PEER'] ? null : await peerBench(ROOT, cacheDir, quant, THREADS, log);

  const weightBytes = decodeWeightBytes(compiled.spec, quant);
  const achieved = (weightBytes * b1.tokensPerSecond);
  const results = {
    model: `llama-${SIZE} (random weights, TinyLlama shape for 1b)`,
    quant,
    threads: THREADS,
    machine: { cpu, readBandwidthGBps: +(bandwidth / 1e9).toFixed(2) },
    start: { coldSeconds: +cold.seconds.toFixed(2), cachedSeconds: +cachedSeconds.toFixed(2), cachedVsCold: +(cachedSeconds / cold.seconds).toFixed(3) },
    decode: {
      batch1TokensPerSecond: +b1.tokensPerSecond.toFixed(2),
      batch1MsPerStep: +b1.msPerStep.toFixed(2),
      batch8TokensPerSecond: +b8.tokensPerSecond.toFixed(2),
      batch8VsBatch1: +(b8.tokensPerSecond / b1.tokensPerSecond).toFixed(2),
      weightBytesPerStep: weightBytes,
      achievedWeightBandwidthGBps: +(achieved / 1e9).toFixed(2),
      bandwidthRatio: +(achieved / bandwidth).toFixed(3),
      batch1AllowSpinningTokensPerSecond: +b1Spin.tokensPerSecond.toFixed(2),
      batch1AllowSpinningBandwidthRatio: +((weightBytes * b1Spin.tokensPerSecond) / bandwidth).toFixed(3),
    },
    prefill: { chunkTokens: prefillTokens, tokensPerSecond: +prefillTokensPerSecond.toFixed(1) },
    serving,
    training,
    trainInServe,
    stalls,
    prefix,
    lmHead,
    serveStart,
    peer,
    // Peak includes the cold start's quantization, which holds the whole float model; serving is the RSS after
    // a cached start, decoding at batch 8 with a 1024-token cache (8 rows).
    peakRssMiB: Math.round(process.resourceUsage().maxRSS / 1024),
    servingRssMiB: Math.round(servingRss / 1024 / 1024),
  };
  const out = join(ROOT, 'results.json');
  writeFileSync(out, `${JSON.stringify(results, null, 2)}\n`);
  process.stdout.write(`${JSON.stringify(results, null, 2)}\n`);
  log(`written to ${out}`);
}

main().catch((e) => {
  process.stderr.write(`${e instanceof Error ? e.stack : String(e)}\n`);
  process.exit(1);
});
