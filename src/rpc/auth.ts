/**
 * API keys -> principals. A key belongs to one tenant and has a role; every loraplex RPC must carry
 * `authorization: Bearer <api key>` (health and reflection stay open, see server.ts).
 *
 * The keys file (--api-keys-file), JSON or YAML:
 *   keys:
 *     - { key: "<at least 16 characters>", tenant: acme, role: user }   # role: user (default) | admin
 * or a DIRECTORY of such files, e.g. a mounted Kubernetes Secret (one file per Secret key: the file name is the
 * key id used in messages). Files and directories whose names start with '.' are skipped (the Secret mount's
 * `..data` links). SIGHUP re-reads it (serve.ts); a broken file keeps the old keys.
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import type { Metadata } from '@grpc/grpc-js';
import { parse as parseYaml } from 'yaml';
import { LoraplexError } from '../errors.js';
import { LOCAL_PRINCIPAL, isTenantName, type Principal } from '../adapters/tenancy.js';

export type { Principal };

export const MIN_API_KEY_LENGTH = 16;
export const MISSING_KEY_MESSAGE = 'missing authorization metadata: send "authorization: Bearer <api key>"';
export const INVALID_KEY_MESSAGE = 'invalid API key';

/** A keys file that cannot be used: the message names the file, the entry and the rule (never a key). */
export class ApiKeysError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ApiKeysError';
  }
}

export interface ApiKeyEntry {
  /** sha256 of the key: the key itself is not kept. */
  readonly digest: Buffer;
  readonly principal: Principal;
  /** `file` or `file#3`, for logs and messages. */
  readonly source: string;
}

export interface AuthConfig {
  auth: 'required' | 'disabled';
  apiKeysFile: string | null;
}

export interface Authenticator {
  readonly enabled: boolean;
  /** The caller, from `authorization: Bearer <key>`; UNAUTHENTICATED when missing or unknown. */
  authenticate(metadata: Metadata): Principal;
  /** Re-reads the keys file; on error keeps the current keys and throws ApiKeysError. Returns the key count. */
  reload(): number;
}

const sha256 = (s: string) => createHash('sha256').update(s, 'utf8').digest();

const ENTRY_FIELDS = new Set(['key', 'tenant', 'role']);

/** Parses one keys document (JSON or YAML text); `source` names it in messages. */
export function parseApiKeys(text: string, source: string): ApiKeyEntry[] {
  let doc: unknown;
  try {
    doc = parseYaml(text); // YAML 1.2 is a superset of JSON
  } catch (err) {
    throw new ApiKeysError(`${source}: not valid YAML or JSON: ${(err instanceof Error ? err.message : String(err)).split('\n')[0]}`);
  }
  if (doc === null || typeof doc !== 'object' || Array.isArray(doc) || !Array.isArray((doc as Record<string, unknown>)['keys'])) {
    throw new ApiKeysError(`${source}: must be a mapping with a list "keys" of {key, tenant, role}`);
  }
  const extra = Object.keys(doc).filter((k) => k !== 'keys');
  if (extra.length) throw new ApiKeysError(`${source}: unknown key ${JSON.stringify(extra[0])} (only "keys")`);
  return ((doc as { keys: unknown[] }).keys).map((raw, i) => {
    const at = `${source} keys[${i}]`;
    if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) throw new ApiKeysError(`${at}: must be a mapping {key, tenant, role}`);
    const e = raw as Record<string, unknown>;
    const unknown = Object.keys(e).find((k) => !ENTRY_FIELDS.has(k));
    if (unknown !== undefined) throw new ApiKeysError(`${at}: unknown field ${JSON.stringify(unknown)} (key, tenant, role)`);
    const key = e['key'];
    if (typeof key !== 'string' || key.length < MIN_API_KEY_LENGTH) throw new ApiKeysError(`${at}.key: must be a string of at least ${MIN_API_KEY_LENGTH} characters`);
    if (/\s/.test(key) || /[^\x21-\x7e]/.test(key)) throw new ApiKeysError(`${at}.key: must be printable ASCII without spaces (it travels in a header)`);
    const tenant = e['tenant'];
    if (!isTenantName(tenant)) {
      throw new ApiKeysError(`${at}.tenant${typeof tenant === 'string' ? ` ${JSON.stringify(tenant)}` : ''}: must be 1-128 characters of letters, digits, ".", "_", "-" and not start with "."`);
    }
    const role = e['role'] ?? 'user';
    if (role !== 'user' && role !== 'admin') throw new ApiKeysError(`${at}.role ${JSON.stringify(role)}: must be user or admin`);
    return { digest: sha256(key), principal: Object.freeze({ tenant, role }), source: `${source}#${i}` };
  });
}

