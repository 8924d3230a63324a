import { existsSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { makeModel } from '../models/make.js';
import { createLogger } from '../obs/logger.js';
import { startServer, type ServerConfig } from '../main.js';
import { num, parse } from './args.js';
import { defaultCacheDir, engineFlags, engineSettings } from './common.js';

export const SERVE_USAGE = `loraplex serve [--model DIR] [--host H] [--port P] [--adapter-root DIR] [--max-loras N]
    [--max-cpu-loras N] [--max-lora-rank R] [--max-num-seqs N] [--max-waiting N] [--max-model-len N]
    [--quant none|int4|nf4|int8] [--threads N] [--drain-seconds S] [--log-level L]`;

/** Without --model: a small random-weight llama, generated once into the cache, so `npm start` works anywhere. */
async function demoModel(log: ReturnType<typeof createLogger>): Promise<string> {
  const dir = join(defaultCacheDir(), 'demo-model-llama-small');
  if (!existsSync(join(dir, 'config.json'))) {
    log.info({ dir }, 'generating the demo model (random weights, first start only)');
    await makeModel({ arch: 'llama', size: 'small', outDir: dir, seed: 1 });
  }
  log.warn({ dir }, 'serving a DEMO model with random weights: its text is gibberish. Serve a real Hugging Face model directory with --model DIR');
  return dir;
}

export async function serveCommand(argv: string[]): Promise<void> {
  const v = parse(argv, {
    ...engineFlags,
    host: { type: 'string' },
    port: { type: 'string' },
    'adapter-root': { type: 'string' },
    'max-cpu-loras': { type: 'string' },
    'max-waiting': { type: 'string' },
    'max-adapter-bytes': { type: 'string' },
    'max-new-tokens-default': { type: 'string' },
    'drain-seconds': { type: 'string' },
    'log-level': { type: 'string' },
  });
  const log = createLogger({ level: typeof v['log-level'] === 'string' ? v['log-level'] : undefined });
  const modelDir = typeof v['model'] === 'string' ? resolve(v['model']) : await demoModel(log);
  const cfg: ServerConfig = {
    ...engineSettings(v, modelDir),
    host: typeof v['host'] === 'string' ? v['host'] : '0.0.0.0',
    port: num(v, 'port', 50051, { integer: true, min: 0, max: 65535 }),
    adapterRoot: resolve(typeof v['adapter-root'] === 'string' ? v['adapter-root'] : 'adapters'),
    maxCpuLoras: num(v, 'max-cpu-loras', 16, { integer: true, min: 1, max: 4096 }),
    maxWaiting: num(v, 'max-waiting', 256, { integer: true, min: 1, max: 1 << 20 }),
    maxAdapterBytes: num(v, 'max-adapter-bytes', 512 * 1024 * 1024, { integer: true, min: 1024 }),
    maxNewTokensDefault: num(v, 'max-new-tokens-default', 256, { integer: true, min: 1 }),
    drainSeconds: num(v, 'drain-seconds', 30, { min: 0, max: 3600 }),
    source: typeof v['model'] === 'string' ? modelDir : 'demo',
  };
  const server = await startServer(cfg, log);
  let draining = false;
  const onSignal = (signal: string) => {
    if (draining) return;
    draining = true;
    log.info({ signal }, 'shutting down');
    server.drain().then(
      () => process.exit(0),
      (err) => {
        log.error({ err }, 'drain failed');
        process.exit(1);
      },
    );
  };
  process.on('SIGTERM', () => onSignal('SIGTERM'));
  process.on('SIGINT', () => onSignal('SIGINT'));
}
