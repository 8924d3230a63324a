/**
 * Server credentials: plaintext without a certificate; TLS with --tls-cert/--tls-key; mutual TLS (client
 * certificates required and verified against --tls-client-ca) when that is set too. The files are read and
 * checked once at start, so a wrong path or a key that does not match its certificate fails with a message
 * naming the flag, not at the first handshake. Rotating certificates needs a restart.
 */
import { readFileSync } from 'node:fs';
import { createSecureContext } from 'node:tls';
import * as grpc from '@grpc/grpc-js';

export interface TlsConfig {
  tlsCert: string | null;
  tlsKey: string | null;
  tlsClientCa: string | null;
}

/** A TLS setting that cannot be used; the message names the flag (never the key's contents). */
export class TlsConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'TlsConfigError';
  }
}

function read(flag: string, path: string): Buffer {
  try {
    return readFileSync(path);
  } catch (err) {
    throw new TlsConfigError(`${flag} ${path}: cannot read (${(err as NodeJS.ErrnoException).code ?? String(err)})`);
  }
}

export type TlsMode = 'plaintext' | 'tls' | 'mtls';

export function tlsMode(cfg: TlsConfig): TlsMode {
  return cfg.tlsCert === null ? 'plaintext' : cfg.tlsClientCa === null ? 'tls' : 'mtls';
}

export function serverCredentials(cfg: TlsConfig): grpc.ServerCredentials {
  if (cfg.tlsCert === null && cfg.tlsKey === null) {
    if (cfg.tlsClientCa !== null) throw new TlsConfigError('--tls-client-ca: mTLS needs --tls-cert and --tls-key');
    return grpc.ServerCredentials.createInsecure();
  }
  if (cfg.tlsCert === null || cfg.tlsKey === null) throw new TlsConfigError('--tls-cert and --tls-key: give both or neither');
  const cert = read('--tls-cert', cfg.tlsCert);
  const key = read('--tls-key', cfg.tlsKey);
  const ca = cfg.tlsClientCa === null ? null : read('--tls-client-ca', cfg.tlsClientCa);
  try {
    createSecureContext({ cert, key, ...(ca ? { ca } : {}) });
  } catch (err) {
    const detail = err instanceof Error ? err.message : String(err);
    const flags = /key values mismatch/i.test(detail) ? '--tls-key does not match --tls-cert' : `--tls-cert / --tls-key${ca ? ' / --tls-client-ca' : ''}: not usable PEM`;
    throw new TlsConfigError(`${flags} (${detail})`);
  }
  // With a client CA: the client must present a certificate signed by it (checkClientCertificate = true).
  return grpc.ServerCredentials.createSsl(ca, [{ private_key: key, cert_chain: cert }], ca !== null);
}
