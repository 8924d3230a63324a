/**
 * Hostile adapter folders against the real server: a FIFO config and configs whose r / lora_alpha do not fit
 * the response fields give clear statuses on every adapter RPC, the listing still serializes, and the server
 * goes on serving.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { execFileSync } from 'node:child_process';
import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { makeRandomAdapter, writePeftAdapter } from '../../src/adapters/peft.js';
import { readModelSpec } from '../../src/models/config.js';
import { collect, failure, startTestServer, type TestServer } from '../helpers/server.js';
import { STORIES } from '../helpers/engine.js';

const spec = readModelSpec(STORIES);
const text = (value: string) => ({ case: 'text' as const, value });
const greedy = { temperature: 0, maxNewTokens: 4 };

/** Hostile adapters by id; each is a valid adapter first, then its config is replaced. */
const HOSTILE: Record<string, (configPath: string, text: string) => void> = {
  fifo: (p) => {
    rmSync(p);
    execFileSync('mkfifo', [p]);
  },
  'r-2e60': (p, t) => writeFileSync(p, t.replace(/"r": \d+/, '"r": 1152921504606846976')),
  'alpha-1e39': (p, t) => writeFileSync(p, t.replace(/"lora_alpha": [^,\n]+/, '"lora_alpha": 1e39')),
};

let s: TestServer;
before(async () => {
  s = await startTestServer();
  const write = (id: string) => writePeftAdapter(join(s.adapterRoot, id), makeRandomAdapter(spec, { r: 4, alpha: 8, targetModules: ['q_proj', 'v_proj'], seed: 1 }));
  write('good');
  for (const [id, plant] of Object.entries(HOSTILE)) {
    write(id);
    const p = join(s.adapterRoot, id, 'adapter_config.json');
    plant(p, readFileSync(p, 'utf8'));
  }
});
after(async () => {
  await s.close();
});

test('ListAdapters serializes, showing each hostile adapter as invalid with a reason', async () => {
  const list = await s.adapters.listAdapters({});
  const byId = new Map(list.adapters.map((a) => [a.adapterId, a]));
  assert.equal(byId.get('good')?.invalidReason, '');
  assert.equal(byId.get('good')?.rank, 4);
  assert.match(byId.get('fifo')?.invalidReason ?? '', /adapter_config\.json: is not a regular file/);
  assert.match(byId.get('r-2e60')?.invalidReason ?? '', /r must be a positive integer/);
  assert.equal(byId.get('r-2e60')?.rank, 0);
  assert.match(byId.get('alpha-1e39')?.invalidReason ?? '', /lora_alpha must be a positive number at most/);
  assert.equal(byId.get('alpha-1e39')?.alpha, 0);
});

test('LoadAdapter and Generate give INVALID_ARGUMENT; Unload and delete work; the server keeps serving', async () => {
  for (const id of Object.keys(HOSTILE)) {
    const load = await failure(s.adapters.loadAdapter({ adapterId: id }));
    assert.equal(load.code, grpc.status.INVALID_ARGUMENT, `${id}: ${load.details}`);
    assert.ok(!load.details.includes(s.adapterRoot), load.details);
    const gen = await failure(collect(s.inference.generate({ prompt: text('Once'), adapterId: id, sampling: greedy })));
    assert.equal(gen.code, grpc.status.INVALID_ARGUMENT, `${id}: ${gen.details}`);
    const unloaded = await s.adapters.unloadAdapter({ adapterId: id, deleteFromStore: true });
    assert.equal(unloaded.adapter?.adapterId, id);
    assert.notEqual(unloaded.adapter?.invalidReason, '');
    const gone = await failure(s.adapters.unloadAdapter({ adapterId: id }));
    assert.equal(gone.code, grpc.status.NOT_FOUND, gone.details);
  }
  const out = await collect(s.inference.generate({ prompt: text('Once'), adapterId: 'good', sampling: greedy }));
  assert.equal(out.tokenIds.length, 4);
  assert.deepEqual((await s.adapters.listAdapters({})).adapters.map((a) => a.adapterId), ['good']);
});
