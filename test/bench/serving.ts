/**
 * Serving figures for `npm run bench`: aggregate decode tokens/s of 16 concurrent streams on 16 different
 * rank-16 all-linear adapters vs 16 streams on one adapter vs 16 streams on no adapter, through the real gRPC
 * server; and the cold-load latency of a rank-16 adapter from disk to its first token.
 */
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { pino } from 'pino';
import { makeRandomAdapter, writePeftAdapter } from '../../src/adapters/peft.js';
import { readModelSpec } from '../../src/models/config.js';
import { startServer } from '../../src/main.js';
import { makeClient } from '../../src/rpc/bridge.js';
import { InferenceService } from '../../src/gen/loraplex/v1/inference_pb.js';
import { AdapterService } from '../../src/gen/loraplex/v1/adapters_pb.js';
import { TrainService } from '../../src/gen/loraplex/v1/train_pb.js';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import type { QuantOptions } from '../../kernels/quant/index.js';

const STREAMS = 16;
const NEW_TOKENS = 24;

export interface ServingFigures {
  streams: number;
  newTokensPerStream: number;
  noAdapterTokensPerSecond: number;
  oneAdapterTokensPerSecond: number;
  sixteenAdaptersTokensPerSecond: number;
  sixteenVsOneAdapter: number;
  oneAdapterVsNoAdapter: number;
  adapterColdLoadToFirstTokenMs: number;
  adapterWarmFirstTokenMs: number;
  /** Median gap between tokens of one Generate stream, idle and while a training job runs (1 train thread). */
  interTokenMsIdle: number;
  interTokenMsWhileTraining: number;
}

export async function servingBench(modelDir: string, root: string, cacheDir: string, quant: QuantOptions, threads: number, log: (m: string) => void): Promise<ServingFigures> {
  const adapterRoot = join(root, 'adapters-1b');
  const spec = readModelSpec(modelDir);
  for (let i = 0; i <= STREAMS; i++) {
    const dir = join(adapterRoot, `a${i}`);
    if (!existsSync(join(dir, 'adapter_config.json'))) {
      writePeftAdapter(dir, makeRandomAdapter(spec, { r: 16, alpha: 32, targetModules: ['all-linear'], seed: i, bStd: 0.01 }), { dtype: 'F16' });
    }
  }
  const server = await startServer(
    {
      modelDir, quant, threads, cacheDir, maxModelLen: 256, maxNumSeqs: STREAMS, maxLoras: STREAMS, maxLoraRank: 16, prefillChunk: 64,
      allowSpinning: false, host: '127.0.0.1', port: 0, adapterRoot, maxCpuLoras: STREAMS + 2, maxWaiting: 64,
      maxAdapterBytes: 1 << 30, maxNewTokensDefault: NEW_TOKENS, drainSeconds: 5, source: modelDir, auth: 'disabled', metricsPort: 0, httpPort: 0,
      dataRoot: mkdtempSync(join(tmpdir(), 'loraplex-bench-data-')), jobRoot: mkdtempSync(join(tmpdir(), 'loraplex-bench-jobs-')), trainThreads: 1,
    },
    pino({ level: 'silent' }),
  );
  const address = `127.0.0.1:${server.port}`;
  const inference = makeClient(InferenceService, address);
  const adapters = makeClient(AdapterService, address);

  /** 16 streams at once; decode rate measured from the moment every stream has its first token. */
  const run = async (adapterOf: (i: number) => string): Promise<number> => {
    let firstTokens = 0;
    let tokensAfterAllStarted = 0;
    let allStarted = 0;
    let end = 0;
    await Promise.all(
      Array.from({ length: STREAMS }, async (_, i) => {
        let first = true;
        for await (const m of inference.generate({ prompt: { case: 'text', value: `Story number ${i}: once upon a time` }, adapterId: adapterOf(i), sampling: { temperature: 0, maxNewTokens: NEW_TOKENS } })) {
          if (m.event.case !== 'delta') continue;
          const n = m.event.value.tokenIds.length;
          if (allStarted) tokensAfterAllStarted += n;
          if (first && n) {
            first = false;
            if (++firstTokens === STREAMS) allStarted = performance.now();
          }
        }
        end = performance.now();
      }),
    );
    return tokensAfterAllStarted / ((end - allStarted) / 1000);
  };
  // Warm-up: load all adapters into memory and slots once.
  await run((i) => `a${i}`);
  const none = await run(() => '');
  log(`16 streams, no adapter: ${none.toFixed(1)} tok/s`);
  const one = await run(() => 'a0');
  log(`16 streams, one adapter: ${one.toFixed(1)} tok/s`);
  const sixteen = await run((i) => `a${i}`);
  log(`16 streams, 16 adapters: ${sixteen.toFixed(1)} tok/s`);

  const firstTokenMs = async (adapterId: string) => {
    const t0 = performance.now();
    for await (const m of inference.generate({ prompt: { case: 'text', value: 'Once' }, adapterId, sampling: { temperature: 0, maxNewTokens: 1 } })) {
      if (m.event.case === 'delta') break;
    }
    return performance.now() - t0;
  };
  const warm = await firstTokenMs('a1');
  await adapters.unloadAdapter({ adapterId: `a${STREAMS}` }).catch(() => undefined);
  const cold = await firstTokenMs(`a${STREAMS}`);
  log(`rank-16 adapter first token: cold ${cold.toFixed(1)} ms, warm ${warm.toFixed(1)} ms`);
  // Inter-token latency of one stream, idle and while a training job runs on the same machine.
  const interTokenMs = async () => {
    const gaps: number[] = [];
    let last = 0;
    for await (const m of inference.generate({ prompt: { case: 'text', value: 'Once upon a time' }, sampling: { temperature: 0, maxNewTokens: 24 } })) {
      if (m.event.case !== 'delta' || !m.event.value.tokenIds.length) continue;
      const now = performance.now();
      if (last) gaps.push(now - last);
      last = now;
    }
    gaps.sort((a, b) => a - b);
    return gaps[Math.floor(gaps.length / 2)]!;
  };
  const idle = await interTokenMs();
  const train = makeClient(TrainService, address);
  const text = 'First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. '.repeat(40);
  const job = train.train({ adapterId: 'bench-train', examples: [{ example: { case: 'text', value: text } }], maxSteps: 50, maxSeqLength: 128, microBatchSize: 1, targetModules: ['q_proj', 'v_proj'], r: 8 });
  const it = job[Symbol.asyncIterator]();
  // Wait until the job is really stepping (its graph is built and the first step done).
  for (;;) {
    const r = await it.next();
    if (r.done || r.value.event?.event.case === 'progress') break;
  }
  const busy = await interTokenMs();
  log(`inter-token latency: idle ${idle.toFixed(1)} ms, while training ${busy.toFixed(1)} ms`);
  train.close();
  inference.close();
  adapters.close();
  await server.close();
  return {
    streams: STREAMS,
    newTokensPerStream: NEW_TOKENS,
    noAdapterTokensPerSecond: +none.toFixed(2),
    oneAdapterTokensPerSecond: +one.toFixed(2),
    sixteenAdaptersTokensPerSecond: +sixteen.toFixed(2),
    sixteenVsOneAdapter: +(sixteen / one).toFixed(3),
    oneAdapterVsNoAdapter: +(one / none).toFixed(3),
    adapterColdLoadToFirstTokenMs: +cold.toFixed(1),
    adapterWarmFirstTokenMs: +warm.toFixed(1),
    interTokenMsIdle: +idle.toFixed(1),
    interTokenMsWhileTraining: +busy.toFixed(1),
  };
}
