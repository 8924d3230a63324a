/**
 * The README's walk-throughs, run as written against `npm start`'s server (the built-in model, auth disabled):
 * every grpcurl command through a gRPC client and every curl command through the `openai` package, with the
 * request JSON taken from the README itself. The JSON and text the README shows in the comments after a command
 * must appear in that command's answer, so the README cannot drift from what the server says.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { fromJson, toJson, type DescMethod, type DescService, type JsonValue } from '@bufbuild/protobuf';
import OpenAI from 'openai';
import { makeRandomAdapter, writePeftAdapter } from '../../src/adapters/peft.js';
import { BUILTIN_MODEL_DIR } from '../../src/models/builtin.js';
import { readModelSpec } from '../../src/models/config.js';
import { makeClient } from '../../src/rpc/bridge.js';
import { AdapterService } from '../../src/gen/loraplex/v1/adapters_pb.js';
import { InferenceService } from '../../src/gen/loraplex/v1/inference_pb.js';
import { TrainService } from '../../src/gen/loraplex/v1/train_pb.js';
import { healthCheck, reflect } from '../helpers/grpc.js';
import { tempDir } from '../helpers/engine.js';

const ROOT = new URL('../../../', import.meta.url).pathname;
const README = readFileSync(join(ROOT, 'README.md'), 'utf8');

/** The ```sh blocks of the README section that starts with `heading`. */
function shellBlocks(heading: string): string[] {
  const start = README.indexOf(`\n## ${heading}`);
  assert.ok(start >= 0, `README section ${heading}`);
  const end = README.indexOf('\n## ', start + 1);
  return [...README.slice(start, end).matchAll(/```sh\n([\s\S]*?)```/g)].map((m) => m[1]!);
}

interface Command {
  tool: 'grpcurl' | 'curl';
  args: string[];
  /** The comment lines right after it, joined: what the README says it answers. */
  shown: string;
  shownLines: string[];
}

