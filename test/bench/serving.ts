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
      maxAdapterBytes: 1 << 30, maxNewTokensDefault: NEW_TOKENS, drainSeconds: 5, source: modelDir, auth: 'disabled', metricsPort: 0,
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
  };
}
