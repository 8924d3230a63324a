import assert from 'node:assert/strict';
import { test } from 'node:test';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ConfigError, parseConfig, resolveConfig, serveUsage, settingsMarkdown, type ParseConfigInput } from '../../src/config/parse.js';
import { SETTINGS } from '../../src/config/schema.js';
import { BUILTIN_MODEL_DIR } from '../../src/models/builtin.js';
import { UsageError } from '../../src/config/usage-error.js';
import { tempDir } from '../helpers/engine.js';

const CLI = new URL('../../src/cli/main.js', import.meta.url).pathname;
const CWD = '/srv/loraplex';
const keysFile = join(tempDir('config-keys'), 'keys.yaml');
writeFileSync(keysFile, 'keys: []\n');

/** parseConfig with a fixed cwd, an empty environment and auth disabled unless the case says otherwise. */
function parse(argv: string[], more: Partial<ParseConfigInput> = {}) {
  return parseConfig({ argv, env: {}, cwd: CWD, ...more });
}
const local = (...argv: string[]) => parse(['--auth', 'disabled', ...argv]);

function fails(fn: () => unknown, ...messages: (string | RegExp)[]) {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof ConfigError, `not a ConfigError: ${String(e)}`);
    assert.ok(e instanceof UsageError, 'ConfigError must be a UsageError (exit 2, no stack)');
    for (const m of messages) {
      if (typeof m === 'string') assert.ok(e.problems.includes(m), `no problem ${JSON.stringify(m)} in ${JSON.stringify(e.problems)}`);
      else assert.ok(e.problems.some((p) => m.test(p)), `no problem matching ${m} in ${JSON.stringify(e.problems)}`);
    }
    return true;
  });
}

test('the schema: camelCase names, derived flags and env names, every setting described', () => {
  const names = new Set<string>();
  for (const s of SETTINGS) {
    assert.match(s.name, /^[a-z][a-zA-Z]*$/);
    assert.equal(s.flag, `--${s.name.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)}`);
    assert.equal(s.env, `LORAPLEX_${s.name.replace(/[A-Z]/g, (c) => `_${c}`).toUpperCase()}`);
    assert.ok(s.description.length > 5, s.name);
    assert.ok(!names.has(s.name), `duplicate ${s.name}`);
    names.add(s.name);
  }
  for (const kept of ['model', 'host', 'port', 'adapterRoot', 'quant', 'blockSize', 'accuracyLevel', 'asymmetric', 'threads', 'cacheDir', 'maxModelLen', 'maxNumSeqs', 'maxLoras', 'maxCpuLoras', 'maxLoraRank', 'maxWaiting', 'maxAdapterBytes', 'maxNewTokensDefault', 'prefillChunk', 'allowSpinning', 'drainSeconds', 'logLevel', 'metricsPort', 'logPrompts', 'auth', 'apiKeysFile', 'tlsCert', 'tlsKey', 'tlsClientCa', 'exportRoot', 'maxTenantLabels']) {
    assert.ok(names.has(kept), `missing setting ${kept}`);
  }
});

test('defaults: the documented values, relative paths resolved against cwd, the built-in model', () => {
  const cfg = parse(['--auth', 'disabled'], { env: { XDG_CACHE_HOME: '/tmp/xdg' } });
  assert.equal(cfg.host, '0.0.0.0');
  assert.equal(cfg.port, 50051);
  assert.equal(cfg.adapterRoot, '/srv/loraplex/adapters');
  assert.equal(cfg.exportRoot, '/srv/loraplex/exports');
  assert.equal(cfg.cacheDir, '/tmp/xdg/loraplex');
  assert.equal(cfg.modelDir, BUILTIN_MODEL_DIR);
  assert.ok(existsSync(join(cfg.modelDir, 'model.safetensors')), 'the built-in model ships with the project');
  assert.equal(cfg.source, BUILTIN_MODEL_DIR);
  assert.equal(cfg.servedModelName, 'stories260K');
  assert.equal(cfg.httpPort, 8080);
  assert.deepEqual(cfg.quant, { kind: 'int4', blockSize: 32, accuracyLevel: 4, symmetric: true, lmHead: 'int8' });
  assert.equal(cfg.maxModelLen, null);
  assert.equal(cfg.maxNumSeqs, 16);
  assert.equal(cfg.maxLoras, 4);
  assert.equal(cfg.maxCpuLoras, 16);
  assert.equal(cfg.maxLoraRank, 16);
  assert.equal(cfg.maxWaiting, 256);
  assert.equal(cfg.maxAdapterBytes, 512 * 1024 * 1024);
  assert.equal(cfg.maxNewTokensDefault, 256);
  assert.equal(cfg.prefillChunk, 64);
  assert.equal(cfg.allowSpinning, false);
  assert.equal(cfg.drainSeconds, 30);
  assert.equal(cfg.logLevel, 'info');
  assert.equal(cfg.logPrompts, false);
  assert.equal(cfg.metricsPort, 9090);
  assert.equal(cfg.maxTenantLabels, 0);
  assert.equal(cfg.auth, 'disabled');
  assert.equal(cfg.apiKeysFile, null);
  assert.equal(cfg.tlsCert, null);
  assert.ok(cfg.threads >= 1 && cfg.threads <= 2);
  // Every ServerConfig field is set (nothing undefined slips through).
  for (const [k, v] of Object.entries(cfg)) assert.notEqual(v, undefined, k);
});

