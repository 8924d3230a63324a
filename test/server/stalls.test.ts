import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readModelSpec } from '../../src/models/config.js';
import { STORIES } from '../helpers/engine.js';
import { startTestServer } from '../helpers/server.js';
import { measureStalls } from '../helpers/stalls.js';

/** Generous: CI is a busy 2-core machine. Before the worker pool these actions froze streams for 0.6-26 s. */
const STALL_BOUND_MS = 1500;

test('no caller action stalls the other streams: huge prompts, svd merge, Train data, huge configs, cold adapters', async (t) => {
  const s = await startTestServer({ maxLoraRank: 64 });
  try {
    const figures = await measureStalls(s, readModelSpec(STORIES), {
      promptChars: 1_048_000,
      mergeRank: 64,
      trainTextBytes: 8 << 20,
      listConfigBytes: 50 << 20,
      coldAdapterRank: 16,
    }, (m) => t.diagnostic(m));
    for (const [action, ms] of Object.entries(figures)) assert.ok(ms < STALL_BOUND_MS, `${action}: other streams frozen for ${ms} ms (bound ${STALL_BOUND_MS} ms)`);
  } finally {
    await s.close();
  }
});
