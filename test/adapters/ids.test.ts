import assert from 'node:assert/strict';
import { test } from 'node:test';
import { join, resolve } from 'node:path';
import { validateAdapterId } from '../../src/adapters/ids.js';
import { adapterKeyPath, LOCAL_PRINCIPAL, scopeAdapterId } from '../../src/adapters/tenancy.js';
import { LoraplexError } from '../../src/errors.js';

const BAD: [string, string][] = [
  ['..', 'parent directory'],
  ['a/b', 'slash'],
  ['/abs', 'absolute path'],
  ['/etc/passwd', 'absolute path'],
  ['a\\b', 'backslash'],
  ['..\\x', 'windows parent'],
  ['\u0007', 'control character'],
  ['ok\u0000', 'NUL'],
  ['a\nb', 'newline'],
  ['', 'empty'],
  ['x'.repeat(129), '129 characters'],
  ['.hidden', 'leading dot'],
  ['.', 'dot'],
  ['a..b', 'double dot inside'],
  ['../etc', 'climbs out'],
  ['my adapter', 'space'],
  ['caf\u00e9', 'non-ASCII'],
  ['C:x', 'drive letter'],
];

const GOOD = ['my-adapter_v1.2', 'a', 'A9', '_x', '-y', 'v1.2.3', 'x'.repeat(128), 'name.'];

test('validateAdapterId rejects anything that is not a plain name', async (t) => {
  for (const [id, why] of BAD) {
    await t.test(why, () => {
      assert.throws(
        () => validateAdapterId(id),
        (err: unknown) => {
          assert.ok(err instanceof LoraplexError, `${why}: ${String(err)}`);
          assert.equal(err.code, 'INVALID_ARGUMENT');
          assert.match(err.message, /^adapter_id .*must be 1-128 characters of letters, digits, "\.", "_", "-" and not start with "\."$/);
          // Control characters never echo back into a message (or a log line).
          assert.doesNotMatch(err.message, /[\u0000-\u001f]/);
          return true;
        },
      );
    });
  }
  assert.throws(() => validateAdapterId(42 as unknown as string), /adapter_id/);
});

test('validateAdapterId accepts safe names unchanged', () => {
  for (const id of GOOD) assert.equal(validateAdapterId(id), id);
});

test('a flat key directory stays a direct child of the root; a bad id never becomes a key', () => {
  const root = '/srv/adapters';
  const flat = (id: string) => scopeAdapterId(LOCAL_PRINCIPAL, id);
  assert.equal(adapterKeyPath(root, flat('my-adapter_v1.2')), join(resolve(root), 'my-adapter_v1.2'));
  assert.equal(adapterKeyPath('relative/root', flat('x')), join(resolve('relative/root'), 'x'));
  for (const [id] of BAD) assert.throws(() => adapterKeyPath(root, flat(id)), /adapter_id/);
});
