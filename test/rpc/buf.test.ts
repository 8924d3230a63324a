import assert from 'node:assert/strict';
import { test } from 'node:test';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { fileURLToPath } from 'node:url';

// dist/test/rpc/ -> the repository root, where buf.yaml is.
const root = fileURLToPath(new URL('../../../', import.meta.url));
const buf = fileURLToPath(new URL('node_modules/.bin/buf', `file://${root}`));

async function runBuf(...args: string[]): Promise<{ code: number; output: string }> {
  try {
    const { stdout, stderr } = await promisify(execFile)(buf, args, { cwd: root, timeout: 60_000 });
    return { code: 0, output: stdout + stderr };
  } catch (err) {
    const e = err as { code?: number | string; stdout?: string; stderr?: string; message: string };
    return { code: typeof e.code === 'number' ? e.code : -1, output: `${e.stdout ?? ''}${e.stderr ?? ''}` || e.message };
  }
}

test('buf lint (STANDARD) passes on proto/', async () => {
  const { code, output } = await runBuf('lint');
  assert.equal(code, 0, `buf lint failed:\n${output}`);
});

test('proto/ is buf-formatted', async () => {
  const { code, output } = await runBuf('format', '--diff', '--exit-code');
  assert.equal(code, 0, `run \`npx buf format -w\`:\n${output}`);
});