/** Commands as a shell reads them (single quotes, backslash-newline), each with the comments that follow it. */
function commands(block: string): Command[] {
  const out: Command[] = [];
  const lines = block.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const first = lines[i]!;
    const tool = /^(grpcurl|curl) /.exec(first)?.[1] as Command['tool'] | undefined;
    if (!tool) continue;
    let text = first;
    // A line ending in a backslash, or an open single quote, continues on the next.
    while ((text.endsWith('\\') || (text.split("'").length - 1) % 2 === 1) && i + 1 < lines.length) text = (text.endsWith('\\') ? text.slice(0, -1) : `${text}\n`) + lines[++i]!;
    const shown: string[] = [];
    while (i + 1 < lines.length && lines[i + 1]!.startsWith('#')) shown.push(lines[++i]!.replace(/^#\s*/, ''));
    out.push({ tool, args: words(text), shown: shown.join(' '), shownLines: shown });
  }
  return out;
}

function words(text: string): string[] {
  return [...text.matchAll(/'([^']*)'|(\S+)/g)].map((m) => m[1] ?? m[2]!);
}

/** The value after `flag`, if any. */
const option = (args: string[], flag: string) => {
  const at = args.indexOf(flag);
  return at < 0 ? undefined : args[at + 1];
};

/**
 * Checks what the README shows against an answer: each `"key": value` it shows (a string, number, null, boolean or
 * list of numbers; `...` inside a string stands for any text) must be in the answer somewhere, and a comment line
 * that is one quoted string is the whole text (prompt and generation).
 */
function checkShown(cmd: Command, answer: unknown, fullText: string | null): void {
  const where = cmd.args.filter((a) => !a.startsWith('{')).join(' ');
  for (const line of cmd.shownLines) {
    const whole = /^"((?:[^"\\]|\\.)*)"$/.exec(line.trim());
    if (whole) assert.equal(fullText, JSON.parse(`"${whole[1]}"`), where);
  }
  const pairs = cmd.shown.matchAll(/"(\w+)":\s*("(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?|null|true|false|\[[-\d.,\s]*\])/g);
  for (const [, key, raw] of pairs) {
    const value = JSON.parse(raw!) as unknown;
    const matches = (v: unknown) =>
      typeof value === 'string' && value.includes('...') ? typeof v === 'string' && new RegExp(`^${value.split('...').map(escapeRegExp).join('[\\s\\S]*')}$`).test(v) : isDeepStrictEqual(v, value);
    assert.ok(found(answer, key!, matches), `${where}: the README shows "${key}": ${raw}; the answer was ${JSON.stringify(answer).slice(0, 2000)}`);
  }
}

function escapeRegExp(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

function isDeepStrictEqual(a: unknown, b: unknown): boolean {
  try {
    assert.deepStrictEqual(a, b);
    return true;
  } catch {
    return false;
  }
}

function found(x: unknown, key: string, matches: (v: unknown) => boolean): boolean {
  if (Array.isArray(x)) return x.some((v) => found(v, key, matches));
  if (x === null || typeof x !== 'object') return false;
  return Object.entries(x).some(([k, v]) => (k === key && matches(v)) || found(v, key, matches));
}

const SERVICES: readonly DescService[] = [InferenceService, AdapterService, TrainService];

let child: ChildProcess;
let grpcAddress: string;
let httpPort: number;
let cwd: string;

async function freePort(): Promise<number> {
  const probe = createServer();
  await new Promise<void>((resolve) => probe.listen(0, '127.0.0.1', resolve));
  const { port } = probe.address() as { port: number };
  await new Promise((resolve) => probe.close(resolve));
  return port;
}

before(async () => {
  // `npm start` is `npm run build && <serve command>`; the build is done, so run its serve command as it stands.
  const start = (JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { scripts: { start: string } }).scripts.start;
  const [node, script, ...args] = start.split('&&').at(-1)!.trim().split(/\s+/);
  assert.equal(node, 'node');
  assert.deepEqual(args, ['serve', '--auth', 'disabled'], 'npm start serves the default model with auth disabled');
  // The walk-through's adapters, in the default adapter root ./adapters of the server's working directory.
  cwd = tempDir('walkthrough');
  const spec = readModelSpec(BUILTIN_MODEL_DIR);
  ['my-adapter', 'a', 'b'].forEach((id, seed) => writePeftAdapter(join(cwd, 'adapters', id), makeRandomAdapter(spec, { r: 4, alpha: 8, targetModules: ['q_proj', 'v_proj'], seed, bStd: 0.2 })));
  httpPort = await freePort();
  // Only the ports differ from the defaults (other servers on this machine may hold 50051, 8080 and 9090).
  child = spawn(process.execPath, [join(ROOT, script!), ...args, '--host', '127.0.0.1', '--port', '0', '--http-port', String(httpPort), '--metrics-port', '0'], {
    cwd,
    env: { ...process.env, LORAPLEX_CACHE_DIR: join(cwd, 'cache') },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const port = await new Promise<number>((resolve, reject) => {
    child.once('exit', (code) => reject(new Error(`serve exited with ${code}`)));
    createInterface({ input: child.stdout! }).on('line', (line) => {
      const entry = JSON.parse(line) as { msg: string; port?: number };
      if (entry.msg === 'serving') resolve(entry.port!);
    });
  });
  grpcAddress = `127.0.0.1:${port}`;
});

after(async () => {
  if (!child || child.exitCode !== null) return;
  const exited = new Promise((resolve) => child.once('exit', resolve));
  child.kill('SIGTERM');
  await exited;
});

test('the gRPC walk-through: each grpcurl command answers as the README shows', { timeout: 120_000 }, async () => {
  const cmds = shellBlocks('gRPC walk-through').flatMap(commands);
  assert.ok(cmds.filter((c) => c.tool === 'grpcurl').length >= 10, 'the walk-through is found');
  for (const cmd of cmds.filter((c) => c.tool === 'grpcurl')) {
    const args = cmd.args.filter((a) => a !== '-plaintext');
    const data = option(args, '-d');
    const rest = args.filter((a, i) => a !== '-d' && args[i - 1] !== '-d' && a !== 'grpcurl');
    assert.equal(rest[0], 'localhost:50051', 'the README talks to the default gRPC port');
    const [verb, symbol] = rest.slice(1);
    const request = data === undefined ? {} : (JSON.parse(data) as JsonValue);
    if (verb === 'list') {
      const list = await reflect(grpcAddress, 'grpc.reflection.v1', { messageRequest: { case: 'listServices', value: '*' } });
      const names = list.listServicesResponse!.service.map((s) => s.name);
      for (const shown of cmd.shown.split(/\s+/)) assert.ok(names.includes(shown), `list shows ${shown}`);
    } else if (verb === 'describe') {
      const d = await reflect(grpcAddress, 'grpc.reflection.v1', { messageRequest: { case: 'fileContainingSymbol', value: symbol } });
      assert.equal(d.errorResponse, undefined, `describe ${symbol}`);
    } else if (verb === 'grpc.health.v1.Health/Check') {
      assert.equal(await healthCheck(grpcAddress, (request as { service: string }).service), 'SERVING');
    } else {
      const [serviceName, methodName] = verb!.split('/');
      const service = SERVICES.find((s) => s.typeName === serviceName);
      const method = service?.methods.find((m) => m.name === methodName);
      assert.ok(service && method, `${verb} exists`);
      const { answer, fullText } = await callGrpc(service, method, request);
      checkShown(cmd, answer, fullText);
    }
  }
});

async function callGrpc(service: DescService, method: DescMethod, request: JsonValue): Promise<{ answer: unknown; fullText: string | null }> {
  const client = makeClient(service, grpcAddress) as unknown as Record<string, (req: unknown) => unknown>;
  try {
    const req = fromJson(method.input, request);
    const call = client[method.localName]!(req);
    if (method.methodKind === 'unary') return { answer: toJson(method.output, (await call) as never), fullText: null };
    const messages: JsonValue[] = [];
    for await (const m of call as AsyncIterable<never>) messages.push(toJson(method.output, m));
    const generated = messages.map((m) => ((m as { delta?: { text?: string } }).delta?.text ?? '')).join('');
    return { answer: messages, fullText: `${(request as { text?: string }).text ?? ''}${generated}` };
  } finally {
    (client as unknown as { close(): void }).close();
  }
}

test('the HTTP walk-through: each curl command answers as the README shows, through the openai package', { timeout: 120_000 }, async () => {
  const cmds = shellBlocks('OpenAI-compatible HTTP API').flatMap(commands);
  assert.ok(cmds.length >= 5, 'the walk-through is found');
  // Auth is disabled: any key will do, but the package needs one.
  const client = new OpenAI({ baseURL: `http://127.0.0.1:${httpPort}/v1`, apiKey: 'unused', maxRetries: 0 });
  for (const cmd of cmds) {
    const url = cmd.args.find((a) => a.startsWith('localhost:'))!;
    assert.match(url, /^localhost:8080\/v1\//, 'the README talks to the default HTTP port');
    const path = url.slice('localhost:8080/v1'.length);
    const data = option(cmd.args, '-d');
    const body = data === undefined ? undefined : (JSON.parse(data) as Record<string, unknown>);
    const expectsError = cmd.shown.includes('{"error":');
    let answer: unknown;
    try {
      answer = await callHttp(client, path, body);
      assert.ok(!expectsError, `${path} ${data}: the README shows an error`);
    } catch (e) {
      if (!(e instanceof OpenAI.APIError) || !expectsError) throw e;
      answer = { error: e.error };
    }
    const text = (answer as { choices?: { text?: string }[] }).choices?.[0]?.text;
    checkShown(cmd, answer, typeof body?.['prompt'] === 'string' && text !== undefined ? body['prompt'] + text : null);
  }
});

async function callHttp(client: OpenAI, path: string, body: Record<string, unknown> | undefined): Promise<unknown> {
  if (path === '/models') return client.get('/models');
  if (path === '/completions' || path === '/chat/completions') {
    const endpoint = path === '/completions' ? client.completions : client.chat.completions;
    const result = await (endpoint.create as (b: unknown) => Promise<unknown>).call(endpoint, body);
    if (body?.['stream'] !== true) return result;
    // A stream: every chunk, in order.
    const chunks: unknown[] = [];
    for await (const chunk of result as AsyncIterable<unknown>) chunks.push(chunk);
    return chunks;
  }
  throw new Error(`no openai call for ${path}`);
}
