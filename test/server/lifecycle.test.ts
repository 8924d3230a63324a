import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import * as grpc from '@grpc/grpc-js';
import { makeModel } from '../../src/models/make.js';
import { makeClient } from '../../src/rpc/bridge.js';
import { InferenceService } from '../../src/gen/loraplex/v1/inference_pb.js';
import { healthCheck, reflect } from '../helpers/grpc.js';
import { collect } from '../helpers/server.js';
import { tempDir } from '../helpers/engine.js';

const CLI = new URL('../../src/cli/main.js', import.meta.url).pathname;

test('loraplex serve: NOT_SERVING while loading, SERVING when ready, reflection; SIGTERM drains and exits 0', { timeout: 120_000 }, async () => {
  const modelDir = tempDir('serve-model');
  // Every port chosen by the system: another server on this machine may hold a default (8080 did, once).
  await makeModel({ arch: 'llama', size: 'small', outDir: modelDir, seed: 2 });
  const child = spawn(process.execPath, [CLI, 'serve', '--model', modelDir, '--host', '127.0.0.1', '--port', '0', '--adapter-root', tempDir('serve-adapters'), '--max-model-len', '512', '--drain-seconds', '20', '--threads', '1', '--auth', 'disabled', '--metrics-port', '0', '--http-port', '0'], {
    env: { ...process.env, LORAPLEX_CACHE_DIR: tempDir('serve-cache') },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  const logs: { msg: string; port?: number }[] = [];
  const waiters: { msg: string; resolve: (l: { port?: number }) => void }[] = [];
  createInterface({ input: child.stdout! }).on('line', (line) => {
    const entry = JSON.parse(line) as { msg: string; port?: number };
    logs.push(entry);
    for (const w of waiters.filter((x) => x.msg === entry.msg)) w.resolve(entry);
  });
  const logged = (msg: string) => new Promise<{ port?: number }>((resolve) => {
    const seen = logs.find((l) => l.msg === msg);
    if (seen) resolve(seen);
    else waiters.push({ msg, resolve });
  });
  try {
    const { port } = await logged('listening; loading the model');
    const address = `127.0.0.1:${port}`;
    // The port answers while the model is still being quantized.
    const early = await healthCheck(address);
    const ready = logs.some((l) => l.msg === 'serving');
    if (!ready) assert.equal(early, 'NOT_SERVING');
    await logged('serving');
    assert.equal(await healthCheck(address), 'SERVING');
    assert.equal(await healthCheck(address, 'loraplex.v1.InferenceService'), 'SERVING');
    const list = await reflect(address, 'grpc.reflection.v1', { messageRequest: { case: 'listServices', value: '*' } });
    assert.deepEqual(list.listServicesResponse?.service.map((s) => s.name).sort(), ['grpc.health.v1.Health', 'loraplex.v1.AdapterService', 'loraplex.v1.InferenceService', 'loraplex.v1.TrainService']);

    const client = makeClient(InferenceService, address);
    const stream = client.generate({ prompt: { case: 'text', value: 'hello' }, sampling: { maxNewTokens: 400, temperature: 0 } });
    const it = stream[Symbol.asyncIterator]();
    const first = await it.next();
    assert.equal(first.done, false);
    child.kill('SIGTERM');
    await logged('draining');
    assert.equal(await healthCheck(address), 'NOT_SERVING');
    await assert.rejects(collect(client.generate({ prompt: { case: 'text', value: 'late' } })), (e) => (e as grpc.ServiceError).code === grpc.status.UNAVAILABLE);
    // The running stream finishes normally within the grace period.
    const rest = await collect({ [Symbol.asyncIterator]: () => it });
    assert.equal(rest.finished?.generatedTokens, 400);
    client.close();
    assert.equal(await exited, 0);
  } finally {
    child.kill('SIGKILL');
  }
});
