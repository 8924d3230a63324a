import { createHash } from 'node:crypto';
import { mkdirSync, readFileSync, renameSync, statSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { contentKey, keyFiles } from '../models/load.js';

/**
 * A start must find its cached graph without reading every weight byte (sha256 of the 1.1B model's 2.2 GB
 * takes ~1.7 s here), yet never serve a graph built from other weights. So the cache remembers, per model
 * directory, the content key it last hashed together with each file's identity as the kernel reports it; a
 * start that sees the same identities trusts that key and reads no weights. ctime is part of the identity
 * because the kernel sets it on every write and nothing (utimes, cp -p, rsync -t) can set it back; inode and
 * device catch a file replaced by a rename. Any difference costs one full hash, and a rebuild only if the
 * content really changed (a touched or copied model reuses its entry).
 */

/** One key file's identity; bigint stat fields as decimal strings so they survive JSON exactly. */
export interface FileIdentity {
  file: string;
  size: string;
  mtimeNs: string;
  ctimeNs: string;
  ino: string;
  dev: string;
}

export function modelIdentity(dir: string): FileIdentity[] {
  return keyFiles(dir).map((file) => {
    const st = statSync(join(dir, file), { bigint: true });
    return { file, size: String(st.size), mtimeNs: String(st.mtimeNs), ctimeNs: String(st.ctimeNs), ino: String(st.ino), dev: String(st.dev) };
  });
}

export interface ContentKeyOptions {
  /** Hashes the model's files; injectable so tests can count full reads. Default contentKey. */
  hashContent?: (dir: string) => string;
  /** Milliseconds since the epoch. Default Date.now; tests pretend the files were written long ago. */
  now?: () => number;
}

export interface ResolvedContentKey {
  contentKey: string;
  /** True when the files were read and hashed (first start, or their identity changed). */
  hashed: boolean;
  /** The files' identity the key belongs to: a reader can check nothing changed after it read them too. */
  identity: FileIdentity[];
}

/**
 * A file changed this recently may be written again within the same timestamp tick (the kernel's coarse clock,
 * 1-2 s on some filesystems), leaving its identity unchanged: such an identity proves nothing yet and is not
 * recorded, so the next start hashes again (git's "racy clean" rule).
 */
const RACY_MS = 2000;

interface IdentityRecord {
  dir: string;
  files: FileIdentity[];
  contentKey: string;
}

/** The model's content key, from the record of its files' identities when they are unchanged, else by hashing. */
export function resolveContentKey(dir: string, recordDir: string, opts: ContentKeyOptions = {}): ResolvedContentKey {
  const absDir = resolve(dir);
  const before = modelIdentity(absDir);
  const recordPath = join(recordDir, `${identityHash(absDir, before)}.json`);
  const known = readRecord(recordPath);
  if (known && known.dir === absDir && JSON.stringify(known.files) === JSON.stringify(before)) return { contentKey: known.contentKey, hashed: false, identity: before };

  const key = (opts.hashContent ?? contentKey)(absDir);
  const after = modelIdentity(absDir);
  const now = (opts.now ?? Date.now)();
  // Changed while hashing: the hash may mix old and new bytes, so it is used this once and not remembered.
  const unchanged = JSON.stringify(after) === JSON.stringify(before);
  const settled = after.every((f) => now - Number(BigInt(f.ctimeNs) / 1_000_000n) >= RACY_MS);
  if (unchanged && settled) writeRecord(recordDir, recordPath, { dir: absDir, files: after, contentKey: key });
  return { contentKey: key, hashed: true, identity: before };
}

function identityHash(dir: string, files: FileIdentity[]): string {
  return createHash('sha256').update(JSON.stringify({ dir, files })).digest('hex').slice(0, 32);
}

function readRecord(path: string): IdentityRecord | null {
  try {
    const r = JSON.parse(readFileSync(path, 'utf8')) as Partial<IdentityRecord>;
    return typeof r.dir === 'string' && Array.isArray(r.files) && typeof r.contentKey === 'string' ? (r as IdentityRecord) : null;
  } catch {
    // Missing, or torn by a crash: hashing again is the safe answer.
    return null;
  }
}

function writeRecord(recordDir: string, path: string, record: IdentityRecord): void {
  mkdirSync(recordDir, { recursive: true });
  const tmp = `${path}.tmp-${process.pid}`;
  writeFileSync(tmp, JSON.stringify(record));
  renameSync(tmp, path);
}
