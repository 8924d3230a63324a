import { invalidArgument } from '../errors.js';
import { Rng } from '../sampling/rng.js';
import type { ChatMessage, Tokenizer } from '../tokenizer/tokenizer.js';
import type { Example, TrainData } from './data.js';

/**
 * Examples -> token stream (with a per-token "in the loss" flag) -> packed sequences of max_seq_length ->
 * shuffled micro-batches [batch, seq] of int64 input_ids / labels / attention_mask.
 *
 * Tokens: each document gets the special tokens the tokenizer adds (llama: BOS), then EOS is appended
 * unless the document already ends with it, so documents in a packed row are separated by EOS (BOS). A
 * stream example (a .txt file read whole) gets no EOS: its tokens are exactly the tokenizer's encoding.
 * Chat documents are the rendered template tokenized without added specials (the template writes them).
 *
 * Loss: text -> every token except the added prefix (BOS); prompt/completion -> the completion's tokens;
 * chat -> each assistant turn as the template renders it (content and end-of-turn marker), located by
 * rendering the conversation up to that turn (with the generation prompt) and up to its end: both must be
 * prefixes of the full rendering. When a template is not prefix-stable that way, the loss falls back to
 * all the text after the last user turn. A token is in the loss when the boundary tokenization says so:
 * the tokens a character prefix shares with the whole text precede the boundary, so a token straddling a
 * prompt/completion boundary counts as completion (as TRL's prompt-prefix masking does).
 *
 * Packing (nanoGPT style, stride L): the stream of N tokens is cut into rows of L inputs; row k's inputs
 * are tokens [kL, kL + L) and its labels tokens [kL + 1, kL + L + 1), so every token but the last is an
 * input exactly once and every token but the first a target exactly once per epoch; nothing is dropped,
 * the last row is padded. Labels are -100 where the target is not in the loss and on padding. Attention
 * inside a row is causal across document boundaries, as transformers' group_texts packing.
 */

export const IGNORE_INDEX = -100;

/** The part of Tokenizer collate uses (tests may pass a fake). */
export type CollateTokenizer = Pick<Tokenizer, 'encode' | 'eosTokenId' | 'chatTemplate' | 'applyChatTemplate'>;

export interface TokenStream {
  /** All documents' tokens, concatenated. */
  ids: Int32Array;
  /** 1 where the token is a target in the loss. */
  trained: Uint8Array;
  /** Index of each document's first token. */
  docStarts: number[];
  /** Chat documents whose assistant turns could not be located (loss after the last user turn instead). */
  chatFallbacks: number;
}

/** The tokens encode(text, { addSpecialTokens: true }) puts around a text. */
function specialsAround(tok: CollateTokenizer): { prefix: number[]; suffix: number[] } {
  const probe = 'a';
  const raw = tok.encode(probe, { addSpecialTokens: false });
  const full = tok.encode(probe, { addSpecialTokens: true });
  for (let at = 0; at + raw.length <= full.length; at++) {
    if (raw.every((id, j) => full[at + j] === id)) return { prefix: full.slice(0, at), suffix: full.slice(at + raw.length) };
  }
  return { prefix: [], suffix: [] };
}

function commonPrefix(a: readonly number[], b: readonly number[]): number {
  const n = Math.min(a.length, b.length);
  let i = 0;
  while (i < n && a[i] === b[i]) i++;
  return i;
}

/** Raw tokens of `text` and a per-token loss flag for the character spans [start, end). */
function tokenizeSpans(tok: CollateTokenizer, text: string, spans: readonly [number, number][]): { ids: number[]; trained: Uint8Array } {
  const ids = tok.encode(text, { addSpecialTokens: false });
  const trained = new Uint8Array(ids.length);
  const cache = new Map<number, number>();
  const tokensBefore = (c: number): number => {
    if (c <= 0) return 0;
    if (c >= text.length) return ids.length;
    let n = cache.get(c);
    if (n === undefined) {
      n = commonPrefix(tok.encode(text.slice(0, c), { addSpecialTokens: false }), ids);
      cache.set(c, n);
    }
    return n;
  };
  for (const [s, e] of spans) trained.fill(1, tokensBefore(s), tokensBefore(e));
  return { ids, trained };
}

