import type { Graph, Value } from '../ir.js';

/**
 * Token-level cross-entropy, built from ops that have gradient rules (kernels/ops/grad.ts):
 * LogSoftmax over the vocabulary, GatherElements of the label's log-probability (ignored labels gather
 * index 0 and are weighted 0), a masked sum divided by the number of counted tokens.
 */
export interface CrossEntropy {
  /** Scalar: mean (or sum) over the non-ignored positions of -log softmax(logits)[label]. */
  loss: Value;
  /** Scalar float32: how many labels were counted (for averaging over accumulated micro-batches). */
  tokenCount: Value;
}

export interface CrossEntropyOptions {
  ignoreIndex?: number;
  /** 'mean' (default) divides by max(tokenCount, 1); 'sum' leaves that to the caller. */
  reduction?: 'mean' | 'sum';
}

/** logits [batch, seq, vocab] float32, labels [batch, seq] int64 (ignoreIndex = not counted). */
export function crossEntropyLoss(g: Graph, logits: Value, labels: Value, opts: CrossEntropyOptions = {}): CrossEntropy {
  const ignore = opts.ignoreIndex ?? -100;
  const rows = labels.shape; // [batch, seq]
  const col = [...rows, 1];
  const logp = g.op1('LogSoftmax', [logits], { dtype: 'float32', shape: logits.shape }, { axis: -1 }, undefined, 'logp'); // [batch, seq, vocab]
  const labelsCol = g.op1('Unsqueeze', [labels, g.ints([-1])], { dtype: 'int64', shape: col }, undefined, undefined, 'labels_col'); // [batch, seq, 1]
  const ignored = g.op1('Equal', [labelsCol, g.ints([ignore])], { dtype: 'bool', shape: col }, undefined, undefined, 'label_ignored');
  const safe = g.op1('Where', [ignored, g.ints([0]), labelsCol], { dtype: 'int64', shape: col }, undefined, undefined, 'label_safe');
  const weight = g.op1('Where', [ignored, g.scalar(0), g.scalar(1)], { dtype: 'float32', shape: col }, undefined, undefined, 'label_weight'); // [batch, seq, 1]
  const picked = g.op1('GatherElements', [logp, safe], { dtype: 'float32', shape: col }, { axis: -1 }, undefined, 'label_logp'); // [batch, seq, 1]
  const total = g.op1('ReduceSum', [g.op1('Mul', [picked, weight], { dtype: 'float32', shape: col }, undefined, undefined, 'label_logp_w')], { dtype: 'float32', shape: [] }, { keepdims: 0 }, undefined, 'logp_sum');
  const tokenCount = g.op1('ReduceSum', [weight], { dtype: 'float32', shape: [] }, { keepdims: 0 }, undefined, 'token_count');
  if ((opts.reduction ?? 'mean') === 'sum') return { loss: g.op1('Neg', [total], { dtype: 'float32', shape: [] }, undefined, undefined, 'loss_sum'), tokenCount };
  // max(count, 1): a batch with every label ignored gives loss 0, not NaN.
  const denom = g.op1('Max', [tokenCount, g.scalar(1)], { dtype: 'float32', shape: [] }, undefined, undefined, 'token_count_1');
  const nll = g.op1('Div', [total, denom], { dtype: 'float32', shape: [] }, undefined, undefined, 'logp_mean');
  return { loss: g.op1('Neg', [nll], { dtype: 'float32', shape: [] }, undefined, undefined, 'loss'), tokenCount };
}

/** Mean cross-entropy over the non-ignored labels (a scalar), see crossEntropyLoss. */
export function crossEntropy(g: Graph, logits: Value, labels: Value, ignoreIndex = -100): Value {
  return crossEntropyLoss(g, logits, labels, { ignoreIndex }).loss;
}
