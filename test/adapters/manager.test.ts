import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import v8 from 'node:v8';
import vm from 'node:vm';
import { AdapterManager, type AdapterManagerOptions } from '../../src/adapters/manager.js';
import { linearModules, makeRandomAdapter, writePeftAdapter, type PeftAdapter } from '../../src/adapters/peft.js';
import { AdapterStore } from '../../src/adapters/store.js';
import type { SlotWriter } from '../../src/adapters/slots.js';
import type { LoraAdapterWeights } from '../../src/models/lora.js';
import { LoraplexError, type ErrorCode } from '../../src/errors.js';
import type { LoraModuleInfo } from '../../src/models/graph.js';
import { makeModel } from '../../src/models/make.js';
import type { ModelSpec } from '../../src/models/spec.js';
import { removeDir, tempDir } from '../models/fixtures.js';
import { key } from '../helpers/adapter-keys.js';
import { LOCAL_PRINCIPAL, scopeAdapterId, storedAdapterKey } from '../../src/adapters/tenancy.js';

let spec: ModelSpec;
let loraModules: LoraModuleInfo[];
const dirs: string[] = [];

before(() => {
  const dir = tempDir('adapters-model');
  dirs.push(dir);
  spec = makeModel({ arch: 'llama', size: 'tiny', outDir: dir, seed: 1 }).spec;
  loraModules = linearModules(spec).map(({ module, inFeatures, outFeatures }) => ({ module, inFeatures, outFeatures }));
});

after(() => {
  for (const d of dirs) removeDir(d);
});

/** Records what the manager asks of the engine; keeps no reference to the weights (the memory test needs that). */
class FakeWriter implements SlotWriter {
  calls: { op: 'set' | 'clear'; slot: number; modules?: number; scale?: number; rank?: number }[] = [];
  /** When set, setSlot waits for it: lets a test hold a copy in flight. */
  gate: Promise<void> | null = null;
  failNext = false;

  async setSlot(slot: number, adapter: LoraAdapterWeights): Promise<void> {
    const rank = adapter.modules[0]?.r;
    const scale = adapter.scaling;
    const modules = adapter.modules.length;
    if (this.gate) await this.gate;
    else await Promise.resolve();
    if (this.failNext) {
      this.failNext = false;
      throw new Error('engine down');
    }
    this.calls.push({ op: 'set', slot, modules, scale, rank });
  }

  async clearSlot(slot: number): Promise<void> {
    await Promise.resolve();
    this.calls.push({ op: 'clear', slot });
  }

  sets(): number[] {
    return this.calls.filter((c) => c.op === 'set').map((c) => c.slot);
  }
  clears(): number[] {
    return this.calls.filter((c) => c.op === 'clear').map((c) => c.slot);
  }
}

interface Fixture {
  root: string;
  store: AdapterStore;
  writer: FakeWriter;
  manager: AdapterManager;
  clock: { t: number };
}

function fixture(over: Partial<AdapterManagerOptions> = {}): Fixture {
  const root = tempDir('adapters-store');
  dirs.push(root);
  const store = new AdapterStore(root);
  const writer = new FakeWriter();
  const clock = { t: 1_000 };
  const manager = new AdapterManager({
    store,
    spec,
    loraModules,
    maxLoras: 2,
    maxCpuLoras: 3,
    maxLoraRank: 16,
    maxAdapterBytes: 64 << 20,
    slotWriter: writer,
    now: () => clock.t,
    ...over,
  });
  return { root, store, writer, manager, clock };
}

function adapter(seed: number, r = 4, targetModules = ['q_proj', 'v_proj'], alpha = 8): PeftAdapter {
  return makeRandomAdapter(spec, { r, alpha, targetModules, seed });
}

function put(f: Fixture, id: string, a: PeftAdapter = adapter(id.length * 7 + id.charCodeAt(0))): PeftAdapter {
  f.store.write(key(id), a);
  return a;
}

async function rejectsWith(p: Promise<unknown> | (() => unknown), code: ErrorCode, re?: RegExp): Promise<LoraplexError> {
  let caught: unknown;
  try {
    await (typeof p === 'function' ? p() : p);
  } catch (err) {
    caught = err;
  }
  assert.ok(caught instanceof LoraplexError, `expected LoraplexError ${code}, got ${String(caught)}`);
  assert.equal(caught.code, code, caught.message);
  if (re) assert.match(caught.message, re);
  return caught;
}

