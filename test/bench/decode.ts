import type { Engine } from '../../src/engine/engine.js';

/** Decode speed at a batch size: each row prefilled with the same synthetic prompt, one warm-up step, then timed steps. */
export async function decodeTokensPerSecond(engine: Engine, batch: number, promptLen: number, steps: number): Promise<{ tokensPerSecond: number; msPerStep: number }> {
  const prompt = Array.from({ length: promptLen }, (_, i) => 10 + ((i * 7) % 1000));
  for (let b = 0; b < batch; b++) await engine.step([{ kvRow: b, slot: 0, pastLen: 0, tokens: prompt }]);
  const rows = (past: number) => Array.from({ length: batch }, (_, b) => ({ kvRow: b, slot: 0, pastLen: past, tokens: [100 + b] }));
  await engine.step(rows(promptLen));
  const t0 = performance.now();
  for (let s = 1; s <= steps; s++) await engine.step(rows(promptLen + s));
  const ms = (performance.now() - t0) / steps;
  return { tokensPerSecond: (batch * 1000) / ms, msPerStep: ms };
}
