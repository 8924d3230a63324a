/**
 * The llama.cpp side-by-side for `npm run bench` (LORAPLEX_BENCH_ONLY=peer): the same random TinyLlama-shaped
 * weights, measured in one run in the order llama.cpp, loraplex, llama.cpp, so that each ratio compares figures
 * taken minutes apart on the same machine.
 * - llama.cpp: node-llama-cpp's prebuilt binary on a pure Q4_0 GGUF, through ../shared/peers/llamacpp/bench.mjs.
 *   It is found beside the project (LORAPLEX_BENCH_NLC, default ../nlc) and is never a project dependency.
 * - loraplex: `loraplex serve` as its own process (int4), driven through gRPC like any client, the same figures:
 *   one stream's decode rate, a 512-token prompt's prefill rate, 8 concurrent streams' tokens over wall time, the
 *   serving process's peak RSS, and a cached start to SERVING.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import type { QuantOptions } from '../../kernels/quant/index.js';
import { makeClient } from '../../src/rpc/bridge.js';
import { InferenceService } from '../../src/gen/loraplex/v1/inference_pb.js';
import { launchServe } from './serve-process.js';

const PROMPT_TOKENS = 16;
const GEN_TOKENS = 128;
const PREFILL_TOKENS = 512;
const STREAMS = 8;
const RUNS = 3;

export interface EngineFigures {
  decodeTokensPerSecond: number;
  prefillTokensPerSecond: number;
  streams8TokensPerSecond: number;
  peakRssMiB: number;
  startSeconds: number;
}

export interface PeerFigures {
  llamaCpp: { before: EngineFigures & { contaminationCores: number }; after: EngineFigures & { contaminationCores: number }; version: string };
  loraplex: EngineFigures & { coldStartSeconds: number };
  /** loraplex / mean of the two llama.cpp runs (RSS: lower is better, so <= 1 meets the goal). */
  ratios: { decode: number; prefill: number; streams8: number; peakRss: number };
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

function peerModel(root: string, peers: string, log: (m: string) => void): { hfDir: string; gguf: string } {
  const hfDir = process.env['LORAPLEX_BENCH_PEER_MODEL'] ?? join(root, 'peer-tinyllama');
  const gguf = `${hfDir}.q4_0.gguf`;
  if (!existsSync(join(hfDir, 'config.json'))) {
    log(`writing the peers' random TinyLlama model to ${hfDir} (numpy, /usr/bin/python3)`);
    execFileSync('/usr/bin/python3', [join(peers, 'make_random_llama.py'), hfDir, '--seed', '0'], { stdio: ['ignore', 'ignore', 'inherit'] });
  }
  if (!existsSync(gguf)) {
    log(`converting it to a pure Q4_0 GGUF`);
    execFileSync('/usr/bin/python3', [join(peers, 'hf_to_gguf.py'), hfDir, gguf, '--outtype', 'q4_0'], { stdio: ['ignore', 'ignore', 'inherit'] });
  }
  return { hfDir, gguf };
}

function runLlamaCpp(peers: string, nlc: string, gguf: string, threads: number): EngineFigures & { contaminationCores: number; version: string } {
  const out = join(mkdtempSync(join(tmpdir(), 'loraplex-peer-')), 'llamacpp.json');
  execFileSync(process.execPath, [
    join(peers, 'bench.mjs'), '--nlc', nlc, '--model', gguf, '--threads', String(threads), '--prompt-tokens', String(PROMPT_TOKENS),
    '--gen', String(GEN_TOKENS), '--runs', String(RUNS), '--pp', String(PREFILL_TOKENS), '--parallel', String(STREAMS), '--wait-idle', '120', '--out', out,
  ], { stdio: ['ignore', 'ignore', 'inherit'] });
  const r = JSON.parse(readFileSync(out, 'utf8')) as {
    nodeLlamaCpp: string; loadMs: number; peakRssBytes: number; maxOtherProcessesCoresDuringMeasuredRuns: number;
    decode: { medianTokPerS: number }; pp: { medianTokPerS: number }; parallel: { medianAggregateEndToEndTokPerS: number };
  };
  return {
    decodeTokensPerSecond: +r.decode.medianTokPerS.toFixed(2),
    prefillTokensPerSecond: +r.pp.medianTokPerS.toFixed(1),
    streams8TokensPerSecond: +r.parallel.medianAggregateEndToEndTokPerS.toFixed(2),
    peakRssMiB: Math.round(r.peakRssBytes / 2 ** 20),
    startSeconds: +(r.loadMs / 1000).toFixed(2),
    contaminationCores: r.maxOtherProcessesCoresDuringMeasuredRuns,
    version: r.nodeLlamaCpp,
  };
}