const states = async (m: AdapterManager) => Object.fromEntries((await m.list()).map((i) => [i.adapterKey, i.state]));

test('invalid ids are INVALID_ARGUMENT at the edge: they never become keys, so they never reach the manager or the disk', async () => {
  const f = fixture();
  const principal = { tenant: 'acme', role: 'user' } as const;
  for (const id of ['..', 'a/b', '/abs', '\u0007', '', 'x'.repeat(129), '../outside']) {
    await rejectsWith(() => scopeAdapterId(LOCAL_PRINCIPAL, id), 'INVALID_ARGUMENT', /^adapter_id/);
    await rejectsWith(() => scopeAdapterId(principal, id), 'INVALID_ARGUMENT', /^adapter_id/);
    await rejectsWith(() => storedAdapterKey('', id), 'INVALID_ARGUMENT', /^adapter_id/);
    await rejectsWith(() => storedAdapterKey('acme', id), 'INVALID_ARGUMENT', /^adapter_id/);
  }
  // A raw client string does not compile where a key is expected (never called: the compiler is the check).
  const unchecked = (raw: string) => {
    // @ts-expect-error a string is not an AdapterKey
    void f.manager.tryAcquire(raw);
    // @ts-expect-error a string is not an AdapterKey
    void f.manager.load(raw);
    // @ts-expect-error a string is not an AdapterKey
    void f.manager.unload(raw, { deleteFromStore: true });
    // @ts-expect-error a string is not an AdapterKey
    void f.manager.info(raw);
    // @ts-expect-error a string is not an AdapterKey
    f.store.write(raw, adapter(1));
  };
  void unchecked;
  assert.deepEqual(readdirSync(f.root), []);
  put(f, 'my-adapter_v1.2');
  assert.equal((await f.manager.load(key('my-adapter_v1.2'))).info.state, 'loaded');
});

test('load reads and validates into memory; info reports it', async () => {
  const f = fixture();
  const a = put(f, 'alpha', adapter(3, 8, ['q_proj', 'v_proj', 'down_proj'], 16));
  assert.deepEqual(await states(f.manager), { alpha: 'stored' });
  const stored = (await f.manager.info(key('alpha')));
  assert.equal(stored.rank, 8);
  assert.equal(stored.alpha, 16);
  assert.deepEqual(stored.targetModules, ['q_proj', 'v_proj', 'down_proj']);
  assert.equal(stored.lastUsed, null);
  assert.ok(stored.bytes > 0);

  f.clock.t = 5_000;
  const { info, loadSeconds } = await f.manager.load(key('alpha'));
  assert.ok(loadSeconds > 0);
  assert.equal(info.state, 'loaded');
  assert.equal(info.rank, 8);
  assert.equal(info.alpha, 16);
  assert.deepEqual(info.targetModules, ['q_proj', 'v_proj', 'down_proj']);
  const tensorBytes = a.modules.reduce((n, m) => n + m.a.byteLength + m.b.byteLength, 0);
  assert.equal(info.bytes, tensorBytes);
  assert.equal(info.lastUsed, 5_000);
  assert.equal(info.pinned, false);
  assert.equal(info.activeRequests, 0);

  const again = await f.manager.load(key('alpha'), { pin: true });
  assert.equal(again.loadSeconds, 0);
  assert.equal(again.info.pinned, true);
  // A later load without pin does not unpin.
  assert.equal((await f.manager.load(key('alpha'))).info.pinned, true);
  assert.equal((await f.manager.stats()).loads, 1);
  assert.equal(f.writer.calls.length, 0, 'load alone never touches a slot');

  await rejectsWith(f.manager.load(key('nope')), 'NOT_FOUND', /^adapter_id "nope" is not in the adapter store$/);
});