/** Character spans of the assistant turns in the full rendering, or the fallback span. */
export function chatLossSpans(tok: CollateTokenizer, messages: readonly ChatMessage[]): { text: string; spans: [number, number][]; fallback: boolean } {
  const text = tok.applyChatTemplate(messages, { addGenerationPrompt: false });
  const spans: [number, number][] = [];
  let ok = true;
  for (let i = 0; i < messages.length && ok; i++) {
    if (messages[i]!.role !== 'assistant') continue;
    try {
      const before = tok.applyChatTemplate(messages.slice(0, i), { addGenerationPrompt: true });
      const upTo = tok.applyChatTemplate(messages.slice(0, i + 1), { addGenerationPrompt: false });
      ok = upTo.startsWith(before) && text.startsWith(upTo) && upTo.length > before.length;
      if (ok) spans.push([before.length, upTo.length]);
    } catch {
      ok = false; // e.g. a template that refuses a conversation starting with the assistant
    }
  }
  if (ok && spans.length > 0) return { text, spans, fallback: false };
  return { text, spans: [[afterLastUser(tok, messages, text), text.length]], fallback: true };
}

function afterLastUser(tok: CollateTokenizer, messages: readonly ChatMessage[], text: string): number {
  let u = -1;
  for (let i = messages.length - 1; i >= 0; i--) {
    if (messages[i]!.role === 'user') {
      u = i;
      break;
    }
  }
  if (u < 0) return 0;
  try {
    const before = tok.applyChatTemplate(messages.slice(0, u + 1), { addGenerationPrompt: true });
    if (text.startsWith(before)) return before.length;
  } catch {
    /* fall through to locating the content */
  }
  const content = messages[u]!.content;
  const at = content.length > 0 ? text.lastIndexOf(content) : -1;
  return at >= 0 ? at + content.length : 0;
}

/** Every example's tokens and loss flags, concatenated in order. `field` names the set in messages. */
export function tokenizeExamples(examples: readonly Example[], tok: CollateTokenizer, field = 'examples'): TokenStream {
  const { prefix, suffix } = specialsAround(tok);
  const eos = tok.eosTokenId;
  const ids: number[] = [];
  const trained: number[] = [];
  const docStarts: number[] = [];
  let chatFallbacks = 0;
  examples.forEach((ex, i) => {
    let raw: { ids: number[]; trained: Uint8Array };
    let pre: number[] = prefix;
    let suf: number[] = suffix;
    if (ex.kind === 'text') {
      raw = tokenizeSpans(tok, ex.text, [[0, ex.text.length]]);
    } else if (ex.kind === 'completion') {
      const text = ex.prompt + ex.completion;
      raw = tokenizeSpans(tok, text, [[ex.prompt.length, text.length]]);
    } else {
      if (tok.chatTemplate === null) throw invalidArgument(`${field}[${i}].messages: the model has no chat template; send text or prompt + completion`);
      let rendered: ReturnType<typeof chatLossSpans>;
      try {
        rendered = chatLossSpans(tok, ex.messages);
      } catch (e) {
        throw invalidArgument(`${field}[${i}].messages: the chat template refused the messages: ${e instanceof Error ? e.message : String(e)}`);
      }
      if (rendered.fallback) chatFallbacks++;
      raw = tokenizeSpans(tok, rendered.text, rendered.spans);
      pre = [];
      suf = [];
    }
    const lastTrained = raw.trained.length > 0 ? raw.trained[raw.trained.length - 1]! : 0;
    const tail = [...suf];
    const last = tail.length > 0 ? tail[tail.length - 1] : raw.ids[raw.ids.length - 1];
    // A stream is cut, not ended, by the end of the file: HF's group_texts appends nothing there either.
    if (eos !== null && last !== eos && !(ex.kind === 'text' && ex.stream)) tail.push(eos);
    docStarts.push(ids.length);
    for (const id of pre) {
      ids.push(id);
      trained.push(0);
    }
    raw.ids.forEach((id, j) => {
      ids.push(id);
      trained.push(raw.trained[j]!);
    });
    // The end of a document is learned when its last token is (text, completion, a final assistant turn).
    for (const id of tail) {
      ids.push(id);
      trained.push(lastTrained);
    }
  });
  return { ids: Int32Array.from(ids), trained: Uint8Array.from(trained), docStarts, chatFallbacks };
}

export interface PackedSequence {
  /** [seqLength]; padding after `length`. */
  inputIds: Int32Array;
  /** [seqLength]; the next token, or -100. */
  labels: Int32Array;
  /** Real (non-padding) positions. */
  length: number;
}

/** Packs a stream into rows of seqLength (see the header); padding uses padId with label -100. */
export function packSequences(stream: Pick<TokenStream, 'ids' | 'trained'>, seqLength: number, padId: number): PackedSequence[] {
  const { ids, trained } = stream;
  const out: PackedSequence[] = [];
  for (let start = 0; start < ids.length - 1; start += seqLength) {
    const length = Math.min(seqLength, ids.length - 1 - start);
    const inputIds = new Int32Array(seqLength).fill(padId);
    const labels = new Int32Array(seqLength).fill(IGNORE_INDEX);
    for (let i = 0; i < length; i++) {
      inputIds[i] = ids[start + i]!;
      if (trained[start + i + 1]) labels[i] = ids[start + i + 1]!;
    }
    out.push({ inputIds, labels, length });
  }
  return out;
}

