import type { Engine } from '../engine/engine.js';
import type { StepRow } from '../engine/runtime.js';
import type { Sequence, TokenEvent } from './sequence.js';

export interface BatchOptions {
  /** Prompt tokens per prefill step. */
  prefillChunk: number;
  onToken?: (seq: Sequence, event: TokenEvent) => void;
}

/**
 * Runs a fixed set of sequences to completion: each prompt is prefilled in chunks (one sequence per step,
 * which ORT's attention needs), then all running sequences decode together, one token per row per step;
 * rows leave the batch as they finish. The same sequence state, rows and output stage as the server's
 * scheduler (a fixed batch with caller-set slots needs no admission, leases or streams).
 */
export async function runBatch(engine: Engine, seqs: Sequence[], opts: BatchOptions): Promise<void> {
  if (seqs.length > engine.opts.maxNumSeqs) throw new RangeError(`${seqs.length} sequences: more than maxNumSeqs ${engine.opts.maxNumSeqs}`);
  seqs.forEach((s, i) => (s.kvRow = i));
  const emit = (s: Sequence, logits: Float32Array) => {
    const ev = s.accept(logits);
    if (ev && opts.onToken) opts.onToken(s, ev);
  };
  for (const s of seqs) {
    while (s.prefilling) {
      const row = s.stepRow(opts.prefillChunk);
      const { logits } = await engine.step([row]);
      s.advance(row.tokens.length);
      if (!s.prefilling) emit(s, logits);
    }
  }
  const vocab = () => engine.vocabSize;
  for (;;) {
    const running = seqs.filter((s) => !s.done);
    if (running.length === 0) break;
    const rows: StepRow[] = running.map((s) => s.stepRow(1));
    const { logits } = await engine.step(rows);
    running.forEach((s, b) => {
      s.advance(1);
      emit(s, logits.subarray(b * vocab(), (b + 1) * vocab()));
    });
  }
  for (const s of seqs) s.kvRow = -1;
}
