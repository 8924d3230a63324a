import { test } from 'node:test';
import assert from 'node:assert/strict';
import { StopStringMatcher } from '../../src/tokenizer/index.js';

/** Feeds deltas; returns [visible text, stopped, stopString]. */
function run(stops: string[], deltas: string[]): [string, boolean, string | undefined] {
  const m = new StopStringMatcher(stops);
  let out = '';
  for (const d of deltas) {
    const r = m.push(d);
    out += r.text;
    if (r.stopped) return [out, true, r.stopString];
  }
  return [out + m.flush(), false, undefined];
}

test('stop string inside one delta', () => {
  assert.deepEqual(run(['\n\n'], ['Hello.\n\nMore']), ['Hello.', true, '\n\n']);
});

test('stop string spanning deltas is never partly shown', () => {
  const m = new StopStringMatcher(['</answer>']);
  assert.deepEqual(m.push('42 </'), { text: '42 ', stopped: false });
  assert.deepEqual(m.push('ans'), { text: '', stopped: false });
  assert.deepEqual(m.push('wer> tail'), { text: '', stopped: true, stopString: '</answer>' });
  assert.deepEqual(m.push('more'), { text: '', stopped: true });
});

test('held text is released when it diverges, or at flush', () => {
  const m = new StopStringMatcher(['STOP']);
  assert.equal(m.push('a ST').text, 'a ');
  assert.equal(m.push('ART').text, 'START');
  assert.equal(m.push('x S').text, 'x ');
  assert.equal(m.flush(), 'S');
});

test('earliest of several stop strings wins; overlapping prefixes', () => {
  assert.deepEqual(run(['world', 'lo w'], ['hel', 'lo world']), ['hel', true, 'lo w']);
  assert.deepEqual(run(['aab'], ['a', 'a', 'a', 'b', 'c']), ['a', true, 'aab']);
  assert.deepEqual(run(['ab', 'b'], ['xab']), ['x', true, 'ab']);
});

test('every split of a text gives the same result as the whole text', () => {
  const text = 'The end.\nUser: hi\nAssistant: hello</s>';
  const stops = ['\nUser:', '</s>'];
  const whole = run(stops, [text]);
  assert.deepEqual(whole, ['The end.', true, '\nUser:']);
  for (let i = 0; i <= text.length; i++) {
    for (let j = i; j <= text.length; j += 3) {
      assert.deepEqual(run(stops, [text.slice(0, i), text.slice(i, j), text.slice(j)]), whole);
    }
  }
  // Character by character, and nothing past the stop appears.
  assert.deepEqual(run(stops, [...text]), whole);
});

test('no stop strings: pass-through; unicode kept whole', () => {
  assert.deepEqual(run([], ['a', 'b']), ['ab', false, undefined]);
  assert.deepEqual(run(['😀!'], ['x😀', 'y😀', '!z']), ['x😀y', true, '😀!']);
});