export interface MicroBatch {
  /** [batch, seq] int64. */
  inputIds: BigInt64Array;
  /** [batch, seq] int64; -100 = not in the loss. */
  labels: BigInt64Array;
  /** [batch, seq] int64; 1 = real token, 0 = padding (the last row's tail, whole padding rows). */
  attentionMask: BigInt64Array;
  batch: number;
  seqLength: number;
  /** Rows holding data; the rest of the batch is padding (the last micro-batch of an epoch). */
  rows: number;
  /** Labels that are not -100: the loss's denominator (sum over accumulated micro-batches for a step). */
  numTargets: number;
  /** Which packed sequences the rows hold (indices into dataset.train or dataset.evalSet). */
  sequences: number[];
}

/** Stacks sequences into one [batch, seq] micro-batch, padding missing rows. */
export function stackBatch(seqs: readonly PackedSequence[], indices: readonly number[], batch: number, seqLength: number, padId: number): MicroBatch {
  const inputIds = new BigInt64Array(batch * seqLength).fill(BigInt(padId));
  const labels = new BigInt64Array(batch * seqLength).fill(BigInt(IGNORE_INDEX));
  const attentionMask = new BigInt64Array(batch * seqLength);
  let numTargets = 0;
  indices.forEach((s, row) => {
    const seq = seqs[s]!;
    const o = row * seqLength;
    for (let i = 0; i < seqLength; i++) {
      inputIds[o + i] = BigInt(seq.inputIds[i]!);
      const l = seq.labels[i]!;
      labels[o + i] = BigInt(l);
      if (l !== IGNORE_INDEX) numTargets++;
      if (i < seq.length) attentionMask[o + i] = 1n;
    }
  });
  return { inputIds, labels, attentionMask, batch, seqLength, rows: indices.length, numTargets, sequences: [...indices] };
}

/** A seed for (tag, index) derived from the run's seed: independent streams for the split and each epoch. */
export function derivedSeed(seed: number, tag: number, index: number): number {
  const r = new Rng(seed);
  const a = r.nextU32();
  const b = r.nextU32();
  const lo = (a ^ Math.imul(index + 1, 0x9e3779b9) ^ Math.imul(tag, 0x85ebca6b)) >>> 0;
  const hi = (b ^ Math.imul(index + 1, 0xc2b2ae35) ^ tag) & 0x1fffff;
  return hi * 0x1_0000_0000 + lo;
}

const TAG_SHUFFLE = 1;
const TAG_SPLIT = 2;

/** Fisher-Yates with a seeded stream. */
export function shuffledIndices(n: number, seed: number): number[] {
  const order = Array.from({ length: n }, (_, i) => i);
  const rng = new Rng(seed);
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(rng.nextFloat() * (i + 1));
    [order[i], order[j]] = [order[j]!, order[i]!];
  }
  return order;
}

export interface DatasetOptions {
  maxSeqLength: number;
  microBatchSize: number;
  seed: number;
  /** Held-out fraction of the packed training sequences (0 with a separate eval set). */
  evalFraction: number;
}

export interface DatasetStats {
  documents: number;
  tokens: number;
  /** Targets in the loss per epoch. */
  trainTargets: number;
  trainSequences: number;
  evalSequences: number;
  chatFallbacks: number;
}

export class PackedDataset {
  constructor(
    readonly train: PackedSequence[],
    readonly evalSet: PackedSequence[],
    readonly opts: DatasetOptions,
    readonly padId: number,
    readonly stats: DatasetStats,
  ) {}

  get microBatchesPerEpoch(): number {
    return Math.ceil(this.train.length / this.opts.microBatchSize);
  }

  /** The order of the training sequences in an epoch: a pure function of (seed, epoch), so resuming needs only the position. */
  epochOrder(epoch: number): number[] {
    return shuffledIndices(this.train.length, derivedSeed(this.opts.seed, TAG_SHUFFLE, epoch));
  }

  /** Micro-batch `index` of `epoch` (0-based); the last one of an epoch may have padding rows. */
  microBatch(epoch: number, index: number, order = this.epochOrder(epoch)): MicroBatch {
    const B = this.opts.microBatchSize;
    if (!Number.isSafeInteger(index) || index < 0 || index >= this.microBatchesPerEpoch) {
      throw new RangeError(`micro-batch ${index} is outside [0, ${this.microBatchesPerEpoch})`);
    }
    return stackBatch(this.train, order.slice(index * B, (index + 1) * B), B, this.opts.maxSeqLength, this.padId);
  }