test('memory holds at most maxCpuLoras adapters, evicting the least recently used', async () => {
  const f = fixture({ maxLoras: 1, maxCpuLoras: 2 });
  for (const id of ['a', 'b', 'c', 'd']) put(f, id);
  await f.manager.load(key('a'));
  await f.manager.load(key('b'));
  await f.manager.load(key('a')); // touch: b is now the LRU
  await f.manager.load(key('c'));
  assert.deepEqual(await states(f.manager), { a: 'loaded', b: 'stored', c: 'loaded', d: 'stored' });
  assert.equal((await f.manager.stats()).evictions, 1);

  // Pinned adapters are never evicted.
  await f.manager.load(key('a'), { pin: true });
  await f.manager.load(key('d'));
  assert.deepEqual(await states(f.manager), { a: 'loaded', b: 'stored', c: 'stored', d: 'loaded' });
  await f.manager.load(key('d'), { pin: true });
  await rejectsWith(f.manager.load(key('b')), 'RESOURCE_EXHAUSTED', /maxCpuLoras 2 .*pinned/);
  await rejectsWith(f.manager.tryAcquire(key('b')), 'RESOURCE_EXHAUSTED', /maxCpuLoras 2/);
  // Unloading a pinned adapter makes room.
  await f.manager.unload(key('d'));
  await f.manager.load(key('b'));
  assert.deepEqual(await states(f.manager), { a: 'loaded', b: 'loaded', c: 'stored', d: 'stored' });
  const s = (await f.manager.stats());
  assert.deepEqual([s.stored, s.loaded, s.active], [2, 2, 0]);
});

test('an adapter serving requests is not evicted from memory; tryAcquire waits instead of failing', async () => {
  const f = fixture({ maxLoras: 1, maxCpuLoras: 1 });
  put(f, 'a');
  put(f, 'b');
  const lease = (await f.manager.tryAcquire(key('a')))!;
  assert.equal(lease.slot, 1);
  // Not now: a's request holds the only slot and the only memory place.
  assert.equal(await f.manager.tryAcquire(key('b')), null);
  assert.equal((await f.manager.info(key('b'))).state, 'stored', 'nothing is loaded for a request that cannot run');
  await rejectsWith(f.manager.load(key('b')), 'RESOURCE_EXHAUSTED', /maxCpuLoras 1 .*serving requests; retry later/);
  lease.release();
  const lb = (await f.manager.tryAcquire(key('b')))!;
  assert.equal(lb.slot, 1);
  assert.deepEqual(await states(f.manager), { a: 'stored', b: 'active' });
  lb.release();
});

test('slots: LRU among adapters without running requests; a lease pins the slot', async () => {
  const f = fixture({ maxLoras: 2, maxCpuLoras: 4 });
  for (const id of ['a', 'b', 'c', 'd']) put(f, id);

  const la = (await f.manager.tryAcquire(key('a')))!;
  const lb = (await f.manager.tryAcquire(key('b')))!;
  assert.deepEqual([la.slot, lb.slot], [1, 2]);
  assert.deepEqual(f.writer.sets(), [1, 2]);
  assert.deepEqual(await states(f.manager), { a: 'active', b: 'active', c: 'stored', d: 'stored' });

  // Both slots are held by running requests: c must wait.
  assert.equal(await f.manager.tryAcquire(key('c')), null);
  assert.deepEqual(f.writer.sets(), [1, 2]);

  // b finishes first, then a: b's slot is the least recently used, so c takes it.
  f.clock.t = 2_000;
  lb.release();
  f.clock.t = 3_000;
  la.release();
  lb.release(); // idempotent
  assert.equal((await f.manager.info(key('b'))).activeRequests, 0);
  const lc = (await f.manager.tryAcquire(key('c')))!;
  assert.equal(lc.slot, 2);
  assert.deepEqual(f.manager.slotTable(), [null, 'a', 'c']);
  assert.deepEqual(await states(f.manager), { a: 'active', b: 'loaded', c: 'active', d: 'stored' });
  assert.equal((await f.manager.stats()).slotEvictions, 1);

  // a's slot is idle, c's is held by a request: d takes a's slot.
  const ld = (await f.manager.tryAcquire(key('d')))!;
  assert.equal(ld.slot, 1);
  assert.deepEqual(f.manager.slotTable(), [null, 'd', 'c']);

  // Several requests on one adapter share its slot; it stays pinned until the last one leaves.
  const lc2 = (await f.manager.tryAcquire(key('c')))!;
  assert.equal(lc2.slot, 2);
  assert.equal((await f.manager.info(key('c'))).activeRequests, 2);
  ld.release();
  lc.release();
  const la2 = (await f.manager.tryAcquire(key('a')))!;
  assert.equal(la2.slot, 1, 'c still has a request, so a gets d\'s slot');
  lc2.release();
  la2.release();

  const s = (await f.manager.stats());
  assert.equal(s.hits, 1);
  assert.equal(s.misses, 5);
  assert.equal(s.loads, 4);
});

