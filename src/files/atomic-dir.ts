/**
 * Directories that appear whole or not at all: written into a temp directory beside the target (same file
 * system, so the final rename(2) is atomic), then renamed into place. A reader sees the old directory, no
 * directory, or the new one, never half of one.
 */
import { mkdirSync, renameSync, rmSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { basename, dirname, join } from 'node:path';
import { fsyncDir } from './fsync.js';

/** `.<name>.<kind>-<pid>-<random>` beside target: dot-prefixed, so listings skip it and sweeps can find it. */
export function scratchBeside(target: string, kind: 'tmp' | 'old'): string {
  return join(dirname(target), `.${basename(target)}.${kind}-${process.pid}-${randomBytes(4).toString('hex')}`);
}

export interface InstallOptions {
  /** Whether an existing target may be replaced (asked when the rename finds it occupied). Default false. */
  replace?: boolean | (() => boolean);
  /** Where an existing target is moved before it is deleted; default scratchBeside(target, 'old'). */
  aside?: () => string;
  /** Directories to fsync after the swap (the target's parent, and the root above a nested one). */
  syncDirs?: readonly string[];
}

/** rename(2) cannot replace a non-empty directory or a file with a directory. */
const occupied = (err: unknown) => ['ENOTEMPTY', 'EEXIST', 'ENOTDIR'].includes((err as NodeJS.ErrnoException).code ?? '');

/**
 * Renames the finished directory `source` to `target`. An occupied target is moved aside first (and deleted
 * once the new one is in place) when `replace` allows it; otherwise nothing moves and the result is false.
 */
export function installDir(source: string, target: string, opts: InstallOptions = {}): boolean {
  const mayReplace = typeof opts.replace === 'function' ? opts.replace : () => opts.replace === true;
  const asides: string[] = [];
  try {
    for (let attempt = 0; ; attempt++) {
      try {
        renameSync(source, target);
        break;
      } catch (err) {
        if (!occupied(err)) throw err;
        if (!mayReplace()) return false;
        // Another writer keeps filling the target: give up rather than loop.
        if (attempt >= 3) throw err;
        const aside = opts.aside?.() ?? scratchBeside(target, 'old');
        try {
          renameSync(target, aside);
          asides.push(aside);
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e; // gone meanwhile: try again
        }
      }
    }
    for (const dir of opts.syncDirs ?? []) fsyncDir(dir);
    return true;
  } finally {
    for (const aside of asides) rmSync(aside, { recursive: true, force: true });
  }
}

export interface WriteDirOptions extends InstallOptions {
  /** The temp directory (beside the target); callers whose startup sweep looks for their own names give it. */
  temp?: string;
  /** fsync the written directory before the rename (with syncDirs after it: a crash keeps the new directory). */
  syncTemp?: boolean;
}

/**
 * Writes a directory atomically: `fill` writes into a fresh temp directory, which then replaces or becomes
 * `target` (see installDir). On any failure the temp directory is removed. False when the target was occupied
 * and not to be replaced.
 */
export function writeDirAtomic(target: string, fill: (dir: string) => void, opts: WriteDirOptions = {}): boolean {
  mkdirSync(dirname(target), { recursive: true });
  const temp = opts.temp ?? scratchBeside(target, 'tmp');
  mkdirSync(temp);
  try {
    fill(temp);
    if (opts.syncTemp) fsyncDir(temp);
    return installDir(temp, target, opts);
  } finally {
    rmSync(temp, { recursive: true, force: true });
  }
}

/** Deletes a directory so that no reader sees it half deleted: renamed to `aside` first. False when it was absent. */
export function removeDirAtomic(dir: string, aside: string, syncDirs: readonly string[] = []): boolean {
  try {
    renameSync(dir, aside);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw err;
  }
  for (const d of syncDirs) fsyncDir(d);
  rmSync(aside, { recursive: true, force: true });
  return true;
}
