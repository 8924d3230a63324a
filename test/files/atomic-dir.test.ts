import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { installDir, removeDirAtomic, writeDirAtomic } from '../../src/files/atomic-dir.js';
import { tempDir } from '../helpers/engine.js';

const put = (name: string, text: string) => (dir: string) => writeFileSync(join(dir, name), text);

test('writeDirAtomic creates the target whole and leaves no scratch beside it', () => {
  const root = tempDir('atomic');
  const target = join(root, 'nested', 'out');
  assert.equal(writeDirAtomic(target, put('a.txt', 'one')), true);
  assert.equal(readFileSync(join(target, 'a.txt'), 'utf8'), 'one');
  assert.deepEqual(readdirSync(join(root, 'nested')), ['out']);
});

test('replace swaps an existing directory whole; without it the target stays and the result is false', () => {
  const root = tempDir('atomic');
  const target = join(root, 'out');
  writeDirAtomic(target, (dir) => (put('old.txt', 'old')(dir), put('keep.txt', 'x')(dir)));
  assert.equal(writeDirAtomic(target, put('new.txt', 'new')), false);
  assert.deepEqual(readdirSync(target).sort(), ['keep.txt', 'old.txt']);
  assert.equal(writeDirAtomic(target, put('new.txt', 'new'), { replace: true }), true);
  assert.deepEqual(readdirSync(target), ['new.txt']);
  assert.deepEqual(readdirSync(root), ['out']);
});

test('a failing fill removes its temp directory and leaves the target as it was', () => {
  const root = tempDir('atomic');
  const target = join(root, 'out');
  writeDirAtomic(target, put('a.txt', 'one'));
  assert.throws(() => writeDirAtomic(target, () => { throw new Error('disk full'); }, { replace: true }), /disk full/);
  assert.deepEqual(readdirSync(root), ['out']);
  assert.equal(readFileSync(join(target, 'a.txt'), 'utf8'), 'one');
});

test('installDir asks replace only when the target is occupied, and uses the given aside path', () => {
  const root = tempDir('atomic');
  const asked: string[] = [];
  mkdirSync(join(root, 'src'));
  assert.equal(installDir(join(root, 'src'), join(root, 'dst'), { replace: () => (asked.push('free'), false) }), true);
  assert.deepEqual(asked, []);
  mkdirSync(join(root, 'src2'));
  writeFileSync(join(root, 'src2', 'b'), 'b');
  writeFileSync(join(root, 'dst', 'a'), 'a');
  const aside = join(root, '.graveyard');
  assert.equal(installDir(join(root, 'src2'), join(root, 'dst'), { replace: () => true, aside: () => aside, syncDirs: [root] }), true);
  assert.deepEqual(readdirSync(join(root, 'dst')), ['b']);
  assert.deepEqual(readdirSync(root), ['dst']);
});

test('removeDirAtomic deletes through the aside path; false when the directory is absent', () => {
  const root = tempDir('atomic');
  mkdirSync(join(root, 'gone'));
  writeFileSync(join(root, 'gone', 'f'), 'x');
  assert.equal(removeDirAtomic(join(root, 'gone'), join(root, '.tomb')), true);
  assert.deepEqual(readdirSync(root), []);
  assert.equal(removeDirAtomic(join(root, 'gone'), join(root, '.tomb')), false);
});
