/**
 * Stall figures for `npm run bench`: the largest gap between two tokens of a running stream while another
 * caller does one heavy thing (the sizes of the isolation issue), next to an idle baseline from the same run.
 */
import { readModelSpec } from '../../src/models/config.js';
import type { QuantOptions } from '../../kernels/quant/index.js';
import { startTestServer } from '../helpers/server.js';
import { measureStalls, type StallFigures } from '../helpers/stalls.js';

export async function stallBench(modelDir: string, cacheDir: string, quant: QuantOptions, threads: number, log: (m: string) => void): Promise<{ largestGapMs: StallFigures }> {
  const s = await startTestServer({ modelDir, source: modelDir, cacheDir, threads, maxLoraRank: 128, maxAdapterBytes: 1 << 30 }, quant);
  try {
    const largestGapMs = await measureStalls(s, readModelSpec(modelDir), {
      promptChars: 1_048_000,
      mergeRank: 128,
      trainTextBytes: 54 << 20,
      listConfigBytes: 50 << 20,
      coldAdapterRank: 16,
    }, (m) => log(`stalls: ${m}`));
    return { largestGapMs };
  } finally {
    await s.close();
  }
}
