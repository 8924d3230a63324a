import assert from 'node:assert/strict';
import { after, before, mock, test } from 'node:test';
import crypto from 'node:crypto';
import { syncBuiltinESMExports } from 'node:module';
import { existsSync, mkdirSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import type { DescMethod, DescService } from '@bufbuild/protobuf';
import {
  ApiKeysError,
  INVALID_KEY_MESSAGE,
  MISSING_KEY_MESSAGE,
  bearerToken,
  createAuthenticator,
  findKey,
  parseApiKeys,
  readApiKeys,
} from '../../src/rpc/auth.js';
import {
  LOCAL_PRINCIPAL,
  adapterKeyPath,
  asSeenBy,
  displayId,
  parseAdapterKey,
  requireAdmin,
  scopeAdapterId,
  storedAdapterKey,
  tenantOf,
  unscopeAdapterId,
  visibleAdapters,
  visibleTo,
  type Principal,
} from '../../src/adapters/tenancy.js';
import { AdapterStore } from '../../src/adapters/store.js';
import { AdapterManager } from '../../src/adapters/manager.js';
import { linearModules, makeRandomAdapter, type PeftAdapter } from '../../src/adapters/peft.js';
import { LoraplexError, type ErrorCode } from '../../src/errors.js';
import { makeModel } from '../../src/models/make.js';
import type { ModelSpec } from '../../src/models/spec.js';
import type { LoraModuleInfo } from '../../src/models/graph.js';
import { addService, makeClient, type CallContext, type CallEndInfo, type ServiceImpl } from '../../src/rpc/bridge.js';
import { InferenceService } from '../../src/gen/loraplex/v1/inference_pb.js';
import { removeDir, tempDir } from '../models/fixtures.js';
import { key } from '../helpers/adapter-keys.js';
import type { AdapterKey } from '../../src/adapter-key.js';

const dirs: string[] = [];
const dir = (prefix: string) => {
  const d = tempDir(prefix);
  dirs.push(d);
  return d;
};
after(() => {
  for (const d of dirs) removeDir(d);
});

const KEY_A = 'acme-user-key-0123456789';
const KEY_B = 'globex-user-key-0123456789';
const KEY_OPS = 'ops-admin-key-0123456789';
const KEYS_YAML = `keys:
  - { key: ${KEY_A}, tenant: acme, role: user }
  - key: ${KEY_B}
    tenant: globex
  - { key: ${KEY_OPS}, tenant: ops, role: admin }
`;

function isError(code: ErrorCode, message?: string | RegExp) {
  return (e: unknown) => {
    assert.ok(e instanceof LoraplexError, `not a LoraplexError: ${String(e)}`);
    assert.equal(e.code, code, e.message);
    if (typeof message === 'string') assert.equal(e.message, message);
    else if (message) assert.match(e.message, message);
    return true;
  };
}

function keysError(message: string | RegExp) {
  return (e: unknown) => {
    assert.ok(e instanceof ApiKeysError, `not an ApiKeysError: ${String(e)}`);
    if (typeof message === 'string') assert.equal(e.message, message);
    else assert.match(e.message, message);
    assert.ok(!e.message.includes('0123456789'), 'a message must never show a key');
    return true;
  };
}

function md(authorization?: string): grpc.Metadata {
  const m = new grpc.Metadata();
  if (authorization !== undefined) m.set('authorization', authorization);
  return m;
}

// --- keys file ---------------------------------------------------------------------------------------

test('keys file: YAML or JSON, role defaults to user; principals per entry', () => {
  const yaml = parseApiKeys(KEYS_YAML, 'keys.yaml');
  assert.deepEqual(yaml.map((e) => e.principal), [{ tenant: 'acme', role: 'user' }, { tenant: 'globex', role: 'user' }, { tenant: 'ops', role: 'admin' }]);
  assert.deepEqual(yaml.map((e) => e.source), ['keys.yaml#0', 'keys.yaml#1', 'keys.yaml#2']);
  assert.equal(yaml[0]!.digest.length, 32, 'only the sha256 digest is kept');
  const json = parseApiKeys(JSON.stringify({ keys: [{ key: KEY_A, tenant: 'acme' }] }), 'keys.json');
  assert.deepEqual(json[0]!.principal, { tenant: 'acme', role: 'user' });
});

test('keys file: each mistake named by file, entry and rule, never echoing a key', () => {
  const bad: [string, string | RegExp][] = [
    ['keys: [', /^f: not valid YAML or JSON/],
    ['[]', 'f: must be a mapping with a list "keys" of {key, tenant, role}'],
    ['keys: {}', 'f: must be a mapping with a list "keys" of {key, tenant, role}'],
    [`keys: []\nextra: 1`, 'f: unknown key "extra" (only "keys")'],
    ['keys: [3]', 'f keys[0]: must be a mapping {key, tenant, role}'],
    [`keys: [{ key: ${KEY_A}, tenant: acme, tennant: x }]`, 'f keys[0]: unknown field "tennant" (key, tenant, role)'],
    ['keys: [{ key: short, tenant: acme }]', 'f keys[0].key: must be a string of at least 16 characters'],
    ['keys: [{ key: 12345678901234567890, tenant: acme }]', 'f keys[0].key: must be a string of at least 16 characters'],
    [`keys: [{ key: "${KEY_A} x", tenant: acme }]`, 'f keys[0].key: must be printable ASCII without spaces (it travels in a header)'],
    [`keys: [{ key: ${KEY_A} }]`, 'f keys[0].tenant: must be 1-128 characters of letters, digits, ".", "_", "-" and not start with "."'],
    [`keys: [{ key: ${KEY_A}, tenant: "" }]`, 'f keys[0].tenant "": must be 1-128 characters of letters, digits, ".", "_", "-" and not start with "."'],
    [`keys: [{ key: ${KEY_A}, tenant: "../etc" }]`, /^f keys\[0\]\.tenant "\.\.\/etc": must be/],
    [`keys: [{ key: ${KEY_A}, tenant: "a~b" }]`, /^f keys\[0\]\.tenant "a~b": must be/],
    [`keys: [{ key: ${KEY_A}, tenant: acme, role: root }]`, 'f keys[0].role "root": must be user or admin'],
  ];
  for (const [text, message] of bad) assert.throws(() => parseApiKeys(text, 'f'), keysError(message), text);
});

test('keys file: a file, or a directory like a mounted Secret; empty and duplicate keys refused', () => {
  const d = dir('keys');
  const file = join(d, 'keys.yaml');
  writeFileSync(file, KEYS_YAML);
  assert.equal(readApiKeys(file).length, 3);

  // What kubelet mounts for a Secret with keys team-a.yaml and team-b.json: links into ..data.
  const secret = join(d, 'secret');
  const data = join(secret, '..2024_01_01_00_00_00.000000000');
  mkdirSync(data, { recursive: true });
  writeFileSync(join(data, 'team-a.yaml'), `keys:\n  - { key: ${KEY_A}, tenant: acme }\n`);
  writeFileSync(join(data, 'team-b.json'), JSON.stringify({ keys: [{ key: KEY_OPS, tenant: 'ops', role: 'admin' }] }));
  symlinkSync('..2024_01_01_00_00_00.000000000', join(secret, '..data'));
  symlinkSync('..data/team-a.yaml', join(secret, 'team-a.yaml'));
  symlinkSync('..data/team-b.json', join(secret, 'team-b.json'));
  const entries = readApiKeys(secret);
  assert.deepEqual(entries.map((e) => [e.principal.tenant, e.source]), [['acme', `${join(secret, 'team-a.yaml')}#0`], ['ops', `${join(secret, 'team-b.json')}#0`]]);

  const empty = join(d, 'empty.yaml');
  writeFileSync(empty, 'keys: []\n');
  assert.throws(() => readApiKeys(empty), keysError(`--api-keys-file ${empty}: holds no keys, so no one could call the server`));
  const dup = join(d, 'dup.yaml');
  writeFileSync(dup, `keys:\n  - { key: ${KEY_A}, tenant: acme }\n  - { key: ${KEY_A}, tenant: globex }\n`);
  assert.throws(() => readApiKeys(dup), keysError(`${dup}#1: the same key as ${dup}#0 (each key must be unique)`));
  assert.throws(() => readApiKeys(join(d, 'missing.yaml')), keysError(/^--api-keys-file \S+missing\.yaml: cannot read \(ENOENT\)$/));
});

test('bearer token: "Bearer <key>", case-insensitive scheme; anything else is no token', () => {
  assert.equal(bearerToken(md(`Bearer ${KEY_A}`)), KEY_A);
  assert.equal(bearerToken(md(`bearer   ${KEY_A}`)), KEY_A);
  assert.equal(bearerToken(md()), null);
  assert.equal(bearerToken(md('Basic dXNlcjpwYXNz')), null);
  assert.equal(bearerToken(md('Bearer')), null);
  assert.equal(bearerToken(md(KEY_A)), null);
});

test('key lookup compares sha256 digests in constant time against every entry, wherever the match is', (t) => {
  const entries = parseApiKeys(KEYS_YAML, 'k');
  const spy = mock.method(crypto, 'timingSafeEqual');
  syncBuiltinESMExports(); // auth.ts imported the named export: point it at the spy
  t.after(() => {
    spy.mock.restore();
    syncBuiltinESMExports();
  });
  for (const [key, want] of [[KEY_A, 'acme'], [KEY_OPS, 'ops'], ['not-a-key-at-all-000000', null]] as const) {
    spy.mock.resetCalls();
    assert.equal(findKey(entries, key)?.principal.tenant ?? null, want);
    assert.equal(spy.mock.callCount(), entries.length, `every entry compared for ${want}`);
    for (const call of spy.mock.calls) {
      assert.equal((call.arguments[0] as Buffer).length, 32);
      assert.equal((call.arguments[1] as Buffer).length, 32);
    }
  }
});

test('authenticator: UNAUTHENTICATED for a missing or wrong key, the principal for a right one', () => {
  const d = dir('auth');
  const file = join(d, 'keys.yaml');
  writeFileSync(file, KEYS_YAML);
  const auth = createAuthenticator({ auth: 'required', apiKeysFile: file });
  assert.equal(auth.enabled, true);
  assert.throws(() => auth.authenticate(md()), isError('UNAUTHENTICATED', MISSING_KEY_MESSAGE));
  assert.throws(() => auth.authenticate(md(`Basic ${KEY_A}`)), isError('UNAUTHENTICATED', MISSING_KEY_MESSAGE));
  assert.throws(() => auth.authenticate(md('Bearer wrong-key-0123456789')), isError('UNAUTHENTICATED', INVALID_KEY_MESSAGE));
  assert.throws(() => auth.authenticate(md(`Bearer ${KEY_A}x`)), isError('UNAUTHENTICATED', INVALID_KEY_MESSAGE));
  assert.deepEqual(auth.authenticate(md(`Bearer ${KEY_A}`)), { tenant: 'acme', role: 'user' });
  assert.deepEqual(auth.authenticate(md(`Bearer ${KEY_OPS}`)), { tenant: 'ops', role: 'admin' });

  // Reload: new keys take effect; a broken file keeps the old ones.
  writeFileSync(file, `keys:\n  - { key: ${KEY_B}, tenant: globex }\n`);
  assert.equal(auth.reload(), 1);
  assert.throws(() => auth.authenticate(md(`Bearer ${KEY_A}`)), isError('UNAUTHENTICATED', INVALID_KEY_MESSAGE));
  assert.deepEqual(auth.authenticate(md(`Bearer ${KEY_B}`)), { tenant: 'globex', role: 'user' });
  writeFileSync(file, 'keys: [{ key: short, tenant: x }]\n');
  assert.throws(() => auth.reload(), ApiKeysError);
  assert.deepEqual(auth.authenticate(md(`Bearer ${KEY_B}`)), { tenant: 'globex', role: 'user' });

  const open = createAuthenticator({ auth: 'disabled', apiKeysFile: null });
  assert.equal(open.enabled, false);
  assert.equal(open.authenticate(md()), LOCAL_PRINCIPAL);
  assert.deepEqual(LOCAL_PRINCIPAL, { tenant: '', role: 'admin' });
  assert.throws(() => createAuthenticator({ auth: 'required', apiKeysFile: null }), keysError('auth: required needs --api-keys-file (or set --auth disabled for local use)'));
});

// --- tenancy -----------------------------------------------------------------------------------------

const acme: Principal = { tenant: 'acme', role: 'user' };
const globex: Principal = { tenant: 'globex', role: 'user' };
const ops: Principal = { tenant: 'ops', role: 'admin' };

test('tenancy: ids are scoped into the caller namespace and unscoped only there', () => {
  assert.equal(scopeAdapterId(acme, 'style'), 'acme~style');
  assert.equal(scopeAdapterId(LOCAL_PRINCIPAL, 'style'), 'style');
  for (const bad of ['', '../x', 'a/b', 'a~b', '.hidden', 'x'.repeat(129)]) {
    assert.throws(() => scopeAdapterId(acme, bad), isError('INVALID_ARGUMENT', /^adapter_id/), bad);
  }
  const acmeStyle = scopeAdapterId(acme, 'style');
  const flatStyle = scopeAdapterId(LOCAL_PRINCIPAL, 'style');
  assert.equal(unscopeAdapterId(acme, acmeStyle), 'style');
  assert.equal(unscopeAdapterId(globex, acmeStyle), null);
  assert.equal(unscopeAdapterId(LOCAL_PRINCIPAL, acmeStyle), null);
  assert.equal(unscopeAdapterId(acme, flatStyle), null, 'the flat store is not any tenant');
  assert.equal(unscopeAdapterId(LOCAL_PRINCIPAL, flatStyle), 'style');
  assert.equal(visibleTo(acme, acmeStyle), true);
  assert.equal(visibleTo(globex, acmeStyle), false);
  assert.equal(visibleTo(ops, acmeStyle), false, 'admins act in their own namespace');
  // A tenant whose name is a prefix of another's sees nothing of it.
  assert.equal(visibleTo({ tenant: 'ac', role: 'user' }, acmeStyle), false);
  assert.deepEqual(parseAdapterKey(acmeStyle), { tenant: 'acme', id: 'style' });
  assert.deepEqual(parseAdapterKey(flatStyle), { tenant: '', id: 'style' });
  // Keys the server reads back (store directories, job records) are validated as they become keys.
  assert.equal(storedAdapterKey('acme', 'style'), acmeStyle);
  assert.equal(storedAdapterKey('', 'style'), flatStyle);
  assert.throws(() => storedAdapterKey('acme', 'a~b'), isError('INVALID_ARGUMENT'));
  assert.throws(() => key('~style'), isError('INVALID_ARGUMENT'));
  assert.throws(() => storedAdapterKey('../x', 'style'), isError('INVALID_ARGUMENT'));
  assert.equal(displayId(acmeStyle), 'style');
  assert.equal(tenantOf(acmeStyle), 'acme');
  assert.equal(tenantOf(flatStyle), '');

  const infos = [{ adapterKey: key('acme~a'), n: 1 }, { adapterKey: key('globex~a'), n: 2 }, { adapterKey: key('a'), n: 3 }, { adapterKey: key('acme~b'), n: 4 }];
  assert.deepEqual(visibleAdapters(acme, infos), [{ adapterId: 'a', n: 1 }, { adapterId: 'b', n: 4 }]);
  assert.deepEqual(visibleAdapters(LOCAL_PRINCIPAL, infos), [{ adapterId: 'a', n: 3 }]);
  assert.deepEqual(asSeenBy(globex, infos[1]!), { adapterId: 'a', n: 2 });
  assert.equal(asSeenBy(globex, infos[0]!), null);

  requireAdmin(ops, 'ExportMergedModel');
  requireAdmin(LOCAL_PRINCIPAL, 'ExportMergedModel');
  assert.throws(() => requireAdmin(acme, 'ExportMergedModel'), isError('PERMISSION_DENIED', 'ExportMergedModel: needs an admin API key'));
});

test('tenancy: keys map to <root>/<tenant>/<id> or <root>/<id>, never outside the root', () => {
  assert.equal(adapterKeyPath('/srv/adapters', key('acme~style')), '/srv/adapters/acme/style');
  assert.equal(adapterKeyPath('/srv/adapters', key('style')), '/srv/adapters/style');
  assert.equal(adapterKeyPath('/srv/adapters/', key('acme~v1.2')), '/srv/adapters/acme/v1.2');
  for (const bad of ['..', '../x', 'acme~..', 'acme~../x', '..~x', 'acme/x', '/etc~passwd', 'acme~x~y', '']) {
    // None of these can become a key...
    assert.throws(() => key(bad), isError('INVALID_ARGUMENT'), bad);
    // ...and, belt and braces, none that would climb out of the root or hide in a subdirectory gets a path.
    if (bad !== 'acme~x~y') assert.throws(() => adapterKeyPath('/srv/adapters', bad as AdapterKey), isError('INVALID_ARGUMENT'), bad);
  }
});

// --- store and manager with tenant keys --------------------------------------------------------------

let spec: ModelSpec;
let loraModules: LoraModuleInfo[];
before(() => {
  spec = makeModel({ arch: 'llama', size: 'tiny', outDir: dir('tenancy-model'), seed: 1 }).spec;
  loraModules = linearModules(spec).map(({ module, inFeatures, outFeatures }) => ({ module, inFeatures, outFeatures }));
});
const adapter = (seed: number): PeftAdapter => makeRandomAdapter(spec, { r: 4, alpha: 8, targetModules: ['q_proj', 'v_proj'], seed });
const limits = () => ({ maxLoraRank: 16, maxAdapterBytes: 64 << 20, loraModules });

test('store: nested tenant layout next to the flat one; list gives keys; messages show only the id', () => {
  const root = dir('tenancy-store');
  const store = new AdapterStore(root);
  store.write(key('acme~style'), adapter(1));
  store.write(key('globex~style'), adapter(2));
  store.write(key('flat'), adapter(3));
  assert.ok(existsSync(join(root, 'acme', 'style', 'adapter_config.json')));
  assert.ok(existsSync(join(root, 'globex', 'style', 'adapter_config.json')));
  assert.ok(existsSync(join(root, 'flat', 'adapter_config.json')));
  assert.deepEqual(store.list(), ['acme~style', 'flat', 'globex~style']);
  assert.equal(store.dir(key('acme~style')), join(root, 'acme', 'style'));
  assert.equal(store.has(key('acme~style')), true);
  assert.equal(store.has(key('acme~other')), false);
  assert.equal(store.has(key('ops~style')), false);
  assert.deepEqual(store.read(key('acme~style'), spec, limits()).modules[0]!.a, adapter(1).modules[0]!.a);
  assert.notDeepEqual(store.read(key('globex~style'), spec, limits()).modules[0]!.a, adapter(1).modules[0]!.a);

  // Another tenant's adapter reads exactly like a missing one.
  const missing = (text: string) => {
    try {
      store.read(key(text), spec, limits());
    } catch (e) {
      return (e as LoraplexError).code + ' ' + (e as Error).message;
    }
    return 'found';
  };
  assert.equal(missing('ops~style'), 'NOT_FOUND adapter_id "style" is not in the adapter store');
  assert.equal(missing('ops~style'), missing('acme~nothing').replace('nothing', 'style'));
  assert.throws(() => store.write(key('acme~style'), adapter(4)), isError('ALREADY_EXISTS', 'adapter_id "style" already exists in the adapter store'));
  store.write(key('acme~style'), adapter(4), { overwrite: true });
  assert.deepEqual(store.read(key('acme~style'), spec, limits()).modules[0]!.a, adapter(4).modules[0]!.a);
  assert.deepEqual(store.read(key('globex~style'), spec, limits()).modules[0]!.a, adapter(2).modules[0]!.a, 'the other tenant is untouched');

  // The flat layout can neither delete nor replace a tenant's namespace (a directory without a config).
  assert.throws(() => store.delete(key('acme')), isError('NOT_FOUND', 'adapter_id "acme" is not in the adapter store'));
  assert.throws(() => store.write(key('acme'), adapter(5), { overwrite: true }), isError('ALREADY_EXISTS'));
  assert.ok(existsSync(join(root, 'acme', 'style', 'adapter_config.json')));

  // A flat adapter named like a tenant is an adapter, not a namespace.
  assert.throws(() => store.write(key('flat~x'), adapter(6)), isError('FAILED_PRECONDITION', /^tenant "flat": the adapter root holds an un-namespaced adapter/));
  mkdirSync(join(root, 'flat', 'x'));
  writeFileSync(join(root, 'flat', 'x', 'adapter_config.json'), '{}');
  assert.equal(store.has(key('flat~x')), false);
  assert.deepEqual(store.list(), ['acme~style', 'flat', 'globex~style']);

  store.delete(key('acme~style'));
  assert.deepEqual(store.list(), ['flat', 'globex~style']);
  assert.throws(() => store.delete(key('acme~style')), isError('NOT_FOUND', 'adapter_id "style" is not in the adapter store'));
  // Scratch names (temp files, tombstones) never show up, in the root or in a namespace.
  mkdirSync(join(root, 'globex', '.tmp-x'));
  mkdirSync(join(root, '.tmp-acme~x-1'));
  assert.deepEqual(store.list(), ['flat', 'globex~style']);
});

test('manager: tenant keys through load, list, unload; NOT_FOUND the same for another tenant and for nothing', async () => {
  const root = dir('tenancy-manager');
  const store = new AdapterStore(root);
  store.write(key('acme~style'), adapter(1));
  store.write(key('globex~other'), adapter(2));
  const manager = new AdapterManager({
    store, spec, loraModules, maxLoras: 2, maxCpuLoras: 3, maxLoraRank: 16, maxAdapterBytes: 64 << 20,
    slotWriter: { setSlot: async () => undefined, clearSlot: async () => undefined },
  });
  const loaded = await manager.load(key('acme~style'));
  assert.equal(loaded.info.adapterKey, 'acme~style');
  assert.deepEqual((await manager.list()).map((i) => i.adapterKey), ['acme~style', 'globex~other']);
  assert.deepEqual(visibleAdapters(acme, (await manager.list())).map((i) => [i.adapterId, i.state]), [['style', 'loaded']]);
  assert.deepEqual(visibleAdapters(globex, (await manager.list())).map((i) => i.adapterId), ['other']);

  const message = async (p: Promise<unknown>) => p.then(() => 'ok', (e: LoraplexError) => `${e.code} ${e.message}`);
  const theirs = await message(manager.load(scopeAdapterId(globex, 'style')));
  const nothing = await message(manager.load(scopeAdapterId(globex, 'nothing')));
  assert.equal(theirs, 'NOT_FOUND adapter_id "style" is not in the adapter store');
  assert.equal(nothing, 'NOT_FOUND adapter_id "nothing" is not in the adapter store');
  assert.equal(await message(manager.unload(scopeAdapterId(globex, 'style'), { deleteFromStore: true })), theirs);
  assert.equal(await message(manager.tryAcquire(scopeAdapterId(globex, 'style'))), theirs);
  assert.ok(store.has(key('acme~style')), 'still there');
  const lease = await manager.tryAcquire(key('acme~style'));
  assert.ok(lease && lease.slot >= 1);
  lease.release();
  const unloaded = await manager.unload(key('acme~style'), { deleteFromStore: true });
  assert.equal(unloaded.adapterKey, 'acme~style');
  assert.equal(store.has(key('acme~style')), false);
  assert.deepEqual((await manager.list()).map((i) => i.adapterKey), ['globex~other']);
});

// --- bridge hooks ------------------------------------------------------------------------------------

/** An InferenceService whose tokenize echoes the principal and whose generate streams until told to stop. */
function fakeInference(seen: CallContext[]): ServiceImpl<(typeof InferenceService)['method']> {
  const impl: Record<string, unknown> = {};
  for (const m of (InferenceService as unknown as DescService).methods as DescMethod[]) {
    impl[m.localName] = m.methodKind === 'unary' ? () => ({}) : async function* () {};
  }
  impl['tokenize'] = (req: { prompt: { case: string; value: unknown } }, ctx: CallContext) => {
    seen.push(ctx);
    if (req.prompt.value === 'bad') throw new LoraplexError('INVALID_ARGUMENT', 'prompt: bad');
    if (req.prompt.value === 'leak') throw new LoraplexError('INVALID_ARGUMENT', `merge of adapter_id "${ctx.principal.tenant}~secret-a": bad`);
    return { tokenIds: [1], rendered: `${ctx.principal.tenant}/${ctx.principal.role}` };
  };
  impl['generate'] = async function* (req: { adapterId: string }, ctx: CallContext) {
    seen.push(ctx);
    if (req.adapterId === 'missing') throw new LoraplexError('NOT_FOUND', 'adapter_id "missing" is not in the adapter store');
    for (let i = 0; i < (req.adapterId === 'endless' ? Infinity : 2); i++) {
      yield { event: { case: 'delta', value: { text: 'x' } } };
      await new Promise((r) => setTimeout(r, 5));
    }
  };
  return impl as ServiceImpl<(typeof InferenceService)['method']>;
}

test('bridge: authenticate runs before every handler and puts the principal on the context; the observer sees each call end once', async () => {
  const server = new grpc.Server();
  const seen: CallContext[] = [];
  const ends: CallEndInfo[] = [];
  const waiters: (() => void)[] = [];
  const observer = {
    onCallEnd(info: CallEndInfo) {
      ends.push(info);
      waiters.splice(0).forEach((w) => w());
    },
  };
  const authenticate = (m: grpc.Metadata): Principal => {
    const v = m.get('authorization')[0];
    if (v === undefined) throw new LoraplexError('UNAUTHENTICATED', MISSING_KEY_MESSAGE);
    if (v !== 'Bearer good-key') throw new LoraplexError('UNAUTHENTICATED', INVALID_KEY_MESSAGE);
    return acme;
  };
  addService(server, InferenceService, fakeInference(seen), { authenticate, observer });
  const port = await new Promise<number>((resolve, reject) => server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (e, p) => (e ? reject(e) : resolve(p))));
  const client = makeClient(InferenceService, `127.0.0.1:${port}`);
  const auth = (key?: string) => ({ metadata: md(key === undefined ? undefined : `Bearer ${key}`) });
  const nextEnd = async (n: number) => {
    while (ends.length < n) await new Promise<void>((r) => waiters.push(r));
    return ends[n - 1]!;
  };
  const code = (e: unknown) => (e as grpc.ServiceError).code;
  try {
    // Unary OK, with the principal on the context.
    const r = await client.tokenize({ prompt: { case: 'text', value: 'hi' } }, auth('good-key'));
    assert.equal(r.rendered, 'acme/user');
    let end = await nextEnd(1);
    assert.equal(end.method, '/loraplex.v1.InferenceService/Tokenize');
    assert.equal(end.code, grpc.status.OK);
    assert.equal(end.ctx?.principal, acme);
    assert.ok(end.seconds >= 0 && end.seconds < 5);
    assert.equal(end.error, undefined);

    // No key / wrong key: UNAUTHENTICATED, the handler never runs, the observer sees it without a context.
    const before = seen.length;
    await assert.rejects(client.tokenize({ prompt: { case: 'text', value: 'hi' } }), (e) => code(e) === grpc.status.UNAUTHENTICATED && (e as grpc.ServiceError).details === MISSING_KEY_MESSAGE);
    end = await nextEnd(2);
    assert.deepEqual([end.code, end.ctx], [grpc.status.UNAUTHENTICATED, null]);
    await assert.rejects(
      (async () => {
        for await (const _ of client.generate({ prompt: { case: 'text', value: 'hi' } }, auth('bad-key')));
      })(),
      (e) => code(e) === grpc.status.UNAUTHENTICATED && (e as grpc.ServiceError).details === INVALID_KEY_MESSAGE,
    );
    end = await nextEnd(3);
    assert.deepEqual([end.method, end.code, end.ctx], ['/loraplex.v1.InferenceService/Generate', grpc.status.UNAUTHENTICATED, null]);
    assert.equal(seen.length, before, 'no handler ran');

    // Unary error: its status, and the error for the log.
    await assert.rejects(client.tokenize({ prompt: { case: 'text', value: 'bad' } }, auth('good-key')), (e) => code(e) === grpc.status.INVALID_ARGUMENT);
    end = await nextEnd(4);
    assert.equal(end.code, grpc.status.INVALID_ARGUMENT);
    assert.ok(end.error instanceof LoraplexError);

    // Streaming: OK, NOT_FOUND, and CANCELLED when the client leaves early.
    let n = 0;
    for await (const _ of client.generate({ prompt: { case: 'text', value: 'hi' } }, auth('good-key'))) n++;
    assert.equal(n, 2);
    end = await nextEnd(5);
    assert.deepEqual([end.method, end.code], ['/loraplex.v1.InferenceService/Generate', grpc.status.OK]);
    assert.equal(end.ctx?.principal, acme);
    await assert.rejects(
      (async () => {
        for await (const _ of client.generate({ prompt: { case: 'text', value: 'hi' }, adapterId: 'missing' }, auth('good-key')));
      })(),
      (e) => code(e) === grpc.status.NOT_FOUND,
    );
    assert.equal((await nextEnd(6)).code, grpc.status.NOT_FOUND);
    for await (const _ of client.generate({ prompt: { case: 'text', value: 'hi' }, adapterId: 'endless' }, auth('good-key'))) break;
    assert.equal((await nextEnd(7)).code, grpc.status.CANCELLED);
    // Deadline passing mid-stream.
    await assert.rejects(
      (async () => {
        for await (const _ of client.generate({ prompt: { case: 'text', value: 'hi' }, adapterId: 'endless' }, { ...auth('good-key'), timeoutMs: 50 }));
      })(),
      (e) => code(e) === grpc.status.DEADLINE_EXCEEDED,
    );
    assert.equal((await nextEnd(8)).code, grpc.status.DEADLINE_EXCEEDED);
    await new Promise((r) => setTimeout(r, 50));
    assert.equal(ends.length, 8, 'exactly one report per call');
  } finally {
    client.close();
    server.forceShutdown();
  }
});