test('pinned adapters still give up their slot when idle', async () => {
  const f = fixture({ maxLoras: 1, maxCpuLoras: 2 });
  put(f, 'p');
  put(f, 'q');
  await f.manager.load(key('p'), { pin: true });
  (await f.manager.tryAcquire(key('p')))!.release();
  const lq = (await f.manager.tryAcquire(key('q')))!;
  assert.equal(lq.slot, 1);
  const p = (await f.manager.info(key('p')));
  assert.equal(p.state, 'loaded');
  assert.equal(p.pinned, true);
  lq.release();
});

test('the slot holds the adapter scaling as PEFT defines it', async () => {
  const f = fixture();
  put(f, 's', adapter(9, 4, ['q_proj', 'k_proj', 'v_proj'], 32));
  (await f.manager.tryAcquire(key('s')))!.release();
  assert.deepEqual(f.writer.calls, [{ op: 'set', slot: 1, modules: 3 * spec.numLayers, scale: 32 / 4, rank: 4 }]);
});

test('tryAcquire returns null while every slot is busy, then succeeds after a release', async () => {
  const f = fixture({ maxLoras: 2, maxCpuLoras: 3 });
  for (const id of ['a', 'b', 'c']) put(f, id);
  const la = (await f.manager.tryAcquire(key('a')))!;
  const lb = (await f.manager.tryAcquire(key('b')))!;
  for (let i = 0; i < 3; i++) assert.equal(await f.manager.tryAcquire(key('c')), null);
  // Adapters already in a slot are still served.
  const la2 = (await f.manager.tryAcquire(key('a')))!;
  assert.equal(la2.slot, la.slot);
  la2.release();
  assert.equal(await f.manager.tryAcquire(key('c')), null, 'a still has a running request');
  la.release();
  const lc = await f.manager.tryAcquire(key('c'));
  assert.ok(lc);
  assert.equal(lc.slot, la.slot);
  lb.release();
  lc.release();
});

test('an adapter written into the store after the manager started is found; so is a plain copy', async () => {
  const f = fixture();
  assert.deepEqual((await f.manager.list()), []);
  await rejectsWith(f.manager.tryAcquire(key('late')), 'NOT_FOUND', /^adapter_id "late" is not in the adapter store$/);
  put(f, 'late');
  const lease = await f.manager.tryAcquire(key('late'));
  assert.ok(lease);
  lease.release();
  // Copied in by hand (e.g. rsync of a PEFT directory), not through the store.
  writePeftAdapter(join(f.root, 'copied'), adapter(5));
  assert.deepEqual(
    (await f.manager.list()).map((i) => [i.adapterKey, i.state]),
    [
      ['copied', 'stored'],
      ['late', 'active'],
    ],
  );
  const l2 = await f.manager.tryAcquire(key('copied'));
  assert.ok(l2);
  l2.release();
});

