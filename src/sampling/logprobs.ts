/** A generated token's log-probability and the most likely alternatives at its position. */
export interface TokenLogprob {
  tokenId: number;
  logprob: number;
  /** Most likely first; ties: lower id first. */
  top: { tokenId: number; logprob: number }[];
}

/**
 * log-softmax of one row of raw logits at `tokenId`, plus the `topN` most likely ids. The normalizer is summed in
 * float64 over the whole row; the row must be finite (the sampler has refused a non-finite one already).
 */
export function logprobsOf(logits: Float32Array, tokenId: number, topN: number): TokenLogprob {
  let max = -Infinity;
  for (let i = 0; i < logits.length; i++) if (logits[i]! > max) max = logits[i]!;
  let sum = 0;
  for (let i = 0; i < logits.length; i++) sum += Math.exp(logits[i]! - max);
  const logZ = max + Math.log(sum);
  return { tokenId, logprob: logits[tokenId]! - logZ, top: topIds(logits, topN).map((id) => ({ tokenId: id, logprob: logits[id]! - logZ })) };
}

/** The n best ids, best first (insertion into a short sorted list: n <= MAX_LOGPROBS). */
function topIds(x: Float32Array, n: number): number[] {
  const best: number[] = [];
  if (n <= 0) return best;
  for (let i = 0; i < x.length; i++) {
    const v = x[i]!;
    if (best.length === n && v <= x[best[n - 1]!]!) continue; // a tie with the last keeps the lower id
    let j = best.length;
    while (j > 0 && v > x[best[j - 1]!]!) j--;
    best.splice(j, 0, i);
    if (best.length > n) best.pop();
  }
  return best;
}
