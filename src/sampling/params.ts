export interface SamplingParams {
  /** 0 = greedy (argmax). */
  temperature: number;
  /** Keep the k most likely tokens; 0 = off. */
  topK: number;
  /** Nucleus mass in (0, 1]; 1 = off. */
  topP: number;
  /** HF semantics over prompt + generated ids: positive logits divided, negative multiplied; 1 = off. */
  repetitionPenalty: number;
  /** Same seed + same logits -> same tokens. Absent: a random seed. */
  seed?: number;
  maxNewTokens: number;
  stopTokenIds: number[];
  /** Not included in the output (see StopStringMatcher). */
  stopStrings: string[];
  /** Stop token ids cannot be sampled before this many tokens (vLLM's min_tokens); absent = 0. */
  minNewTokens?: number;
  /** The model's eos ids do not end generation; stopTokenIds still do. */
  ignoreEos?: boolean;
  /** Report each token's log-probability and this many top alternatives; absent = no logprobs. */
  logprobs?: number;
}

/** The most alternatives a request may ask logprobs for (vLLM's max_logprobs is 20 too). */
export const MAX_LOGPROBS = 20;

export interface SamplingLimits {
  maxNewTokensLimit: number;
  /** When given, stop token ids must be < vocabSize. */
  vocabSize?: number;
  /** Default 16. */
  maxStopStrings?: number;
  /** In UTF-16 units; default 256 (held-back text is at most this long). */
  maxStopStringLength?: number;
}

/** A bad request parameter; `field` names it, the message says the allowed range. */
export class SamplingParamsError extends RangeError {
  override name = 'SamplingParamsError';
  constructor(
    readonly field: string,
    message: string,
  ) {
    super(message);
  }
}

function fail(field: string, value: unknown, rule: string): never {
  const shown = typeof value === 'string' ? JSON.stringify(value) : String(value);
  throw new SamplingParamsError(field, `${field} ${shown}: ${rule}`);
}

const isNum = (v: unknown): v is number => typeof v === 'number' && Number.isFinite(v);
const isInt = (v: unknown): v is number => typeof v === 'number' && Number.isSafeInteger(v);

/** Throws SamplingParamsError for the first invalid field (values may come from untyped JSON). */
export function validateSamplingParams(p: SamplingParams, limits: SamplingLimits): void {
  if (!isNum(p.temperature) || p.temperature < 0) fail('temperature', p.temperature, 'must be a finite number >= 0 (0 = greedy)');
  if (!isInt(p.topK) || p.topK < 0) fail('topK', p.topK, 'must be an integer >= 0 (0 = off)');
  if (!isNum(p.topP) || p.topP <= 0 || p.topP > 1) fail('topP', p.topP, 'must be in (0, 1] (1 = off)');
  if (!isNum(p.repetitionPenalty) || p.repetitionPenalty <= 0) {
    fail('repetitionPenalty', p.repetitionPenalty, 'must be a finite number > 0 (1 = off)');
  }
  if (p.seed !== undefined && (!isInt(p.seed) || p.seed < 0)) {
    fail('seed', p.seed, `must be an integer in [0, ${Number.MAX_SAFE_INTEGER}]`);
  }
  const maxNew = limits.maxNewTokensLimit;
  if (!isInt(p.maxNewTokens) || p.maxNewTokens < 1 || p.maxNewTokens > maxNew) {
    fail('maxNewTokens', p.maxNewTokens, `must be an integer in [1, ${maxNew}]`);
  }
  const minNew = p.minNewTokens ?? 0;
  if (!isInt(minNew) || minNew < 0 || minNew > p.maxNewTokens) fail('minNewTokens', minNew, `must be an integer in [0, ${p.maxNewTokens}] (at most maxNewTokens)`);
  if (p.ignoreEos !== undefined && typeof p.ignoreEos !== 'boolean') fail('ignoreEos', p.ignoreEos, 'must be true or false');
  if (p.logprobs !== undefined && (!isInt(p.logprobs) || p.logprobs < 0 || p.logprobs > MAX_LOGPROBS)) {
    fail('logprobs', p.logprobs, `must be an integer in [0, ${MAX_LOGPROBS}] (the server's limit on alternatives)`);
  }
  if (!Array.isArray(p.stopTokenIds)) fail('stopTokenIds', p.stopTokenIds, 'must be an array of token ids');
  const vocab = limits.vocabSize;
  for (const id of p.stopTokenIds) {
    if (!isInt(id) || id < 0 || (vocab !== undefined && id >= vocab)) {
      fail('stopTokenIds', id, vocab !== undefined ? `must be a token id in [0, ${vocab - 1}]` : 'must be an integer >= 0');
    }
  }
  const maxStops = limits.maxStopStrings ?? 16;
  const maxLen = limits.maxStopStringLength ?? 256;
  if (!Array.isArray(p.stopStrings)) fail('stopStrings', p.stopStrings, 'must be an array of strings');
  if (p.stopStrings.length > maxStops) {
    throw new SamplingParamsError('stopStrings', `stopStrings: ${p.stopStrings.length} given, at most ${maxStops} allowed`);
  }
  for (const s of p.stopStrings) {
    if (typeof s !== 'string' || s.length === 0 || s.length > maxLen) {
      fail('stopStrings', s, `each must be a non-empty string of at most ${maxLen} characters`);
    }
  }
}