test('unload: FAILED_PRECONDITION while requests run; clears the slot; NOT_FOUND for unknown ids', async () => {
  const f = fixture();
  put(f, 'u');
  const l1 = (await f.manager.tryAcquire(key('u')))!;
  const l2 = (await f.manager.tryAcquire(key('u')))!;
  await rejectsWith(f.manager.unload(key('u')), 'FAILED_PRECONDITION', /^adapter_id "u" has 2 running requests; retry when they finish$/);
  l1.release();
  await rejectsWith(f.manager.unload(key('u')), 'FAILED_PRECONDITION', /has 1 running request;/);
  f.clock.t = 9_000;
  l2.release();
  f.clock.t = 10_000;
  const info = await f.manager.unload(key('u'));
  assert.equal(info.state, 'stored');
  assert.equal(info.activeRequests, 0);
  assert.deepEqual(f.writer.clears(), [l1.slot]);
  assert.deepEqual(f.manager.slotTable(), [null, null, null]);
  assert.equal((await f.manager.info(key('u'))).state, 'stored');
  assert.equal((await f.manager.info(key('u'))).lastUsed, 9_000, 'lastUsed survives the unload');
  l1.release(); // a late release after the unload changes nothing
  assert.equal((await f.manager.info(key('u'))).activeRequests, 0);

  // Stored only: without delete a no-op returning its info; with delete it is gone.
  const again = await f.manager.unload(key('u'));
  assert.equal(again.state, 'stored');
  assert.equal(f.writer.clears().length, 1);
  await f.manager.unload(key('u'), { deleteFromStore: true });
  assert.equal(existsSync(join(f.root, 'u')), false);
  await rejectsWith(f.manager.unload(key('u')), 'NOT_FOUND', /^adapter_id "u" is not in the adapter store$/);
  await rejectsWith(() => f.manager.info(key('u')), 'NOT_FOUND');

  // Loaded + deleteFromStore: memory, slot and directory all go.
  put(f, 'v');
  (await f.manager.tryAcquire(key('v')))!.release();
  const gone = await f.manager.unload(key('v'), { deleteFromStore: true });
  assert.equal(gone.adapterKey, 'v');
  assert.deepEqual((await f.manager.list()), []);
  await rejectsWith(f.manager.tryAcquire(key('v')), 'NOT_FOUND');
  assert.deepEqual(
    readdirSync(f.root).filter((n) => n.startsWith('.')),
    [],
    'no temp or tombstone directory is left behind',
  );
});

test('unload frees the memory of the adapters', async () => {
  v8.setFlagsFromString('--expose-gc');
  const gc = vm.runInNewContext('gc') as () => void;
  const arrayBuffers = () => {
    for (let i = 0; i < 3; i++) gc();
    return process.memoryUsage().arrayBuffers;
  };
  const f = fixture({ maxLoras: 2, maxCpuLoras: 4, maxLoraRank: 256 });
  const ids = ['m0', 'm1', 'm2', 'm3'];
  // About 2.4 MB of float32 each on the tiny model. Written from a separate function: an interpreter frame
  // may keep its last temporary (the last adapter written) alive, which would blur the baseline.
  const writeAll = () => {
    for (const [i, id] of ids.entries()) put(f, id, adapter(100 + i, 256, ['all-linear']));
  };
  writeAll();

  const base = arrayBuffers();
  for (const id of ids.slice(0, 2)) await f.manager.load(key(id));
  for (const id of ids.slice(2)) (await f.manager.tryAcquire(key(id)))!.release();
  const total = (await f.manager.list()).reduce((n, i) => n + i.bytes, 0);
  assert.ok(total > 8e6, `adapters hold ${total} bytes`);
  assert.equal((await f.manager.stats()).memoryBytes, total);
  const loaded = arrayBuffers();
  assert.ok(loaded - base > 0.9 * total, `loading grew arrayBuffers by ${loaded - base}, expected about ${total}`);

  for (const id of ids) await f.manager.unload(key(id));
  const freed = arrayBuffers();
  assert.ok(loaded - freed > 0.9 * total, `unload freed ${loaded - freed} of ${total} bytes`);
  assert.equal((await f.manager.stats()).memoryBytes, 0);
});