async function runLoraplex(hfDir: string, cacheDir: string, quant: QuantOptions, threads: number, log: (m: string) => void): Promise<PeerFigures['loraplex']> {
  // The prefix cache is off: every repeat of the 512-token prompt must be a real prefill, as llama.cpp's is.
  const args = ['--max-num-seqs', String(STREAMS), '--max-model-len', String(PREFILL_TOKENS + GEN_TOKENS + 64), '--prefix-cache-bytes', '0', '--max-new-tokens-default', String(GEN_TOKENS)];
  const cold = await launchServe(hfDir, cacheDir, quant, threads, args);
  const coldStartSeconds = cold.at.get('serving')!.seconds;
  await cold.stop();
  const serve = await launchServe(hfDir, cacheDir, quant, threads, args);
  const startSeconds = serve.at.get('serving')!.seconds;
  log(`loraplex serve: cold start ${coldStartSeconds.toFixed(1)} s, cached start ${startSeconds.toFixed(2)} s`);
  const inference = makeClient(InferenceService, `127.0.0.1:${serve.port}`);
  try {
    // Text prompts of exactly n tokens (the model is random: only the count matters), different in every run.
    let variant = 0;
    const promptOf = async (n: number): Promise<string> => {
      const words = Array.from({ length: n }, (_, i) => `w${(i * 7919 + variant * 104729) % 50000}`);
      variant++;
      for (let take = n; take > 0; take--) {
        const text = words.slice(0, take).join(' ');
        const { tokenIds } = await inference.tokenize({ prompt: { case: 'text', value: text } });
        if (tokenIds.length <= n) return text;
      }
      throw new Error('no prompt fits');
    };
    const generate = async (text: string, maxNewTokens: number) => {
      const times: number[] = [];
      for await (const m of inference.generate({ prompt: { case: 'text', value: text }, sampling: { temperature: 0, maxNewTokens } })) {
        if (m.event.case !== 'delta') continue;
        const now = performance.now();
        for (let i = 0; i < m.event.value.tokenIds.length; i++) times.push(now);
      }
      return times;
    };
    const decodeRun = async () => {
      const times = await generate(await promptOf(PROMPT_TOKENS), GEN_TOKENS);
      return (times.length - 1) / ((times.at(-1)! - times[0]!) / 1000);
    };
    const prefillRun = async () => {
      const text = await promptOf(PREFILL_TOKENS);
      const { tokenIds } = await inference.tokenize({ prompt: { case: 'text', value: text } });
      const t0 = performance.now();
      const times = await generate(text, 1);
      return tokenIds.length / ((times[0]! - t0) / 1000);
    };
    const streamsRun = async () => {
      const prompts = await Promise.all(Array.from({ length: STREAMS }, () => promptOf(PROMPT_TOKENS)));
      const t0 = performance.now();
      const counts = await Promise.all(prompts.map(async (p) => (await generate(p, GEN_TOKENS)).length));
      return counts.reduce((a, b) => a + b, 0) / ((performance.now() - t0) / 1000);
    };
    const measure = async (name: string, run: () => Promise<number>) => {
      await run();
      const xs: number[] = [];
      for (let i = 0; i < RUNS; i++) xs.push(await run());
      log(`loraplex ${name}: ${xs.map((x) => x.toFixed(1)).join(', ')} tok/s`);
      return median(xs);
    };
    const decode = await measure('decode, one stream', decodeRun);
    const prefill = await measure(`prefill, ${PREFILL_TOKENS}-token prompt`, prefillRun);
    const streams = await measure(`${STREAMS} streams`, streamsRun);
    return {
      decodeTokensPerSecond: +decode.toFixed(2),
      prefillTokensPerSecond: +prefill.toFixed(1),
      streams8TokensPerSecond: +streams.toFixed(2),
      peakRssMiB: serve.peakRssMiB(),
      startSeconds: +startSeconds.toFixed(2),
      coldStartSeconds: +coldStartSeconds.toFixed(1),
    };
  } finally {
    inference.close();
    await serve.stop();
  }
}

export async function peerBench(root: string, cacheDir: string, quant: QuantOptions, threads: number, log: (m: string) => void): Promise<PeerFigures | { skipped: string }> {
  const nlc = resolve(process.env['LORAPLEX_BENCH_NLC'] ?? join(process.cwd(), '..', 'nlc'));
  const peers = resolve(process.env['LORAPLEX_BENCH_PEERS'] ?? join(process.cwd(), '..', 'shared', 'peers', 'llamacpp'));
  if (!existsSync(join(nlc, 'node_modules', 'node-llama-cpp'))) return { skipped: `node-llama-cpp is not installed in ${nlc} (set LORAPLEX_BENCH_NLC; see ${peers}/README.md)` };
  if (!existsSync(join(peers, 'bench.mjs'))) return { skipped: `the llama.cpp peer scripts are not in ${peers} (set LORAPLEX_BENCH_PEERS)` };
  const { hfDir, gguf } = peerModel(root, peers, log);
  log('llama.cpp, first run');
  const { version, ...before } = runLlamaCpp(peers, nlc, gguf, threads);
  log(`  decode ${before.decodeTokensPerSecond}, prefill ${before.prefillTokensPerSecond}, 8 streams ${before.streams8TokensPerSecond} tok/s, peak ${before.peakRssMiB} MiB`);
  log('loraplex');
  const loraplex = await runLoraplex(hfDir, join(cacheDir, 'peer'), quant, threads, log);
  log('llama.cpp, second run');
  const { version: _, ...after } = runLlamaCpp(peers, nlc, gguf, threads);
  log(`  decode ${after.decodeTokensPerSecond}, prefill ${after.prefillTokensPerSecond}, 8 streams ${after.streams8TokensPerSecond} tok/s, peak ${after.peakRssMiB} MiB`);
  const ratio = (ours: number, a: number, b: number) => +(ours / ((a + b) / 2)).toFixed(3);
  return {
    llamaCpp: { before, after, version },
    loraplex,
    ratios: {
      decode: ratio(loraplex.decodeTokensPerSecond, before.decodeTokensPerSecond, after.decodeTokensPerSecond),
      prefill: ratio(loraplex.prefillTokensPerSecond, before.prefillTokensPerSecond, after.prefillTokensPerSecond),
      streams8: ratio(loraplex.streams8TokensPerSecond, before.streams8TokensPerSecond, after.streams8TokensPerSecond),
      peakRss: ratio(loraplex.peakRssMiB, before.peakRssMiB, after.peakRssMiB),
    },
  };
}
