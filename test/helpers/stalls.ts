/**
 * How long one caller's action freezes everyone else's streams: a client keeps Generate streams running back to
 * back and records when each token arrives; the largest gap between two arrivals while the action runs is the
 * stall. The server runs in this process, so a blocked event loop delays the arrivals exactly as long.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { makeRandomAdapter, writePeftAdapter } from '../../src/adapters/peft.js';
import { MergeMethod } from '../../src/gen/loraplex/v1/adapters_pb.js';
import { TextSplit } from '../../src/gen/loraplex/v1/train_pb.js';
import type { ModelSpec } from '../../src/models/spec.js';
import type { TestServer } from './server.js';

export interface StallSizes {
  promptChars: number;
  /** Rank of the two adapters an svd merge combines. */
  mergeRank: number;
  trainTextBytes: number;
  listConfigBytes: number;
  coldAdapterRank: number;
}

export type StallFigures = Record<'idle' | 'generateHugePrompt' | 'tokenizeHugePrompt' | 'mergeSvd' | 'trainLargeText' | 'listHugeConfig' | 'generateColdAdapter', number>;

type Clients = Pick<TestServer, 'inference' | 'adapters' | 'train' | 'adapterRoot' | 'dataRoot'>;

/** Streams tokens until stop() and keeps every arrival time. */
function streamer(s: Clients): { arrivals: number[]; stop(): Promise<void> } {
  const arrivals: number[] = [];
  let running = true;
  const done = (async () => {
    while (running) {
      for await (const m of s.inference.generate({ prompt: { case: 'text', value: 'Once upon a time' }, sampling: { temperature: 0.8, seed: 1n, maxNewTokens: 200 } })) {
        if (m.event.case === 'delta') arrivals.push(performance.now());
      }
    }
  })();
  return { arrivals, stop: async () => ((running = false), await done) };
}

/** Largest gap between arrivals inside [t0, t1], counting the edges (a stall may start before the first arrival). */
function largestGap(arrivals: number[], t0: number, t1: number): number {
  let prev = t0;
  let gap = 0;
  for (const t of arrivals) {
    if (t < t0) continue;
    if (t > t1) {
      gap = Math.max(gap, t - prev);
      break;
    }
    gap = Math.max(gap, t - prev);
    prev = t;
  }
  return gap;
}

/** Ignores the action's outcome: only the stall counts (a rejection is the expected outcome for some). */
const settle = (p: Promise<unknown>) => p.then(() => undefined, () => undefined);

export async function measureStalls(s: Clients, spec: ModelSpec, sizes: StallSizes, log: (m: string) => void = () => undefined): Promise<StallFigures> {
  // Fixtures first, outside any measurement.
  const targetModules = ['q_proj', 'v_proj', 'down_proj'];
  for (const [id, seed] of [['merge-a', 1], ['merge-b', 2]] as const) {
    writePeftAdapter(join(s.adapterRoot, id), makeRandomAdapter(spec, { r: sizes.mergeRank, alpha: 16, targetModules, seed, bStd: 0.01 }));
  }
  writePeftAdapter(join(s.adapterRoot, 'cold'), makeRandomAdapter(spec, { r: sizes.coldAdapterRank, alpha: 16, targetModules: ['all-linear'], seed: 3, bStd: 0.01 }));
  mkdirSync(join(s.adapterRoot, 'huge-config'), { recursive: true });
  writeFileSync(join(s.adapterRoot, 'huge-config', 'adapter_config.json'), `{"r": 8, "lora_alpha": 16, "padding": "${'x'.repeat(sizes.listConfigBytes)}"}`);
  const paragraph = 'Once upon a time there was a little dog who liked to run in the park with his friends.\n\n';
  writeFileSync(join(s.dataRoot, 'big.txt'), paragraph.repeat(Math.ceil(sizes.trainTextBytes / paragraph.length)));
  const huge = 'a'.repeat(sizes.promptChars);

  const actions: [keyof StallFigures, () => Promise<unknown>][] = [
    ['idle', () => new Promise((r) => setTimeout(r, 1000))],
    ['generateHugePrompt', async () => { for await (const _ of s.inference.generate({ prompt: { case: 'text', value: huge } })) void _; }],
    ['tokenizeHugePrompt', () => s.inference.tokenize({ prompt: { case: 'text', value: huge } })],
    ['mergeSvd', () => s.adapters.mergeAdapters({ newAdapterId: 'merged-svd', method: MergeMethod.SVD, sources: [{ adapterId: 'merge-a', weight: 1 }, { adapterId: 'merge-b', weight: 1 }] })],
    // Paragraphs: the job starts (and so stops) in seconds. The file is read and parsed off the main thread in every
    // split; the default one-stream split tokenizes 8 MB in one tokenizer call, about a minute on this machine.
    ['trainLargeText', async () => {
      for await (const e of s.train.train({ adapterId: 'stall-trained', path: 'big.txt', textSplit: TextSplit.PARAGRAPH, r: 4, maxSteps: 1, maxSeqLength: 32 })) {
        if (e.event?.event.case === 'accepted') {
          await s.train.cancelTrainJob({ jobId: e.event.event.value.jobId });
          return;
        }
      }
    }],
    ['listHugeConfig', async () => { for (let i = 0; i < 3; i++) await s.adapters.listAdapters({}); }],
    ['generateColdAdapter', async () => { for await (const _ of s.inference.generate({ prompt: { case: 'text', value: 'Once' }, adapterId: 'cold', sampling: { maxNewTokens: 4 } })) void _; }],
  ];

  const stream = streamer(s);
  try {
    while (stream.arrivals.length < 20) await new Promise((r) => setTimeout(r, 10)); // warm
    const figures = {} as StallFigures;
    for (const [name, act] of actions) {
      const t0 = performance.now();
      await settle(act());
      const t1 = performance.now();
      // One more arrival after the action, so a stall at its very end is seen.
      const seen = stream.arrivals.length;
      while (stream.arrivals.length === seen) await new Promise((r) => setTimeout(r, 5));
      figures[name] = +largestGap(stream.arrivals, t0, t1).toFixed(1);
      log(`${name}: ${(t1 - t0).toFixed(0)} ms, largest gap ${figures[name]} ms`);
    }
    return figures;
  } finally {
    await stream.stop();
  }
}
