/**
 * Prefix-reuse figures for `npm run bench`: time to first token of a ~500-token system prompt + a short question,
 * then of a follow-up with the same system prompt and another question, through the real gRPC server with the
 * prefix cache on and, in the same run, off (the baseline).
 */
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { startServer } from '../../src/main.js';
import { createMetrics } from '../../src/obs/metrics.js';
import { makeClient } from '../../src/rpc/bridge.js';
import { InferenceService } from '../../src/gen/loraplex/v1/inference_pb.js';
import type { QuantOptions } from '../../kernels/quant/index.js';

const SYSTEM_TOKENS = 500;
/** Distinct system prompts per setting; each gives one first/follow-up pair, and the medians are reported. */
const TRIALS = 3;
const PREFILL_CHUNK = 64;

export interface PrefixRunFigures {
  firstTtftMs: number;
  followUpTtftMs: number;
  /** followUp / first: what a repeated system prompt costs relative to a new one (goal <= 0.25 with the cache). */
  followUpVsFirst: number;
  /** Prompt tokens the follow-ups took from the prefix cache (from the server's metric), per follow-up. */
  reusedTokensPerFollowUp: number;
}

export interface PrefixFigures {
  systemPromptTokens: number;
  followUpPromptTokens: number;
  prefillChunk: number;
  trials: number;
  cacheOn: PrefixRunFigures;
  cacheOff: PrefixRunFigures;
  /** Follow-up TTFT with the cache over the same without it. */
  followUpOnVsOff: number;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

/** A system prompt of numbered rules; `variant` changes its first words, so no two variants share a block. */
function systemPrompt(variant: number, rules: number): string {
  const lines = [`System ${variant}: you are assistant number ${variant * 7919} of the bench.`];
  for (let i = 1; i <= rules; i++) lines.push(`Rule ${i}: answer question ${i * 13} politely, in ${(i % 5) + 2} sentences, citing item ${i * 31}.`);
  return `${lines.join('\n')}\n`;
}

export async function prefixBench(modelDir: string, cacheDir: string, quant: QuantOptions, threads: number, log: (m: string) => void): Promise<PrefixFigures> {
  const run = async (prefixCacheBytes: number) => {
    const metrics = createMetrics({ maxTenantLabels: 0, defaultMetrics: false });
    const server = await startServer(
      {
        modelDir, quant, threads, cacheDir, maxModelLen: 1024, maxNumSeqs: 2, maxLoras: 1, maxLoraRank: 8, prefillChunk: PREFILL_CHUNK,
        allowSpinning: false, host: '127.0.0.1', port: 0, adapterRoot: mkdtempSync(join(tmpdir(), 'loraplex-bench-adapters-')), maxCpuLoras: 2,
        maxWaiting: 8, maxAdapterBytes: 1 << 20, maxNewTokensDefault: 1, drainSeconds: 5, source: modelDir, auth: 'disabled', metricsPort: 0, httpPort: 0,
        dataRoot: mkdtempSync(join(tmpdir(), 'loraplex-bench-data-')), jobRoot: mkdtempSync(join(tmpdir(), 'loraplex-bench-jobs-')), trainThreads: 1,
        prefixCacheBytes,
      },
      pino({ level: 'silent' }),
      { metrics },
    );
    const inference = makeClient(InferenceService, `127.0.0.1:${server.port}`);
    const hitTokens = async () => (await metrics.registry.getSingleMetric('loraplex_prefix_cache_hit_tokens_total')!.get()).values[0]?.value ?? 0;
    const ttft = async (text: string) => {
      const t0 = performance.now();
      let ms = 0;
      let promptTokens = 0;
      for await (const m of inference.generate({ prompt: { case: 'text', value: text }, sampling: { temperature: 0, maxNewTokens: 1 } })) {
        if (m.event.case === 'delta' && m.event.value.tokenIds.length && !ms) ms = performance.now() - t0;
        if (m.event.case === 'finished') promptTokens = m.event.value.promptTokens;
      }
      return { ms, promptTokens };
    };
    try {
      // Enough rules for SYSTEM_TOKENS, counted by the server's own tokenizer.
      let rules = 1;
      while ((await inference.tokenize({ prompt: { case: 'text', value: systemPrompt(0, rules) } })).tokenIds.length < SYSTEM_TOKENS) rules++;
      const systemTokens = (await inference.tokenize({ prompt: { case: 'text', value: systemPrompt(0, rules) } })).tokenIds.length;
      // Warm-up on a prompt of the same length that shares nothing with the measured ones.
      await ttft(`${systemPrompt(TRIALS + 1, rules)}Question: which rule comes first?`);
      const firsts: number[] = [];
      const followUps: number[] = [];
      let followUpTokens = 0;
      const hitsBefore = await hitTokens();
      for (let t = 0; t < TRIALS; t++) {
        firsts.push((await ttft(`${systemPrompt(t, rules)}Question: what does rule 3 say?`)).ms);
        const followUp = await ttft(`${systemPrompt(t, rules)}Question: how many rules are there, and which is the longest?`);
        followUps.push(followUp.ms);
        followUpTokens = followUp.promptTokens;
      }
      const reused = ((await hitTokens()) - hitsBefore) / TRIALS;
      const first = median(firsts);
      const followUp = median(followUps);
      log(`prefix cache ${prefixCacheBytes ? 'on' : 'off'}: first ${first.toFixed(1)} ms, follow-up ${followUp.toFixed(1)} ms (${reused} tokens reused)`);
      return { systemTokens, followUpTokens, figures: { firstTtftMs: +first.toFixed(1), followUpTtftMs: +followUp.toFixed(1), followUpVsFirst: +(followUp / first).toFixed(3), reusedTokensPerFollowUp: reused } };
    } finally {
      inference.close();
      await server.close();
    }
  };
  const on = await run(256 * 1024 * 1024);
  const off = await run(0);
  return {
    systemPromptTokens: on.systemTokens,
    followUpPromptTokens: on.followUpTokens,
    prefillChunk: PREFILL_CHUNK,
    trials: TRIALS,
    cacheOn: on.figures,
    cacheOff: off.figures,
    followUpOnVsOff: +(on.figures.followUpTtftMs / off.figures.followUpTtftMs).toFixed(3),
  };
}
