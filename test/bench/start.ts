/**
 * Start figures for `npm run bench`: seconds from spawning `loraplex serve` on the bench model to its "serving"
 * log line, once (cold when the graph cache is empty) and once with the cache in place (cached), each split by serve's
 * own log lines; and the in-process cost of the cached graph lookup (compileModel) with whether it re-hashed.
 */
import * as grpc from '@grpc/grpc-js';
import type { QuantOptions } from '../../kernels/quant/index.js';
import { compileModel } from '../../src/engine/compile.js';
import { launchServe } from './serve-process.js';

export interface ServeStart {
  /** Spawn to the "serving" log line. */
  totalSeconds: number;
  /** Spawn to "listening": Node, module imports, config, gRPC bind. */
  toListeningSeconds: number;
  /** serve's own startSeconds ("model ready"): graph lookup or quantization, engine session, tokenizer. */
  modelSeconds: number;
  /** "model ready" to "serving": adapter store, task pool, scheduler, health SERVING. */
  afterModelSeconds: number;
  cached: boolean;
  /** grpc.health.v1 answered SERVING once the log said so. */
  healthServing: boolean;
}

export interface StartFigures {
  /** The first start of the run: cold when the graph cache was empty (LORAPLEX_BENCH_ONLY=start), else cached. */
  firstStart: ServeStart;
  cachedStart: ServeStart;
  /** compileModel on the cached graph, in this process: seconds and whether it hashed the weights. */
  cachedLookupSeconds: number;
  cachedLookupContentHashed: boolean;
}

async function healthServing(port: number): Promise<boolean> {
  const client = new grpc.Client(`127.0.0.1:${port}`, grpc.credentials.createInsecure());
  try {
    // HealthCheckResponse is { status = 1 }: SERVING encodes as the two bytes 08 01.
    const reply = await new Promise<Buffer>((resolve, reject) =>
      client.makeUnaryRequest('/grpc.health.v1.Health/Check', (b: Buffer) => b, (b: Buffer) => b, Buffer.alloc(0), (err, res) => (err ? reject(err) : resolve(res!))),
    );
    return reply.length === 2 && reply[0] === 0x08 && reply[1] === 0x01;
  } finally {
    client.close();
  }
}

/** Spawns `loraplex serve`, waits for "serving", checks health, then stops it. */
async function serveOnce(modelDir: string, cacheDir: string, quant: QuantOptions, threads: number): Promise<ServeStart> {
  const serve = await launchServe(modelDir, cacheDir, quant, threads);
  try {
    const listening = serve.at.get('listening; loading the model')!;
    const ready = serve.at.get('model ready');
    const serving = serve.at.get('serving')!;
    if (!ready) throw new Error('loraplex serve logged "serving" without "model ready"');
    return {
      totalSeconds: +serving.seconds.toFixed(2),
      toListeningSeconds: +listening.seconds.toFixed(2),
      modelSeconds: ready.line.startSeconds!,
      afterModelSeconds: +(serving.seconds - ready.seconds).toFixed(2),
      cached: ready.line.cached!,
      healthServing: await healthServing(serve.port),
    };
  } finally {
    await serve.stop();
  }
}

export async function startBench(modelDir: string, cacheDir: string, quant: QuantOptions, threads: number, log: (m: string) => void): Promise<StartFigures> {
  const firstStart = await serveOnce(modelDir, cacheDir, quant, threads);
  log(`serve start, ${firstStart.cached ? 'cache existed' : 'cold'}: ${firstStart.totalSeconds} s (model ${firstStart.modelSeconds} s)`);
  const cachedStart = await serveOnce(modelDir, cacheDir, quant, threads);
  log(`serve start, cached: ${cachedStart.totalSeconds} s (to listening ${cachedStart.toListeningSeconds} s, model ${cachedStart.modelSeconds} s, after ${cachedStart.afterModelSeconds} s)`);
  const lookup = compileModel(modelDir, { quant, cacheDir });
  return { firstStart, cachedStart, cachedLookupSeconds: +lookup.seconds.toFixed(3), cachedLookupContentHashed: lookup.contentHashed };
}
