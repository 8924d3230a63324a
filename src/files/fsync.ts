import { closeSync, fsyncSync, openSync } from 'node:fs';

/** fsync of a directory, so that a rename or a new entry in it survives a crash. */
export function fsyncDir(dir: string): void {
  // Best effort: some platforms and file systems cannot open or fsync a directory, and then there is nothing to do.
  try {
    const fd = openSync(dir, 'r');
    try {
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
  } catch {
    /* best effort */
  }
}
