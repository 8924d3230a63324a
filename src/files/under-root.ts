import { closeSync, constants, fstatSync, openSync, readSync, realpathSync } from 'node:fs';
import { basename, dirname, isAbsolute, join, relative, sep } from 'node:path';

/**
 * Opening files under a root that others can write into (adapter, data and export roots). The rule:
 *  1. the path is relative to the root, without NUL or `..` segments;
 *  2. the real path of the file's DIRECTORY (symlinks resolved) is the real path of the root or inside it,
 *     so a directory symlink may point elsewhere inside the root, never out of it;
 *  3. the file itself is opened with O_NOFOLLOW | O_NONBLOCK: a symlink is refused (ELOOP), a FIFO never
 *     blocks the open;
 *  4. the opened descriptor must be a regular file (fstat), and on Linux its path (/proc/self/fd) must still
 *     lie under the root, which closes the window between the check in 2 and the open;
 *  5. its size comes from fstat of that descriptor and is checked against the cap before anything is read;
 *     at most that many bytes are read, so a file that grows meanwhile cannot make us read more.
 * Messages name the file as the caller gave it and the rule broken, never the server's paths or contents.
 */

export type UnderRootProblem = 'missing' | 'outside' | 'not-regular' | 'too-large' | 'unreadable';

export class UnderRootError extends Error {
  constructor(
    readonly problem: UnderRootProblem,
    /** The path as the caller gave it, relative to the root. */
    readonly file: string,
    /** What is wrong, without the file name or any server path. */
    readonly detail: string,
  ) {
    super(`${file}: ${detail}`);
    this.name = 'UnderRootError';
  }
}

const NOT_REGULAR = 'is not a regular file (symbolic links, directories, FIFOs and devices are refused)';

const errno = (err: unknown): string | undefined => (err as NodeJS.ErrnoException | null)?.code;

/** True when p is root itself or below it (both real paths). */
export function isUnder(root: string, p: string): boolean {
  const rel = relative(root, p);
  return rel === '' || (rel !== '..' && !rel.startsWith(`..${sep}`) && !isAbsolute(rel));
}

/** The root's real path; 'unreadable' when it does not exist. */
export function realRoot(root: string): string {
  try {
    return realpathSync(root);
  } catch {
    throw new UnderRootError('unreadable', '.', 'the root is not available');
  }
}

function checkRelative(rel: string): void {
  if (rel.length === 0 || rel.includes('\0') || isAbsolute(rel) || rel.split(/[\\/]/).includes('..')) {
    throw new UnderRootError('outside', rel, 'must be a relative path without ".." under the root');
  }
}

/** Rule 2: the real path of rel's directory, checked to lie under rootReal. */
export function realDirUnder(rootReal: string, rel: string): string {
  checkRelative(rel);
  let dir: string;
  try {
    dir = realpathSync(join(rootReal, dirname(rel)));
  } catch (err) {
    const code = errno(err);
    if (code === 'ENOENT') throw new UnderRootError('missing', rel, 'does not exist');
    if (code === 'ENOTDIR') throw new UnderRootError('not-regular', rel, 'has a path component that is not a directory');
    if (code === 'ELOOP') throw new UnderRootError('outside', rel, 'has a symbolic link loop in its path');
    throw new UnderRootError('unreadable', rel, `cannot be resolved (${code ?? 'error'})`);
  }
  if (!isUnder(rootReal, dir)) throw new UnderRootError('outside', rel, 'resolves outside the root');
  return dir;
}

export interface OpenedFile {
  fd: number;
  /** From fstat of fd. */
  size: number;
}

/** Opens rel under root by the rule above; the caller closes fd. `maxBytes` is checked against fstat's size. */
export function openUnderRoot(root: string, rel: string, maxBytes: number): OpenedFile {
  const rootReal = realRoot(root);
  const path = join(realDirUnder(rootReal, rel), basename(rel));
  let fd: number;
  try {
    fd = openSync(path, constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
  } catch (err) {
    const code = errno(err);
    if (code === 'ENOENT') throw new UnderRootError('missing', rel, 'does not exist');
    // ELOOP: the file is a symlink; ENXIO: a socket; EISDIR / ENOTDIR / ENODEV alike are not plain files.
    if (code === 'ELOOP' || code === 'ENXIO' || code === 'EISDIR' || code === 'ENOTDIR' || code === 'ENODEV') {
      throw new UnderRootError('not-regular', rel, NOT_REGULAR);
    }
    throw new UnderRootError('unreadable', rel, `cannot be opened (${code ?? 'error'})`);
  }
  try {
    const st = fstatSync(fd);
    if (!st.isFile()) throw new UnderRootError('not-regular', rel, NOT_REGULAR);
    if (!openedUnder(rootReal, fd)) throw new UnderRootError('outside', rel, 'resolves outside the root');
    if (st.size > maxBytes) throw new UnderRootError('too-large', rel, `${st.size} bytes exceed the limit of ${maxBytes}`);
    return { fd, size: st.size };
  } catch (err) {
    closeSync(fd);
    throw err;
  }
}

/** Rule 4's re-check through /proc; where /proc is missing the check of rule 2 stands alone. */
function openedUnder(rootReal: string, fd: number): boolean {
  let actual: string;
  try {
    actual = realpathSync(`/proc/self/fd/${fd}`);
  } catch {
    return true;
  }
  return isUnder(rootReal, actual);
}

/** Reads exactly `size` bytes from position 0 into a fresh (8-byte aligned) buffer; a shorter file is an error. */
export function readOpened(file: OpenedFile, rel: string): Uint8Array {
  const buf = new Uint8Array(file.size);
  let done = 0;
  while (done < buf.length) {
    const n = readSync(file.fd, buf, done, buf.length - done, done);
    if (n === 0) throw new UnderRootError('unreadable', rel, `ended at byte ${done} of ${file.size} (changed while read)`);
    done += n;
  }
  return buf;
}

/** The whole file rel under root, at most maxBytes (UnderRootError 'too-large' beyond, before any read). */
export function readUnderRoot(root: string, rel: string, maxBytes: number): Uint8Array {
  const file = openUnderRoot(root, rel, maxBytes);
  try {
    return readOpened(file, rel);
  } finally {
    closeSync(file.fd);
  }
}