test('flags: --name value, --name=value, bare booleans, =false, the last repeat wins', () => {
  const cfg = local('--model', 'models/m', '--port=7000', '--asymmetric', '--log-prompts=false', '--allow-spinning=true', '--max-loras', '2', '--max-loras', '3', '--drain-seconds', '0.5', '--quant', 'int8', '--block-size', '128', '--accuracy-level', '0', '--lm-head-quant', 'none');
  assert.equal(cfg.modelDir, '/srv/loraplex/models/m');
  assert.equal(cfg.source, '/srv/loraplex/models/m');
  assert.equal(cfg.port, 7000);
  assert.equal(cfg.logPrompts, false);
  assert.equal(cfg.allowSpinning, true);
  assert.equal(cfg.maxLoras, 3);
  assert.equal(cfg.drainSeconds, 0.5);
  assert.deepEqual(cfg.quant, { kind: 'int8', blockSize: 128, accuracyLevel: 0, symmetric: false, lmHead: 'none' });
  assert.deepEqual(local('--quant', 'nf4').quant, { kind: 'nf4', blockSize: 64, lmHead: 'int8' });
  assert.deepEqual(local('--quant', 'none').quant, { kind: 'none' });
  assert.deepEqual(local('--quant', 'none').quant, { kind: 'none' });
});

test('precedence: defaults < config file < env < flags', () => {
  const files: Record<string, string> = { '/etc/loraplex/serve.yaml': 'port: 1001\nmaxLoras: 2\nmaxWaiting: 7\nauth: disabled\nadapterRoot: data/adapters\n' };
  const fileReader = (p: string) => {
    const text = files[p];
    if (text === undefined) throw Object.assign(new Error('no such file'), { code: 'ENOENT' });
    return text;
  };
  const env = { LORAPLEX_CONFIG: '/etc/loraplex/serve.yaml', LORAPLEX_PORT: '1002', LORAPLEX_MAX_LORAS: '3' };
  const r = resolveConfig({ argv: ['--port', '1003'], env, cwd: CWD, fileReader });
  assert.equal(r.configFile, '/etc/loraplex/serve.yaml');
  assert.equal(r.config.port, 1003);
  assert.equal(r.settings.get('port')!.source, 'flag');
  assert.equal(r.config.maxLoras, 3);
  assert.equal(r.settings.get('maxLoras')!.source, 'env');
  assert.equal(r.config.maxWaiting, 7);
  assert.equal(r.settings.get('maxWaiting')!.source, 'file');
  assert.equal(r.config.maxNumSeqs, 16);
  assert.equal(r.settings.get('maxNumSeqs')!.source, 'default');
  // Paths in a config file are relative to the file.
  assert.equal(r.config.adapterRoot, '/etc/loraplex/data/adapters');
  // --config beats LORAPLEX_CONFIG; JSON works as well as YAML.
  files['/srv/loraplex/c.json'] = JSON.stringify({ auth: 'disabled', maxNumSeqs: 4, logPrompts: true });
  const j = parseConfig({ argv: ['--config', 'c.json'], env, cwd: CWD, fileReader });
  assert.equal(j.maxNumSeqs, 4);
  assert.equal(j.logPrompts, true);
  assert.equal(j.maxWaiting, 256);
  // Empty environment variables count as unset.
  assert.equal(parse(['--auth', 'disabled'], { env: { LORAPLEX_PORT: '' } }).port, 50051);
});

