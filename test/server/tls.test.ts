import assert from 'node:assert/strict';
import { before, test } from 'node:test';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { makeClient } from '../../src/rpc/bridge.js';
import { serverCredentials, TlsConfigError } from '../../src/rpc/tls.js';
import { InferenceService } from '../../src/gen/loraplex/v1/inference_pb.js';
import { collect, startTestServer } from '../helpers/server.js';
import { makeTestPki, type TestPki } from '../helpers/tls.js';

let pki: TestPki;
before(() => {
  pki = makeTestPki();
});

const text = (value: string) => ({ case: 'text' as const, value });

function statusOf(e: unknown): grpc.status {
  return (e as grpc.ServiceError).code;
}

/** A call that must fail to connect: UNAVAILABLE, quickly (never a hang). */
async function refused(address: string, credentials: grpc.ChannelCredentials): Promise<void> {
  const client = makeClient(InferenceService, address, { credentials });
  try {
    await assert.rejects(client.getModelInfo({}, { timeoutMs: 10_000 }), (e) => {
      assert.equal(statusOf(e), grpc.status.UNAVAILABLE, `${grpc.status[statusOf(e)]}: ${(e as grpc.ServiceError).details}`);
      return true;
    });
  } finally {
    client.close();
  }
}

test('serverCredentials: plaintext without a certificate; unusable files fail naming the flag', () => {
  assert.equal(serverCredentials({ tlsCert: null, tlsKey: null, tlsClientCa: null })._isSecure(), false);
  assert.equal(serverCredentials({ tlsCert: pki.serverCert, tlsKey: pki.serverKey, tlsClientCa: null })._isSecure(), true);
  assert.throws(() => serverCredentials({ tlsCert: pki.serverCert, tlsKey: pki.clientKey, tlsClientCa: null }), (e) => e instanceof TlsConfigError && /^--tls-key does not match --tls-cert/.test(e.message));
  assert.throws(() => serverCredentials({ tlsCert: join(pki.dir, 'nope.crt'), tlsKey: pki.serverKey, tlsClientCa: null }), (e) => e instanceof TlsConfigError && /^--tls-cert \S+nope\.crt: cannot read \(ENOENT\)$/.test(e.message));
  const garbage = join(pki.dir, 'garbage.pem');
  writeFileSync(garbage, 'not a certificate\n');
  assert.throws(() => serverCredentials({ tlsCert: garbage, tlsKey: pki.serverKey, tlsClientCa: null }), (e) => e instanceof TlsConfigError && /^--tls-cert \/ --tls-key: not usable PEM/.test(e.message));
  assert.throws(() => serverCredentials({ tlsCert: pki.serverCert, tlsKey: null, tlsClientCa: null }), TlsConfigError);
});

test('TLS: a client trusting the CA can Generate and GetModelInfo; a plaintext client is refused', async (t) => {
  const s = await startTestServer({ tlsCert: pki.serverCert, tlsKey: pki.serverKey }, undefined, {
    credentials: grpc.credentials.createSsl(pki.read(pki.caCert)),
  });
  t.after(() => s.close());
  const info = await s.inference.getModelInfo({});
  assert.equal(info.model?.modelType, 'llama');
  const r = await collect(s.inference.generate({ prompt: text('Once upon a time'), sampling: { temperature: 0, maxNewTokens: 4 } }));
  assert.equal(r.tokenIds.length, 4);
  assert.equal(r.finished?.generatedTokens, 4);
  // The same server by name (SAN DNS:localhost).
  const byName = makeClient(InferenceService, `localhost:${s.server.port}`, { credentials: grpc.credentials.createSsl(pki.read(pki.caCert)) });
  try {
    assert.equal((await byName.getModelInfo({})).model?.modelType, 'llama');
  } finally {
    byName.close();
  }
  await refused(s.address, grpc.credentials.createInsecure());
  // A client that does not trust the server's CA.
  await refused(s.address, grpc.credentials.createSsl(pki.read(pki.otherCaCert)));
});

test('mTLS: a client without a certificate is refused, one with the CA-signed client certificate is served', async (t) => {
  const s = await startTestServer({ tlsCert: pki.serverCert, tlsKey: pki.serverKey, tlsClientCa: pki.caCert }, undefined, {
    credentials: grpc.credentials.createSsl(pki.read(pki.caCert), pki.read(pki.clientKey), pki.read(pki.clientCert)),
  });
  t.after(() => s.close());
  const info = await s.inference.getModelInfo({});
  assert.equal(info.model?.modelType, 'llama');
  const r = await collect(s.inference.generate({ prompt: text('Once upon a time'), sampling: { temperature: 0, maxNewTokens: 3 } }));
  assert.equal(r.finished?.generatedTokens, 3);
  await refused(s.address, grpc.credentials.createSsl(pki.read(pki.caCert)));
  // The server's own certificate is not a client certificate (extendedKeyUsage serverAuth only).
  await refused(s.address, grpc.credentials.createSsl(pki.read(pki.caCert), pki.read(pki.serverKey), pki.read(pki.serverCert)));
  await refused(s.address, grpc.credentials.createInsecure());
});