test('invalid adapters are INVALID_ARGUMENT naming the adapter and the rule', async () => {
  // The served graph has LoRA paths on q_proj and v_proj only.
  const served = loraModules.filter((m) => /\.(q_proj|v_proj)$/.test(m.module));
  const g = fixture({ maxLoraRank: 16, loraModules: served });

  put(g, 'big-rank', adapter(1, 32));
  const rankErr = await rejectsWith(g.manager.tryAcquire(key('big-rank')), 'INVALID_ARGUMENT');
  assert.equal(rankErr.message, 'rank 32 of adapter_id "big-rank": exceeds maxLoraRank 16');

  put(g, 'o-proj', adapter(2, 4, ['q_proj', 'o_proj']));
  await rejectsWith(g.manager.load(key('o-proj')), 'INVALID_ARGUMENT', /^adapter_id "o-proj": target module o_proj \(model\.layers\.0\.self_attn\.o_proj\) has no LoRA path.*valid target_modules: q_proj, v_proj$/);

  put(g, 'dora');
  const cfgPath = join(g.root, 'dora', 'adapter_config.json');
  writeFileSync(cfgPath, JSON.stringify({ ...JSON.parse(readFileSync(cfgPath, 'utf8')), use_dora: true }));
  await rejectsWith(g.manager.load(key('dora')), 'INVALID_ARGUMENT', /^adapter_id "dora": adapter_config.json: use_dora true \(DoRA\) is not supported$/);

  const nan = adapter(3);
  nan.modules[1]!.b[5] = Number.NaN;
  put(g, 'nan', nan);
  await rejectsWith(g.manager.load(key('nan')), 'INVALID_ARGUMENT', /^adapter_id "nan": adapter_model.safetensors: module .* lora_B holds a non-finite value \(NaN\)/);

  const inf = adapter(4);
  inf.modules[0]!.a[0] = Number.POSITIVE_INFINITY;
  put(g, 'inf', inf);
  await rejectsWith(g.manager.load(key('inf')), 'INVALID_ARGUMENT', /non-finite value \(Infinity\)/);

  const h = fixture({ maxAdapterBytes: 4096 });
  put(h, 'huge', adapter(5, 16, ['all-linear']));
  await rejectsWith(h.manager.load(key('huge')), 'INVALID_ARGUMENT', /^adapter_id "huge": \d+ bytes on disk exceeds maxAdapterBytes 4096$/);

  // Another model's adapter: the shapes do not match.
  const other = fixture();
  const wrong = adapter(6);
  wrong.modules = wrong.modules.map((m) => ({ ...m, inFeatures: 32, a: new Float32Array(m.r * 32) }));
  writePeftAdapter(join(other.root, 'wrong-model'), wrong);
  await rejectsWith(other.manager.load(key('wrong-model')), 'INVALID_ARGUMENT', /adapter for a different model/);

  for (const m of [g, h, other]) {
    for (const info of (await m.manager.list())) assert.equal(info.state, 'stored');
    // Messages go to clients: never a server path.
    for (const id of ['big-rank', 'o-proj', 'dora', 'nan', 'inf', 'huge', 'wrong-model']) {
      try {
        await m.manager.load(key(id));
      } catch (err) {
        assert.ok(!(err as Error).message.includes(m.root), (err as Error).message);
      }
    }
  }
  // A rejected adapter took no memory and no slot.
  assert.equal((await g.manager.stats()).loaded, 0);
  assert.equal(g.writer.calls.length, 0);
});

test('concurrent acquires of one adapter load it once and use one slot', async () => {
  const f = fixture({ maxLoras: 2, maxCpuLoras: 2 });
  put(f, 'hot');
  let open!: () => void;
  f.writer.gate = new Promise<void>((r) => (open = r));
  const pending = Array.from({ length: 8 }, () => f.manager.tryAcquire(key('hot')));
  await new Promise((r) => setImmediate(r));
  open();
  f.writer.gate = null;
  const leases = await Promise.all(pending);
  assert.ok(leases.every((l) => l !== null && l.slot === 1));
  const s = (await f.manager.stats());
  assert.equal(s.loads, 1);
  assert.deepEqual(f.writer.sets(), [1]);
  assert.equal((await f.manager.info(key('hot'))).activeRequests, 8);
  assert.equal(s.misses, 1);
  assert.equal(s.hits, 7);
  for (const l of leases) l!.release();
  assert.equal((await f.manager.info(key('hot'))).activeRequests, 0);
});

test('concurrent acquires of different adapters never share a slot', async () => {
  const f = fixture({ maxLoras: 3, maxCpuLoras: 5 });
  const ids = ['a', 'b', 'c', 'd', 'e'];
  for (const id of ids) put(f, id);
  let open!: () => void;
  f.writer.gate = new Promise<void>((r) => (open = r));
  const pending = ids.map((id) => f.manager.tryAcquire(key(id)));
  await new Promise((r) => setImmediate(r));
  open();
  const leases = await Promise.all(pending);
  const granted = leases.filter((l) => l !== null);
  assert.equal(granted.length, 3);
  assert.deepEqual(granted.map((l) => l!.slot).sort(), [1, 2, 3]);
  assert.equal(leases.filter((l) => l === null).length, 2);
  for (const l of granted) l!.release();
});

