/**
 * Adapter-load figures for `npm run bench` (LORAPLEX_BENCH_ONLY=adapter-load): a cold rank-16 all-linear adapter
 * (F16 on disk, as PEFT saves it) from disk to its first token, against a warm one, through the real server; the
 * largest gaps of another running stream during warm requests and during cold loads; and each phase of the load
 * path timed alone, on this thread, with the functions the server's task pool and engine worker run.
 */
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { decodePeftWeights, makeRandomAdapter, readPeftConfig, writePeftAdapter } from '../../src/adapters/peft.js';
import { checkLoraEffect, loraEffectNorm } from '../../src/adapters/effect-bound.js';
import { compileModel } from '../../src/engine/compile.js';
import { LoraPool } from '../../src/engine/lora-pool.js';
import { readUnderRoot } from '../../src/files/under-root.js';
import { readModelSpec } from '../../src/models/config.js';
import { tasks } from '../../src/workers/tasks.js';
import type { AdapterKey } from '../../src/adapter-key.js';
import type { QuantOptions } from '../../kernels/quant/index.js';
import { startTestServer } from '../helpers/server.js';

const RANK = 16;
const COLD_RUNS = 6;

export interface AdapterLoadFigures {
  rank: number;
  fileBytes: number;
  floats: number;
  /** Medians over the runs, ms. */
  phasesMs: Record<string, number>;
  coldFirstTokenMs: number[];
  warmFirstTokenMs: number[];
  coldMinusWarmMedianMs: number;
  /** Another stream's token gaps: median overall; the largest during a warm request, and during a cold one (medians). */
  otherStreamMedianGapMs: number;
  otherStreamLargestGapWarmMs: number;
  otherStreamLargestGapColdMs: number;
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const round = (x: number) => +x.toFixed(1);

function timed<T>(f: () => T): [T, number] {
  const t0 = performance.now();
  const r = f();
  return [r, performance.now() - t0];
}

export async function adapterLoadBench(modelDir: string, root: string, cacheDir: string, quant: QuantOptions, threads: number, log: (m: string) => void): Promise<AdapterLoadFigures> {
  const adapterRoot = join(root, 'adapters-load');
  const spec = readModelSpec(modelDir);
  const ids = ['warm', ...Array.from({ length: COLD_RUNS }, (_, i) => `cold${i}`)];
  ids.forEach((id, i) => {
    const dir = join(adapterRoot, id);
    if (!existsSync(join(dir, 'adapter_config.json'))) {
      writePeftAdapter(dir, makeRandomAdapter(spec, { r: RANK, alpha: 32, targetModules: ['all-linear'], seed: 100 + i, bStd: 0.01 }), { dtype: 'F16' });
    }
  });

  // Phases, alone on this thread (the server runs the same functions in its task pool and engine worker).
  const compiled = compileModel(modelDir, { quant, cacheDir });
  const limits = { maxLoraRank: RANK, maxAdapterBytes: 1 << 30, loraModules: compiled.layout.loraModules };
  const pool = new LoraPool(compiled.layout.loraModules, 2, RANK);
  const phases: Record<string, number[]> = {};
  const note = (name: string, ms: number) => (phases[name] ??= []).push(ms);
  let fileBytes = 0;
  const sizeOf = (a: { modules: { a: Float32Array; b: Float32Array }[] }) => a.modules.reduce((n, m) => n + m.a.length + m.b.length, 0);
  const floats = sizeOf(tasks.readAdapter({ root: adapterRoot, adapterKey: ids[1] as AdapterKey, spec, limits }).adapter);
  for (const id of ids.slice(1)) {
    const [bytes, fileRead] = timed(() => readUnderRoot(adapterRoot, join(id, 'adapter_model.safetensors'), 1 << 30));
    fileBytes = bytes.length;
    note('fileReadWhole', fileRead);
    const key = id as AdapterKey;
    // The pool task whole (file read, decode, finiteness, effect bound, tensors in shared memory): into fresh
    // memory, and into a prefaulted buffer as the server's reserve gives it.
    note('poolTaskFreshMemory', timed(() => tasks.readAdapter({ root: adapterRoot, adapterKey: key, spec, limits }))[1]);
    const [into, prefault] = timed(() => tasks.prefault({ bytes: floats * 4 }));
    note('prefaultInBackground', prefault);
    const [{ adapter }, task] = timed(() => tasks.readAdapter({ root: adapterRoot, adapterKey: key, spec, limits, into }));
    note('poolTaskPrefaulted', task);
    const { sumSquares } = decodePeftWeights({ root: adapterRoot, relDir: id }, readPeftConfig({ root: adapterRoot, relDir: id }, spec.family).config, spec, 1 << 30);
    note('effectBoundFromDecodeSums', timed(() => checkLoraEffect(id, adapter, limits.loraModules, sumSquares))[1]);
    note('effectBoundOwnPass', timed(() => checkLoraEffect(id, adapter, limits.loraModules))[1]);
    note('effectBoundExactGram', timed(() => adapter.modules.forEach((m) => loraEffectNorm(m.a, m.b, m.r, adapter.scaling)))[1]);
    note('slotCopy', timed(() => pool.load(1, adapter))[1]);
  }
  const phasesMs = Object.fromEntries(Object.entries(phases).map(([k, v]) => [k, round(median(v))]));
  log(`adapter-load phases (median ms): ${JSON.stringify(phasesMs)}`);

  const s = await startTestServer({ modelDir, source: modelDir, cacheDir, threads, adapterRoot, maxLoraRank: RANK, maxAdapterBytes: 1 << 30, maxLoras: 2, maxCpuLoras: 4, maxNumSeqs: 4, prefillChunk: 64 }, quant);
  try {
    const firstTokenMs = async (adapterId: string) => {
      const t0 = performance.now();
      for await (const m of s.inference.generate({ prompt: { case: 'text', value: 'Once' }, adapterId, sampling: { temperature: 0, maxNewTokens: 1 } })) {
        if (m.event.case === 'delta') break;
      }
      return performance.now() - t0;
    };
    await firstTokenMs('warm');
    await firstTokenMs('');
    const cold: number[] = [];
    const warm: number[] = [];
    for (const id of ids.slice(1)) {
      warm.push(await firstTokenMs('warm'));
      cold.push(await firstTokenMs(id));
      await s.adapters.unloadAdapter({ adapterId: id });
    }
    log(`cold first token ${cold.map(round).join(' ')} ms; warm ${warm.map(round).join(' ')} ms`);

    // Another stream decodes while requests of a warm adapter and cold loads take turns: what it sees during a cold
    // load beyond what it sees during a warm request (whose prefill it waits for as well) is the load's cost to it.
    const arrivals: number[] = [];
    const windows: { warm: [number, number][]; cold: [number, number][] } = { warm: [], cold: [] };
    let running = true;
    const stream = (async () => {
      while (running) {
        for await (const m of s.inference.generate({ prompt: { case: 'text', value: 'Once upon a time' }, sampling: { temperature: 0, maxNewTokens: 64 } })) {
          if (m.event.case === 'delta') arrivals.push(performance.now());
        }
      }
    })();
    await new Promise((r) => setTimeout(r, 1500));
    for (const id of ids.slice(1)) {
      for (const [kind, adapterId] of [['warm', 'warm'], ['cold', id]] as const) {
        const t0 = performance.now();
        await firstTokenMs(adapterId);
        windows[kind].push([t0, performance.now()]);
        await new Promise((r) => setTimeout(r, 300));
      }
      await s.adapters.unloadAdapter({ adapterId: id });
    }
    running = false;
    await stream;
    const gaps = arrivals.slice(1).map((t, i) => [arrivals[i]!, t] as const);
    // Per window, the other stream's largest gap overlapping it; the median over windows.
    const largest = (ws: [number, number][]) => median(ws.map(([w0, w1]) => Math.max(0, ...gaps.filter(([a, b]) => b >= w0 && a <= w1).map(([a, b]) => b - a))));
    const otherStreamMedianGapMs = median(gaps.map(([a, b]) => b - a));
    const otherStreamLargestGapWarmMs = largest(windows.warm);
    const otherStreamLargestGapColdMs = largest(windows.cold);
    log(`other stream: median gap ${otherStreamMedianGapMs.toFixed(1)} ms; largest gap per request (median): warm ${otherStreamLargestGapWarmMs.toFixed(1)} ms, cold ${otherStreamLargestGapColdMs.toFixed(1)} ms`);
    return {
      rank: RANK,
      fileBytes,
      floats,
      phasesMs,
      coldFirstTokenMs: cold.map(round),
      warmFirstTokenMs: warm.map(round),
      coldMinusWarmMedianMs: round(median(cold) - median(warm)),
      otherStreamMedianGapMs: round(otherStreamMedianGapMs),
      otherStreamLargestGapWarmMs: round(otherStreamLargestGapWarmMs),
      otherStreamLargestGapColdMs: round(otherStreamLargestGapColdMs),
    };
  } finally {
    await s.close();
  }
}
