import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { truncateSync, statSync, writeFileSync } from 'node:fs';
import { linearModules, makeRandomAdapter, writePeftAdapter, type PeftAdapter } from '../../src/adapters/peft.js';
import { AdapterStore, ADAPTER_WEIGHTS_FILE, type AdapterLimits } from '../../src/adapters/store.js';
import { readModelSpec } from '../../src/models/config.js';
import { readSafetensorsHeader } from '../../src/models/safetensors.js';
import { WorkerPool } from '../../src/workers/pool.js';
import { pooledAdapterIo, type Tasks } from '../../src/workers/tasks.js';
import { removeDir, tempDir } from '../models/fixtures.js';
import { STORIES } from '../helpers/engine.js';
import { key } from '../helpers/adapter-keys.js';
import { loraplexError } from '../train/train-fixtures.js';

const script = new URL('../../src/workers/task-worker.js', import.meta.url);
const spec = readModelSpec(STORIES);
const limits: AdapterLimits = { maxLoraRank: 16, maxAdapterBytes: 64 << 20, loraModules: linearModules(spec) };

/** A random all-linear adapter whose values F16 and BF16 hold exactly (k/64, |k| <= 127), so every dtype reads the same. */
function exactAdapter(seed: number, r = 4): PeftAdapter {
  const adapter = makeRandomAdapter(spec, { r, alpha: 8, targetModules: ['all-linear'], seed, bStd: 0.1 });
  let s = seed;
  const next = () => ((s = (s * 1103515245 + 12345) % 2147483648), (s % 255) - 127);
  for (const m of adapter.modules) for (const t of [m.a, m.b]) for (let i = 0; i < t.length; i++) t[i] = next() / 64;
  return adapter;
}

function assertTensors(got: PeftAdapter, want: PeftAdapter, what: string): void {
  assert.deepEqual(got.modules.map((m) => m.module), want.modules.map((m) => m.module), what);
  got.modules.forEach((m, i) => {
    assert.deepEqual(m.a, want.modules[i]!.a, `${what}: ${m.module} lora_A`);
    assert.deepEqual(m.b, want.modules[i]!.b, `${what}: ${m.module} lora_B`);
  });
}

test('pooled adapter reads: F32, F16 and BF16 files give the reference numbers, in shared memory; a reused reserve never aliases a live adapter', async () => {
  const root = tempDir('adapter-io');
  const pool = new WorkerPool<Tasks>(script, { size: 1 });
  try {
    const store = new AdapterStore(root);
    const io = pooledAdapterIo(pool, root);
    const want = exactAdapter(7);
    for (const dtype of ['F32', 'F16', 'BF16'] as const) writePeftAdapter(store.dir(key(dtype)), want, { dtype });
    const other = exactAdapter(8);
    writePeftAdapter(store.dir(key('other')), other, { dtype: 'F16' });

    // Same-shaped reads one after another: from the second on, each decodes into the reserve the pool prefaulted.
    const held: [PeftAdapter, PeftAdapter][] = [];
    for (let round = 0; round < 3; round++) {
      for (const dtype of ['F32', 'F16', 'BF16'] as const) {
        const got = await io.read(key(dtype), spec, limits);
        assert.ok(got.modules.every((m) => m.a.buffer instanceof SharedArrayBuffer && m.b.buffer instanceof SharedArrayBuffer), dtype);
        held.push([got, want]);
      }
      held.push([await io.read(key('other'), spec, limits), other]);
      // Let the refill land, so that the next read really takes a reserve.
      await new Promise((r) => setTimeout(r, 50));
    }
    // Every adapter read so far still holds its own numbers: no later read wrote into its memory.
    held.forEach(([got, ref], i) => assertTensors(got, ref, `read ${i}`));
    const buffers = new Set(held.map(([got]) => got.modules[0]!.a.buffer));
    assert.equal(buffers.size, held.length, 'each read has its own buffer');

    // A failed read leaves the reserve usable: the next read is still right.
    writeFileSync(join(store.dir(key('F16')), ADAPTER_WEIGHTS_FILE), 'garbage');
    await assert.rejects(io.read(key('F16'), spec, limits), loraplexError('INVALID_ARGUMENT', /adapter_model\.safetensors/));
    assertTensors(await io.read(key('BF16'), spec, limits), want, 'after a failed read');
  } finally {
    await pool.close();
    removeDir(root);
  }
});

test('a truncated or corrupt adapter_model.safetensors is INVALID_ARGUMENT naming the tensor, in the pool and inline', async () => {
  const root = tempDir('adapter-io-bad');
  const pool = new WorkerPool<Tasks>(script, { size: 1 });
  try {
    const store = new AdapterStore(root);
    const io = pooledAdapterIo(pool, root);
    const adapter = exactAdapter(9);
    for (const dtype of ['F32', 'F16', 'BF16'] as const) {
      const id = key(`cut-${dtype}`);
      writePeftAdapter(store.dir(id), adapter, { dtype });
      const file = join(store.dir(id), ADAPTER_WEIGHTS_FILE);
      // The tensor whose bytes come last is the one cut short.
      const [cut] = [...readSafetensorsHeader(file)].sort(([, x], [, y]) => y.end - x.end)[0]!;
      truncateSync(file, statSync(file).size - 3);
      const named = loraplexError('INVALID_ARGUMENT', new RegExp(`adapter_model\\.safetensors: tensor ${cut.replaceAll('.', '\\.')} ends at byte \\d+, past the end of the file \\(\\d+ bytes; truncated\\?\\)`));
      assert.throws(() => store.read(id, spec, limits), named);
      await assert.rejects(io.read(id, spec, limits), named);
    }
    // A header length field pointing past the end, and a header that is not JSON.
    const corrupt = (id: string, bytes: Buffer) => {
      writePeftAdapter(store.dir(key(id)), adapter);
      writeFileSync(join(store.dir(key(id)), ADAPTER_WEIGHTS_FILE), bytes);
      return key(id);
    };
    const huge = corrupt('huge', Buffer.concat([Buffer.from([0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0]), Buffer.alloc(64)]));
    await assert.rejects(io.read(huge, spec, limits), loraplexError('INVALID_ARGUMENT', /header length \d+ does not fit/));
    const notJson = corrupt('notjson', Buffer.concat([Buffer.from([8, 0, 0, 0, 0, 0, 0, 0]), Buffer.from('{{{{{{{{')]));
    await assert.rejects(io.read(notJson, spec, limits), loraplexError('INVALID_ARGUMENT', /header is not valid JSON/));
  } finally {
    await pool.close();
    removeDir(root);
  }
});