test('one ConfigError naming the setting, its source and the rule; every problem at once', () => {
  fails(() => local('--max-loras', '0'), '--max-loras 0 (flag): must be an integer in [1, 256]');
  fails(() => parse(['--auth', 'disabled'], { env: { LORAPLEX_MAX_LORAS: '1.5' } }), 'LORAPLEX_MAX_LORAS=1.5 (env): must be an integer in [1, 256]');
  fails(() => local('--port', '70000', '--drain-seconds', 'soon', '--quant', 'int3', '--block-size', '48', '--asymmetric=maybe', '--host', ''),
    '--port 70000 (flag): must be an integer in [0, 65535]',
    '--drain-seconds soon (flag): must be a number in [0, 3600]',
    '--quant int3 (flag): must be one of none, int4, nf4, int8',
    '--block-size 48 (flag): must be one of 16, 32, 64, 128, 256',
    '--asymmetric maybe (flag): must be true or false',
    '--host "" (flag): must be a non-empty string',
  );
  fails(() => local('--api-keys-file', '/nonexistent/keys.yaml'), '--api-keys-file /nonexistent/keys.yaml (flag): must be an existing file or directory (not found or not readable)');
  fails(() => local('--tls-cert', tempDir('cert-dir')), /^--tls-cert \S+ \(flag\): must be an existing file \(it is a directory\)$/);
  fails(() => local('--port'), '--port (flag): needs a value (an integer in [0, 65535])');
  // Kubernetes service links put LORAPLEX_PORT=tcp://... into pods of a Service named loraplex.
  fails(() => parse(['--auth', 'disabled'], { env: { LORAPLEX_PORT: 'tcp://10.0.0.1:50051' } }), /^LORAPLEX_PORT=tcp:\/\/10\.0\.0\.1:50051 \(env\): must be an integer in \[0, 65535\] \(this looks like a Kubernetes service-link variable/);
  // ... and a flag overrides it (only the winning source is checked).
  assert.equal(parse(['--auth', 'disabled', '--port', '50051'], { env: { LORAPLEX_PORT: 'tcp://10.0.0.1:50051' } }).port, 50051);
});

test('unknown flags, stray arguments and unknown file keys are errors, with a suggestion', () => {
  fails(() => local('--max-lora', '3'), 'unknown flag --max-lora (did you mean --max-loras?); see loraplex serve --help');
  fails(() => local('--frobnicate'), 'unknown flag --frobnicate; see loraplex serve --help');
  fails(() => local('serve'), 'unexpected argument serve: settings are flags (--name value); see loraplex serve --help');
  const fileReader = () => 'auth: disabled\nmax-loras: 2\nmaxLora: 3\nbogus: 1\n';
  fails(() => parse(['--config', '/c.yaml'], { fileReader }),
    'config file /c.yaml: unknown key "max-loras" (did you mean maxLoras?)',
    'config file /c.yaml: unknown key "maxLora" (did you mean maxLoras?)',
    'config file /c.yaml: unknown key "bogus"',
  );
  fails(() => parse(['--config', '/c.yaml'], { fileReader: () => 'maxLoras: 0\nauth: disabled\n' }), 'maxLoras 0 (config file /c.yaml): must be an integer in [1, 256]');
  fails(() => parse(['--config', '/c.yaml'], { fileReader: () => '- a\n- b\n' }), 'config file /c.yaml: must be a mapping of setting names (camelCase) to values');
  fails(() => parse(['--config', '/c.yaml'], { fileReader: () => 'port: [1\n' }), /^config file \/c\.yaml: not valid YAML or JSON/);
  fails(() => parse([], { env: { LORAPLEX_CONFIG: '/nope.yaml' }, fileReader: () => { throw Object.assign(new Error('x'), { code: 'ENOENT' }); } }), 'LORAPLEX_CONFIG=/nope.yaml (env): cannot read the config file (ENOENT)');
});

test('cross-field rules', () => {
  fails(() => parse([]), 'auth: required needs --api-keys-file (or set --auth disabled for local use)');
  assert.equal(parse(['--api-keys-file', keysFile]).auth, 'required');
  fails(() => local('--max-cpu-loras', '2', '--max-loras', '4'), '--max-cpu-loras 2 (flag): must be >= maxLoras, here --max-loras 4 (flag) (an adapter in a slot stays in memory)');
  fails(() => local('--max-cpu-loras', '2'), '--max-cpu-loras 2 (flag): must be >= maxLoras, here maxLoras 4 (default) (an adapter in a slot stays in memory)');
  fails(() => local('--tls-cert', keysFile), `--tls-cert ${keysFile} (flag): needs --tls-key too (give both or neither)`);
  fails(() => local('--tls-key', keysFile), `--tls-key ${keysFile} (flag): needs --tls-cert too (give both or neither)`);
  fails(() => local('--tls-client-ca', keysFile), `--tls-client-ca ${keysFile} (flag): mTLS needs --tls-cert and --tls-key (the server's own certificate)`);
  const tls = local('--tls-cert', keysFile, '--tls-key', keysFile, '--tls-client-ca', keysFile);
  assert.deepEqual([tls.tlsCert, tls.tlsKey, tls.tlsClientCa], [keysFile, keysFile, keysFile]);
  fails(() => local('--metrics-port', '50051'), '--metrics-port 50051 (flag): must differ from port, here port 50051 (default)');
  fails(() => local('--http-port', '9090'), '--http-port 9090 (flag): must differ from port and metricsPort, here port 50051 (default) and metricsPort 9090 (default)');
  assert.equal(local('--metrics-port', '0', '--port', '0').metricsPort, 0);
  fails(() => local('--quant', 'none', '--block-size', '64'), '--block-size 64 (flag): only applies to quantized weights, and --quant none (flag)');
  fails(() => local('--quant', 'none', '--lm-head-quant', 'int8'), '--lm-head-quant int8 (flag): only applies to quantized weights, and --quant none (flag)');
  fails(() => local('--lm-head-quant', 'int2'), '--lm-head-quant int2 (flag): must be one of none, int8, int4');
  fails(() => local('--quant', 'nf4', '--accuracy-level', '4'), '--accuracy-level 4 (flag): only applies to int4 and int8, and --quant nf4 (flag)');
});

test('--help: every setting with its flag, env and default; the README table from the same schema', () => {
  const usage = serveUsage();
  for (const s of SETTINGS) {
    assert.ok(usage.includes(s.flag), s.flag);
    assert.ok(usage.includes(s.env), s.env);
    assert.ok(usage.includes(s.description), s.name);
  }
  assert.match(usage, /^maxLoras\s+--max-loras N\s+LORAPLEX_MAX_LORAS\s+4$/m);
  assert.match(usage, /^auth\s+--auth required\|disabled\s+LORAPLEX_AUTH\s+required$/m);
  const md = settingsMarkdown();
  assert.equal(md.trim().split('\n').length, SETTINGS.length + 2);
});

test('loraplex serve: --help exits 0; an invalid setting exits 2 with one message and no stack', () => {
  const help = spawnSync(process.execPath, [CLI, 'serve', '--help'], { encoding: 'utf8' });
  assert.equal(help.status, 0, help.stderr);
  assert.match(help.stdout, /^Usage: loraplex serve/);
  assert.ok(help.stdout.includes('--max-tenant-labels'));
  const bad = spawnSync(process.execPath, [CLI, 'serve', '--auth', 'disabled', '--max-loras', '0'], { encoding: 'utf8' });
  assert.equal(bad.status, 2);
  assert.equal(bad.stderr, 'loraplex: --max-loras 0 (flag): must be an integer in [1, 256]\n');
  const noKeys = spawnSync(process.execPath, [CLI, 'serve'], { encoding: 'utf8', env: { ...process.env, LORAPLEX_AUTH: '', LORAPLEX_API_KEYS_FILE: '' } });
  assert.equal(noKeys.status, 2);
  assert.equal(noKeys.stderr, 'loraplex: auth: required needs --api-keys-file (or set --auth disabled for local use)\n');
});

test('loraplex serve: a keys file that cannot be used exits 2 naming the entry (before loading any model)', () => {
  const dir = tempDir('config-badkeys');
  mkdirSync(dir, { recursive: true });
  const bad = join(dir, 'keys.json');
  writeFileSync(bad, JSON.stringify({ keys: [{ key: 'short', tenant: 'acme' }] }));
  const r = spawnSync(process.execPath, [CLI, 'serve', '--api-keys-file', bad, '--port', '0', '--metrics-port', '0', '--model', '/nonexistent-model'], { encoding: 'utf8' });
  assert.equal(r.status, 2, r.stderr);
  assert.equal(r.stderr, `loraplex: ${bad} keys[0].key: must be a string of at least 16 characters\n`);
});