test('a failed copy into a slot is reported and leaves the slot usable', async () => {
  const f = fixture({ maxLoras: 1, maxCpuLoras: 2 });
  put(f, 'a');
  f.writer.failNext = true;
  await assert.rejects(f.manager.tryAcquire(key('a')), /engine down/);
  assert.equal((await f.manager.info(key('a'))).state, 'loaded');
  const lease = (await f.manager.tryAcquire(key('a')))!;
  assert.equal(lease.slot, 1);
  lease.release();
});

test('unload waits for an in-flight acquire of the same adapter', async () => {
  const f = fixture();
  put(f, 'a');
  let open!: () => void;
  f.writer.gate = new Promise<void>((r) => (open = r));
  const acquiring = f.manager.tryAcquire(key('a'));
  const unloading = f.manager.unload(key('a'));
  await new Promise((r) => setImmediate(r));
  open();
  const lease = (await acquiring)!;
  await rejectsWith(unloading, 'FAILED_PRECONDITION', /has 1 running request/);
  lease.release();
  assert.equal((await f.manager.unload(key('a'))).state, 'stored');
});

test('store: atomic writes, ALREADY_EXISTS, overwrite, delete, listing ignores scratch directories', () => {
  const root = tempDir('adapters-store-only');
  dirs.push(root);
  // Leftovers of a crash are dropped at startup.
  mkdirSync(join(root, '.tmp-x-123-abcd'));
  mkdirSync(join(root, '.deleted-123-abcd'));
  mkdirSync(join(root, 'not-an-adapter'));
  const store = new AdapterStore(root);
  assert.deepEqual(readdirSync(root), ['not-an-adapter']);
  assert.deepEqual(store.list(), []);

  const a = adapter(1);
  store.write(key('x'), a);
  assert.deepEqual(store.list(), ['x']);
  assert.ok(store.has(key('x')));
  assert.equal(store.dir(key('x')), join(root, 'x'));
  assert.ok(store.diskBytes(key('x')) > a.modules.reduce((n, m) => n + m.a.byteLength + m.b.byteLength, 0));
  assert.throws(
    () => store.write(key('x'), adapter(2)),
    (err: unknown) => err instanceof LoraplexError && err.code === 'ALREADY_EXISTS' && /adapter_id "x" already exists/.test(err.message),
  );
  const limits = { maxLoraRank: 16, maxAdapterBytes: 1 << 30, loraModules };
  assert.deepEqual(store.read(key('x'), spec, limits).modules[0]!.a, a.modules[0]!.a);

  const b = adapter(2, 8);
  store.write(key('x'), b, { overwrite: true });
  const back = store.read(key('x'), spec, limits);
  assert.equal(back.r, 8);
  assert.deepEqual(back.modules[0]!.b, b.modules[0]!.b);
  assert.deepEqual(store.describe(key('x')), { r: 8, alpha: 8, targetModules: ['q_proj', 'v_proj'] });

  store.delete(key('x'));
  assert.equal(store.has(key('x')), false);
  assert.throws(
    () => store.delete(key('x')),
    (err: unknown) => err instanceof LoraplexError && err.code === 'NOT_FOUND',
  );
  assert.throws(
    () => store.read(key('x'), spec, limits),
    (err: unknown) => err instanceof LoraplexError && err.code === 'NOT_FOUND',
  );
  assert.deepEqual(readdirSync(root).sort(), ['not-an-adapter']);
});

test('construction checks its capacity settings', () => {
  assert.throws(() => fixture({ maxLoras: 4, maxCpuLoras: 2 }), /maxCpuLoras 2 must be at least maxLoras 4/);
  assert.throws(() => fixture({ maxLoras: 0 }), /maxLoras must be a positive integer/);
  assert.throws(() => fixture({ maxLoraRank: 1.5 }), /maxLoraRank must be a positive integer/);
});