/** Reads --api-keys-file: one file, or every non-hidden file of a directory (a mounted Secret). */
export function readApiKeys(path: string): ApiKeyEntry[] {
  let files: string[];
  try {
    files = statSync(path).isDirectory()
      ? readdirSync(path, { withFileTypes: true })
          // Secret mounts: each key is a symlink to ..data/<key>; skip the dot entries themselves.
          .filter((e) => !e.name.startsWith('.') && (e.isFile() || (e.isSymbolicLink() && statSync(join(path, e.name)).isFile())))
          .map((e) => join(path, e.name))
          .sort()
      : [path];
  } catch (err) {
    throw new ApiKeysError(`--api-keys-file ${path}: cannot read (${(err as NodeJS.ErrnoException).code ?? String(err)})`);
  }
  const entries: ApiKeyEntry[] = [];
  for (const file of files) {
    let text: string;
    try {
      text = readFileSync(file, 'utf8');
    } catch (err) {
      throw new ApiKeysError(`${file}: cannot read (${(err as NodeJS.ErrnoException).code ?? String(err)})`);
    }
    entries.push(...parseApiKeys(text, file));
  }
  if (entries.length === 0) throw new ApiKeysError(`--api-keys-file ${path}: holds no keys, so no one could call the server`);
  // The same key for two entries would make the principal depend on the order: refuse.
  const seen = new Map<string, string>();
  for (const e of entries) {
    const hex = e.digest.toString('hex');
    const first = seen.get(hex);
    if (first !== undefined) throw new ApiKeysError(`${e.source}: the same key as ${first} (each key must be unique)`);
    seen.set(hex, e.source);
  }
  return entries;
}

/**
 * The key of `Bearer <key>` in the metadata, or null. Only the first authorization value counts.
 */
export function bearerToken(metadata: Metadata): string | null {
  const value = metadata.get('authorization')[0];
  if (typeof value !== 'string') return null;
  const m = /^Bearer[ ]+(\S+)\s*$/i.exec(value);
  return m ? m[1]! : null;
}

/**
 * The entry whose key is `key`, comparing sha256 digests with timingSafeEqual against EVERY entry (no early
 * exit), so the time taken says nothing about which key, or how much of one, matched.
 */
export function findKey(entries: readonly ApiKeyEntry[], key: string): ApiKeyEntry | null {
  const digest = sha256(key);
  let found: ApiKeyEntry | null = null;
  for (const e of entries) {
    if (timingSafeEqual(e.digest, digest) && found === null) found = e;
  }
  return found;
}

export function createAuthenticator(cfg: AuthConfig): Authenticator {
  if (cfg.auth === 'disabled') {
    return { enabled: false, authenticate: () => LOCAL_PRINCIPAL, reload: () => 0 };
  }
  const path = cfg.apiKeysFile;
  if (path === null) throw new ApiKeysError('auth: required needs --api-keys-file (or set --auth disabled for local use)');
  let entries = readApiKeys(path);
  return {
    enabled: true,
    authenticate(metadata) {
      const key = bearerToken(metadata);
      if (key === null) throw new LoraplexError('UNAUTHENTICATED', MISSING_KEY_MESSAGE);
      const entry = findKey(entries, key);
      if (!entry) throw new LoraplexError('UNAUTHENTICATED', INVALID_KEY_MESSAGE);
      return entry.principal;
    },
    reload() {
      entries = readApiKeys(path); // assigned only once the whole file is valid
      return entries.length;
    },
  };
}