test('bridge: malformed protobuf and invalid UTF-8 get INVALID_ARGUMENT naming the field, after authentication, and reach the observer', async () => {
  const server = new grpc.Server();
  const seen: CallContext[] = [];
  const ends: CallEndInfo[] = [];
  const authenticate = (m: grpc.Metadata): Principal => {
    if (m.get('authorization')[0] !== 'Bearer good-key') throw new LoraplexError('UNAUTHENTICATED', MISSING_KEY_MESSAGE);
    return acme;
  };
  addService(server, InferenceService, fakeInference(seen), { authenticate, observer: { onCallEnd: (info) => ends.push(info) } });
  const port = await new Promise<number>((resolve, reject) => server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (e, p) => (e ? reject(e) : resolve(p))));
  // A client that sends raw bytes, as a buggy or hostile client in any language can.
  const raw = new grpc.Client(`127.0.0.1:${port}`, grpc.credentials.createInsecure());
  const send = (path: string, bytes: number[], key?: string) =>
    new Promise<grpc.ServiceError | null>((resolve) =>
      raw.makeUnaryRequest(path, (b: Buffer) => b, (b: Buffer) => b, Buffer.from(bytes), md(key === undefined ? undefined : `Bearer ${key}`), (err) => resolve(err)),
    );
  const stream = (path: string, bytes: number[], key?: string) =>
    new Promise<grpc.ServiceError>((resolve) => {
      const call = raw.makeServerStreamRequest(path, (b: Buffer) => b, (b: Buffer) => b, Buffer.from(bytes), md(key === undefined ? undefined : `Bearer ${key}`));
      call.on('data', () => undefined);
      call.on('error', resolve);
    });
  const tokenize = '/loraplex.v1.InferenceService/Tokenize';
  const generate = '/loraplex.v1.InferenceService/Generate';
  // TokenizeRequest.chat (field 2) with two messages; the second's content (field 2) is the byte 0xff.
  const badUtf8 = [0x12, 0x0a, 0x0a, 0x03, 0x0a, 0x01, 0x75, 0x0a, 0x03, 0x12, 0x01, 0xff];
  // GenerateRequest.text (field 1) with invalid UTF-8; then a length prefix running past the end.
  const badGenerate = [0x0a, 0x02, 0xff, 0xfe];
  const truncated = [0x0a, 0x85];
  try {
    let err = await send(tokenize, badUtf8, 'good-key');
    assert.equal(err?.code, grpc.status.INVALID_ARGUMENT);
    assert.equal(err?.details, 'request: chat.messages[1].content: not valid UTF-8');
    err = await stream(generate, badGenerate, 'good-key');
    assert.equal(err.code, grpc.status.INVALID_ARGUMENT);
    assert.equal(err.details, 'request: text: not valid UTF-8');
    err = await stream(generate, truncated, 'good-key');
    assert.equal(err.code, grpc.status.INVALID_ARGUMENT);
    assert.match(err.details, /^request: not a valid loraplex\.v1\.GenerateRequest message/);
    // A message that names an internal `tenant~id` key reaches the client with the client's own id.
    const client = makeClient(InferenceService, `127.0.0.1:${port}`);
    await assert.rejects(client.tokenize({ prompt: { case: 'text', value: 'leak' } }, { metadata: md('Bearer good-key') }), (e: grpc.ServiceError) => e.details === 'merge of adapter_id "secret-a": bad');
    client.close();
    seen.length = 0;
    ends.pop();
    // Without a key the caller learns nothing about its bytes.
    err = await send(tokenize, badUtf8);
    assert.equal(err?.code, grpc.status.UNAUTHENTICATED);
    assert.equal(seen.length, 0, 'no handler ran');
    assert.deepEqual(
      ends.map((e) => [e.method, e.code, e.ctx?.principal ?? null]),
      [
        [tokenize, grpc.status.INVALID_ARGUMENT, acme],
        [generate, grpc.status.INVALID_ARGUMENT, acme],
        [generate, grpc.status.INVALID_ARGUMENT, acme],
        [tokenize, grpc.status.UNAUTHENTICATED, null],
      ],
    );
  } finally {
    raw.close();
    server.forceShutdown();
  }
});

test('bridge: without authenticate every call is LOCAL_PRINCIPAL; a throwing observer never fails a call', async () => {
  const server = new grpc.Server();
  const errors: unknown[] = [];
  addService(server, InferenceService, fakeInference([]), {
    onError: (err) => errors.push(err),
    observer: {
      onCallEnd() {
        throw new Error('metrics broke');
      },
    },
  });
  const port = await new Promise<number>((resolve, reject) => server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (e, p) => (e ? reject(e) : resolve(p))));
  const client = makeClient(InferenceService, `127.0.0.1:${port}`);
  try {
    const r = await client.tokenize({ prompt: { case: 'text', value: 'hi' } });
    assert.equal(r.rendered, '/admin');
    assert.equal(errors.length, 1);
    assert.match(String(errors[0]), /metrics broke/);
  } finally {
    client.close();
    server.forceShutdown();
  }
});
