/**
 * The one path of a generation request from its domain input to the scheduler: tokenize (inline or in the pool),
 * validate, resolve the adapter or mix in the caller's namespace, submit. The gRPC Generate handler and the HTTP
 * API (src/http) both call it, so limits, messages and behaviour cannot drift apart.
 */
import { invalidArgument } from '../errors.js';
import type { AdapterKey } from '../adapter-key.js';
import type { MixSource } from '../adapters/manager.js';
import { scopeAdapterId, type Principal } from '../adapters/tenancy.js';
import type { GenerationEvent } from '../scheduler/scheduler.js';
import { checkPromptSize, GRPC_FIELDS, promptIds, validateGenerate, type FieldNames, type GenerateInput, type GenerateLimits, type PromptInput } from '../validate/generate.js';
import type { App } from './app.js';

/** Bounds on request size that no model setting implies. */
const MAX_CHAT_MESSAGES = 256;
const MAX_PROMPT_CHARS = 1 << 20;
/** Prompts up to this size tokenize on the event loop (well under a millisecond); larger ones in the pool. */
const INLINE_TOKENIZE_BYTES = 16 * 1024;
/** Sources of one merge or mix. */
const MAX_WEIGHTED_ADAPTERS = 64;

/** One adapter of a mix or merge, as the client named it. */
export interface WeightedAdapterInput {
  adapterId: string;
  /** Unset = 1. */
  weight?: number | undefined;
}

export function generateLimits(app: App): GenerateLimits {
  return {
    maxModelLen: app.maxModelLen,
    maxNewTokensDefault: app.cfg.maxNewTokensDefault,
    vocabSize: app.compiled.spec.vocabSize,
    maxChatMessages: MAX_CHAT_MESSAGES,
    maxPromptChars: MAX_PROMPT_CHARS,
    maxInputBytesPerToken: app.tokenizer.maxInputBytesPerToken,
  };
}

/** Cheap size limits first, then the tokenizer: inline for small prompts, in the worker pool for large ones. */
export async function tokenizePrompt(app: App, prompt: PromptInput, names: FieldNames = GRPC_FIELDS): Promise<{ ids: number[]; rendered: string }> {
  const lim = generateLimits(app);
  const bytes = checkPromptSize(prompt, lim, names);
  if (bytes <= INLINE_TOKENIZE_BYTES) return promptIds(prompt, app.tokenizer, lim, names);
  return app.pool.run('tokenizePrompt', { modelDir: app.cfg.modelDir, prompt, limits: lim, names });
}

export interface GenerationCall {
  input: GenerateInput;
  /** A weighted mix instead of input.adapterId; empty for none. */
  mix: readonly WeightedAdapterInput[];
  principal: Principal;
  signal: AbortSignal;
  /** How messages name the fields (default: the gRPC names). */
  names?: FieldNames;
  /** Adds fields to the call's request-log line. */
  annotate(fields: Record<string, unknown>): void;
}

export interface StartedGeneration {
  events: AsyncIterable<GenerationEvent>;
  promptIds: number[];
}

/** Validates and queues one request; throws a LoraplexError naming the field for a bad one. */
export async function startGeneration(app: App, call: GenerationCall): Promise<StartedGeneration> {
  const { input, mix, principal } = call;
  const names = call.names ?? GRPC_FIELDS;
  if (mix.length > 0 && input.adapterId !== '') throw invalidArgument('adapters: set either adapter_id or adapters (a mix), not both');
  const { ids } = await tokenizePrompt(app, input.prompt, names);
  const { promptIds: validIds, params, adapterScale, adapterKey: namedKey } = validateGenerate(input, ids, generateLimits(app), principal, names);
  const adapterKey = mix.length > 0 ? await mixKey(app, principal, mix) : namedKey;
  call.annotate({
    adapterId: input.adapterId || null,
    ...(mix.length ? { mixOf: mix.length } : {}),
    promptTokens: validIds.length,
    ...(app.cfg.logPrompts ? { prompt: input.prompt } : {}),
  });
  // Errors name the adapter as the client did, never by its internal key.
  const adapterLabel = mix.length > 0 ? `adapters (${mix.map((w) => JSON.stringify(w.adapterId)).join(', ')})` : namedKey === null ? undefined : `adapter_id ${JSON.stringify(input.adapterId)}`;
  const events = app.scheduler.submit({
    promptIds: validIds,
    params,
    adapterScale,
    adapterKey,
    signal: call.signal,
    ...(principal.tenant ? { tenant: principal.tenant } : {}),
    ...(adapterLabel ? { adapterLabel } : {}),
  });
  return { events, promptIds: validIds };
}

export function checkWeights(list: readonly WeightedAdapterInput[], field: string): void {
  if (list.length > MAX_WEIGHTED_ADAPTERS) throw invalidArgument(`${field}: ${list.length} adapters exceed the limit of ${MAX_WEIGHTED_ADAPTERS}`);
  list.forEach((w, i) => {
    const weight = w.weight ?? 1;
    if (!Number.isFinite(weight) || Math.abs(weight) > 1000) throw invalidArgument(`${field}[${i}].weight ${weight}: must be a finite number in [-1000, 1000]`);
  });
}

/**
 * A per-request mix: the key of a virtual adapter that is the exact cat merge of the sources (built on first use,
 * cached with the loaded adapters). NOT_FOUND for a missing source; INVALID_ARGUMENT when the ranks add up to more
 * than maxLoraRank (the mix must fit one slot).
 */
async function mixKey(app: App, principal: Principal, list: readonly WeightedAdapterInput[]): Promise<AdapterKey> {
  checkWeights(list, 'adapters');
  const seen = new Set<AdapterKey>();
  const sources = list.map((w): MixSource => {
    const adapterKey = scopeAdapterId(principal, w.adapterId);
    if (seen.has(adapterKey)) throw invalidArgument(`adapters: adapter_id "${w.adapterId}" is given twice; give it once with the summed weight`);
    seen.add(adapterKey);
    return { adapterKey, weight: w.weight ?? 1 };
  });
  const infos = await Promise.all(sources.map((s) => app.adapters.info(s.adapterKey)));
  const rank = infos.reduce((sum, info) => sum + info.rank, 0);
  if (rank > app.cfg.maxLoraRank) throw invalidArgument(`adapters: the mix has rank ${rank} (the sum of the ranks), over maxLoraRank ${app.cfg.maxLoraRank}`);
  return app.adapters.defineMix(sources);
}
