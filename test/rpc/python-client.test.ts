/**
 * A Python client, generated from proto/ with protoc and grpc's Python plugin, talks to loraplex:
 * proves the wire format, the streaming and the status codes work from another gRPC implementation, against
 * the real server with a real adapter.
 *
 * Generation: `buf build` compiles proto/ (the project's compiler, with the well-known types built in) to a
 * descriptor set, and protoc generates Python from it. Not `python3 -m grpc_tools.protoc`: Debian bookworm's
 * python3-grpc-tools bundles protoc 3.5, which rejects proto3 `optional`. Debian's packages are for
 * /usr/bin/python3, not the `python3` first on PATH (shared/ENGINE-NOTES.md).
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { execFile } from 'node:child_process';
import { accessSync, constants, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { delimiter, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { makeRandomAdapter, writePeftAdapter } from '../../src/adapters/peft.js';
import { readModelSpec } from '../../src/models/config.js';
import { STORIES } from '../helpers/engine.js';
import { collect, startTestServer, type TestServer } from '../helpers/server.js';

const run = promisify(execFile);
const root = fileURLToPath(new URL('../../../', import.meta.url));
const PYTHON = '/usr/bin/python3';
const INSTALL = 'apt-get install -y --no-install-recommends python3-grpcio protobuf-compiler protobuf-compiler-grpc (.ci/run does this)';

function onPath(name: string): string | undefined {
  for (const dir of (process.env['PATH'] ?? '').split(delimiter)) {
    try {
      accessSync(join(dir, name), constants.X_OK);
      return join(dir, name);
    } catch {
      // not in this directory
    }
  }
  return undefined;
}

/** Fails (never skips) with what to install: CI installs it, so a missing package is a broken setup. */
async function requireTools(): Promise<{ protoc: string; plugin: string }> {
  try {
    await run(PYTHON, ['-c', 'import grpc, google.protobuf']);
  } catch (err) {
    assert.fail(`python3-grpcio is not installed for ${PYTHON}: ${INSTALL}\n${(err as Error).message}`);
  }
  const protoc = onPath('protoc');
  const plugin = onPath('grpc_python_plugin');
  assert.ok(protoc, `protoc not found on PATH: ${INSTALL}`);
  assert.ok(plugin, `grpc_python_plugin not found on PATH: ${INSTALL}`);
  return { protoc, plugin };
}

/** Generates loraplex/v1/*_pb2.py and *_pb2_grpc.py from proto/ into `outDir`. */
async function generatePythonClient(outDir: string): Promise<void> {
  const { protoc, plugin } = await requireTools();
  const image = join(outDir, 'loraplex.binpb');
  await run(join(root, 'node_modules/.bin/buf'), ['build', '--as-file-descriptor-set', '-o', image], { cwd: root });
  const files = readdirSync(join(root, 'proto/loraplex/v1'))
    .filter((f) => f.endsWith('.proto'))
    .map((f) => `loraplex/v1/${f}`);
  await run(protoc, [
    `--descriptor_set_in=${image}`,
    `--python_out=${outDir}`,
    `--grpc_python_out=${outDir}`,
    `--plugin=protoc-gen-grpc_python=${plugin}`,
    ...files,
  ]);
}

interface RpcErrorJson {
  error: { code: string; details: string };
}
interface ClientResult {
  generate: { deltas: { text: string; tokenIds: number[] }[]; text: string; finished: Record<string, unknown> | null } | RpcErrorJson;
  loadAdapter: Record<string, unknown> | RpcErrorJson;
}

/** Runs test/rpc/python/client.py against `address`; async, since the server runs in this process. */
async function pythonClient(genDir: string, address: string, adapterId: string, prompt: string): Promise<ClientResult> {
  const script = join(root, 'test/rpc/python/client.py');
  const { stdout } = await run(PYTHON, [script, '--gen-dir', genDir, '--prompt', prompt, '--max-new-tokens', '16', address, adapterId], { timeout: 60_000 });
  return JSON.parse(stdout) as ClientResult;
}

let server: TestServer;
let genDir: string;

before(async () => {
  genDir = mkdtempSync(join(tmpdir(), 'loraplex-pyclient-'));
  server = await startTestServer();
  const spec = readModelSpec(STORIES);
  writePeftAdapter(join(server.adapterRoot, 'py-adapter'), makeRandomAdapter(spec, { r: 8, alpha: 16, targetModules: ['q_proj', 'v_proj'], seed: 4, bStd: 0.3 }));
});

after(async () => {
  await server?.close();
  rmSync(genDir, { recursive: true, force: true });
});

test('a Python client generated from proto/ runs Generate and LoadAdapter against the real server', { timeout: 120_000 }, async () => {
  await generatePythonClient(genDir);
  const prompt = 'Once upon a time';
  const [ok, missing] = await Promise.all([
    pythonClient(genDir, server.address, 'py-adapter', prompt),
    pythonClient(genDir, server.address, 'no-such-adapter', prompt),
  ]);

  assert.ok(!('error' in ok.generate), JSON.stringify(ok.generate));
  // Same greedy tokens as the Node client gets for the same request.
  const node = await collect(server.inference.generate({ prompt: { case: 'text', value: prompt }, adapterId: 'py-adapter', sampling: { temperature: 0, maxNewTokens: 16 } }));
  assert.deepEqual(ok.generate.deltas.flatMap((d) => d.tokenIds), node.tokenIds);
  assert.equal(ok.generate.text, node.text);
  assert.equal(ok.generate.finished?.['finishReason'], 'FINISH_REASON_LENGTH');
  assert.equal(ok.generate.finished?.['generatedTokens'], 16);

  const load = ok.loadAdapter as { adapter: Record<string, unknown>; loadSeconds?: number };
  assert.equal(load.adapter['adapterId'], 'py-adapter');
  assert.equal(load.adapter['rank'], 8);
  assert.deepEqual(load.adapter['targetModules'], ['q_proj', 'v_proj']);

  const notFound = { error: { code: 'NOT_FOUND', details: 'adapter_id "no-such-adapter" is not in the adapter store' } };
  assert.deepEqual(missing.generate, notFound);
  assert.deepEqual(missing.loadAdapter, notFound);
});