  /** The epoch's micro-batches from `from` on (one shuffle for the whole epoch). */
  *microBatches(epoch: number, from = 0): Generator<MicroBatch> {
    const order = this.epochOrder(epoch);
    for (let i = from; i < this.microBatchesPerEpoch; i++) yield this.microBatch(epoch, i, order);
  }

  /** The eval set in order, in micro-batches of the training size. */
  *evalBatches(): Generator<MicroBatch> {
    const B = this.opts.microBatchSize;
    for (let i = 0; i < this.evalSet.length; i += B) {
      const idx = Array.from({ length: Math.min(B, this.evalSet.length - i) }, (_, j) => i + j);
      yield stackBatch(this.evalSet, idx, B, this.opts.maxSeqLength, this.padId);
    }
  }
}

/**
 * Tokenizes, packs and splits the data. The eval split takes eval_fraction of the packed sequences
 * (at least one), chosen by the seed; a separate eval set is packed on its own instead.
 */
export function buildDataset(data: TrainData, tok: CollateTokenizer, opts: DatasetOptions): PackedDataset {
  const padId = tok.eosTokenId ?? 0; // never attended to nor in the loss
  const stream = tokenizeExamples(data.train, tok, 'examples');
  const packed = packSequences(stream, opts.maxSeqLength, padId);
  if (packed.length === 0) throw invalidArgument('examples: the data holds fewer than 2 tokens');
  let train: PackedSequence[];
  let evalSeqs: PackedSequence[];
  let chatFallbacks = stream.chatFallbacks;
  if (data.eval !== null) {
    if (opts.evalFraction > 0) throw invalidArgument(`eval_fraction ${opts.evalFraction}: set eval_fraction or a separate eval set, not both`);
    train = packed;
    const evalStream = tokenizeExamples(data.eval, tok, 'eval_examples');
    chatFallbacks += evalStream.chatFallbacks;
    evalSeqs = packSequences(evalStream, opts.maxSeqLength, padId);
  } else if (opts.evalFraction > 0) {
    const nEval = Math.max(1, Math.round(opts.evalFraction * packed.length));
    if (nEval >= packed.length) {
      throw invalidArgument(`eval_fraction ${opts.evalFraction}: leaves no training data (the data packs into ${packed.length} sequence(s) of max_seq_length ${opts.maxSeqLength})`);
    }
    const order = shuffledIndices(packed.length, derivedSeed(opts.seed, TAG_SPLIT, 0));
    const isEval = new Uint8Array(packed.length);
    for (const i of order.slice(0, nEval)) isEval[i] = 1;
    train = packed.filter((_, i) => !isEval[i]);
    evalSeqs = packed.filter((_, i) => isEval[i]);
  } else {
    train = packed;
    evalSeqs = [];
  }
  let trainTargets = 0;
  for (const s of train) for (const l of s.labels) if (l !== IGNORE_INDEX) trainTargets++;
  if (trainTargets === 0) throw invalidArgument('examples: no token is in the loss (every example is prompt only?)');
  return new PackedDataset(train, evalSeqs, opts, padId, {
    documents: stream.docStarts.length,
    tokens: stream.ids.length,
    trainTargets,
    trainSequences: train.length,
    evalSequences: evalSeqs.length,
    chatFallbacks,
  });
}

export interface StepPlan {
  microBatchesPerEpoch: number;
  /** Optimizer steps per epoch: ceil(micro-batches / accumulation); the last may accumulate fewer. */
  stepsPerEpoch: number;
  totalSteps: number;
}

/** Steps of a run: max_steps when > 0 (epochs repeat as needed), else num_epochs whole epochs. */
export function planSteps(microBatchesPerEpoch: number, cfg: { gradientAccumulationSteps: number; numEpochs: number; maxSteps: number }): StepPlan {
  const stepsPerEpoch = Math.ceil(microBatchesPerEpoch / cfg.gradientAccumulationSteps);
  return { microBatchesPerEpoch, stepsPerEpoch, totalSteps: cfg.maxSteps > 0 ? cfg.maxSteps : cfg.numEpochs * stepsPerEpoch };
}

/**
 * The data position of optimizer step `step` (0-based): its epoch and micro-batch indices. A pure
 * function of the step, so a resumed job continues exactly where the checkpoint left off.
 */
export function microBatchesOfStep(step: number, plan: StepPlan, gradientAccumulationSteps: number): { epoch: number; batchIndices: number[] } {
  const epoch = Math.floor(step / plan.stepsPerEpoch);
  const first = (step % plan.stepsPerEpoch) * gradientAccumulationSteps;
  const last = Math.min(plan.microBatchesPerEpoch, first + gradientAccumulationSteps);
  return { epoch, batchIndices: Array.from({ length: last - first }, (_, i) => first + i) };
}
