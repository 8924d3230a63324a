/**
 * OpenAI request bodies -> loraplex's domain GenerateInput. Only shapes and types are checked here; every value
 * rule (ranges, limits, the context left) is src/validate's, applied by the same path as gRPC, with messages that
 * use these OpenAI field names (HTTP_FIELDS).
 */
import { invalidArgument } from '../errors.js';
import type { ChatMessage } from '../tokenizer/index.js';
import type { FieldNames, GenerateInput, PromptInput, SamplingInput } from '../validate/generate.js';

/** OpenAI's default max_tokens for /v1/completions (chat has none: the server's default applies). */
export const COMPLETIONS_DEFAULT_MAX_TOKENS = 16;

const SAMPLING_FIELDS = {
  temperature: 'temperature',
  topK: 'top_k',
  topP: 'top_p',
  repetitionPenalty: 'repetition_penalty',
  seed: 'seed',
  maxNewTokens: 'max_tokens',
  stopTokenIds: 'stop_token_ids',
  stopStrings: 'stop',
  minNewTokens: 'min_tokens',
  ignoreEos: 'ignore_eos',
  logprobs: 'logprobs',
};

export const COMPLETION_FIELDS: FieldNames = { text: 'prompt', chat: 'messages', chatMessages: 'messages', tokenIds: 'prompt', prompt: 'prompt', adapterScale: 'adapter_scale', sampling: SAMPLING_FIELDS };
export const CHAT_FIELDS: FieldNames = { ...COMPLETION_FIELDS, sampling: { ...SAMPLING_FIELDS, maxNewTokens: 'max_tokens', logprobs: 'top_logprobs' } };

/** The parts of a request both endpoints share. */
export interface OpenAiRequest {
  /** The base model's name or one of the caller's adapters. */
  model: string;
  input: GenerateInput;
  stream: boolean;
  /** stream_options.include_usage: a last chunk with the token counts. */
  includeUsage: boolean;
  /** Whether to report logprobs at all (chat: logprobs true; completions: logprobs set). */
  logprobs: boolean;
}

type Json = Record<string, unknown>;

/** Typed reads of a JSON body; a wrong type is a 400 naming the field. */
class Fields {
  constructor(private readonly body: Json) {}

  has(name: string): boolean {
    return this.body[name] !== undefined && this.body[name] !== null;
  }
  raw(name: string): unknown {
    return this.body[name];
  }
  number(name: string): number | undefined {
    const v = this.body[name];
    if (v === undefined || v === null) return undefined;
    if (typeof v !== 'number') throw invalidArgument(`${name}: must be a number`);
    return v;
  }
  integer(name: string): number | undefined {
    const v = this.number(name);
    if (v !== undefined && !Number.isSafeInteger(v)) throw invalidArgument(`${name} ${v}: must be an integer`);
    return v;
  }
  boolean(name: string): boolean | undefined {
    const v = this.body[name];
    if (v === undefined || v === null) return undefined;
    if (typeof v !== 'boolean') throw invalidArgument(`${name}: must be true or false`);
    return v;
  }
  string(name: string): string | undefined {
    const v = this.body[name];
    if (v === undefined || v === null) return undefined;
    if (typeof v !== 'string') throw invalidArgument(`${name}: must be a string`);
    return v;
  }
  integers(name: string): number[] | undefined {
    const v = this.body[name];
    if (v === undefined || v === null) return undefined;
    if (!Array.isArray(v) || !v.every((x) => Number.isSafeInteger(x))) throw invalidArgument(`${name}: must be a list of integers`);
    return v as number[];
  }
  /** Refuses an option loraplex does not implement rather than ignoring it. */
  unsupported(name: string, isDefault: (v: unknown) => boolean, why: string): void {
    const v = this.body[name];
    if (v !== undefined && v !== null && !isDefault(v)) throw invalidArgument(`${name}: ${why}`);
  }
}

export function asObject(body: unknown): Json {
  if (body === null || typeof body !== 'object' || Array.isArray(body)) throw invalidArgument('body: must be a JSON object');
  return body as Json;
}

/** The sampling fields both endpoints share (OpenAI's names plus vLLM's extras top_k, min_tokens, ...). */
function sampling(f: Fields, maxTokens: number | undefined, logprobs: number | undefined): SamplingInput {
  f.unsupported('n', (v) => v === 1, 'only 1 is supported (one choice per request)');
  f.unsupported('best_of', (v) => v === 1, 'only 1 is supported');
  f.unsupported('presence_penalty', (v) => v === 0, 'not supported (use repetition_penalty)');
  f.unsupported('frequency_penalty', (v) => v === 0, 'not supported (use repetition_penalty)');
  f.unsupported('logit_bias', (v) => typeof v === 'object' && Object.keys(v as object).length === 0, 'not supported');
  const stop = f.raw('stop');
  let stops: string[] = [];
  if (typeof stop === 'string') stops = [stop];
  else if (Array.isArray(stop) && stop.every((s) => typeof s === 'string')) stops = stop as string[];
  else if (stop !== undefined && stop !== null) throw invalidArgument('stop: must be a string or a list of strings');
  const seed = f.integer('seed');
  const topP = f.number('top_p');
  const repetitionPenalty = f.number('repetition_penalty');
  return {
    // OpenAI's default temperature is 1 (gRPC's is 0, greedy).
    temperature: f.number('temperature') ?? 1,
    topK: f.integer('top_k') ?? 0,
    ...(topP !== undefined ? { topP } : {}),
    ...(repetitionPenalty !== undefined ? { repetitionPenalty } : {}),
    ...(seed !== undefined ? { seed: BigInt(seed) } : {}),
    maxNewTokens: maxTokens ?? 0,
    stopTokenIds: f.integers('stop_token_ids') ?? [],
    stop: stops,
    minNewTokens: f.integer('min_tokens') ?? 0,
    ignoreEos: f.boolean('ignore_eos') ?? false,
    ...(logprobs !== undefined ? { logprobs } : {}),
  };
}

function common(f: Fields): { model: string; stream: boolean; includeUsage: boolean; adapterScale?: number } {
  const model = f.string('model');
  if (model === undefined || model === '') throw invalidArgument('model: required: the served model name or one of your adapters (GET /v1/models)');
  const stream = f.boolean('stream') ?? false;
  const options = f.raw('stream_options');
  if (options !== undefined && options !== null && (typeof options !== 'object' || Array.isArray(options))) throw invalidArgument('stream_options: must be an object');
  const includeUsage = stream && (options as Json | undefined | null)?.['include_usage'] === true;
  const adapterScale = f.number('adapter_scale');
  return { model, stream, includeUsage, ...(adapterScale !== undefined ? { adapterScale } : {}) };
}

/** POST /v1/completions: a prompt as a string or a list of token ids (one prompt per request). */
export function completionRequest(body: unknown): OpenAiRequest {
  const f = new Fields(asObject(body));
  const { model, stream, includeUsage, adapterScale } = common(f);
  f.unsupported('echo', (v) => v === false, 'not supported');
  f.unsupported('suffix', (v) => v === '', 'not supported');
  const logprobs = f.integer('logprobs');
  const maxTokens = f.integer('max_tokens');
  return {
    model,
    stream,
    includeUsage,
    logprobs: logprobs !== undefined,
    input: { prompt: completionPrompt(f.raw('prompt')), adapterId: '', ...(adapterScale !== undefined ? { adapterScale } : {}), sampling: sampling(f, maxTokens ?? COMPLETIONS_DEFAULT_MAX_TOKENS, logprobs) },
  };
}

function completionPrompt(p: unknown): PromptInput {
  // OpenAI also takes a list of one prompt; a batch of prompts is several requests here.
  const one = Array.isArray(p) && p.length === 1 && (typeof p[0] === 'string' || Array.isArray(p[0])) ? p[0] : p;
  if (typeof one === 'string') return { text: one };
  if (Array.isArray(one) && one.every((x) => typeof x === 'number')) {
    if (!one.every((x) => Number.isSafeInteger(x))) throw invalidArgument('prompt: token ids must be integers');
    return { tokenIds: one as number[] };
  }
  if (Array.isArray(p) && p.length > 1) throw invalidArgument(`prompt: ${p.length} prompts given; send one prompt (a string or a list of token ids) per request`);
  throw invalidArgument('prompt: required: a string or a list of token ids');
}

/** POST /v1/chat/completions: messages rendered with the model's chat template. */
export function chatRequest(body: unknown): OpenAiRequest {
  const f = new Fields(asObject(body));
  const { model, stream, includeUsage, adapterScale } = common(f);
  const wantLogprobs = f.boolean('logprobs') ?? false;
  const top = f.integer('top_logprobs');
  if (top !== undefined && !wantLogprobs) throw invalidArgument('top_logprobs: set only together with logprobs: true');
  // max_completion_tokens is OpenAI's newer name for max_tokens.
  const maxTokens = f.integer('max_completion_tokens') ?? f.integer('max_tokens');
  return {
    model,
    stream,
    includeUsage,
    logprobs: wantLogprobs,
    input: { prompt: { chat: { messages: chatMessages(f.raw('messages')) } }, adapterId: '', ...(adapterScale !== undefined ? { adapterScale } : {}), sampling: sampling(f, maxTokens, wantLogprobs ? (top ?? 0) : undefined) },
  };
}

function chatMessages(raw: unknown): ChatMessage[] {
  if (!Array.isArray(raw)) throw invalidArgument('messages: required: a list of {role, content}');
  return raw.map((m, i) => {
    if (m === null || typeof m !== 'object' || Array.isArray(m)) throw invalidArgument(`messages[${i}]: must be an object {role, content}`);
    const { role, content } = m as Json;
    if (typeof role !== 'string') throw invalidArgument(`messages[${i}].role: must be a string`);
    return { role, content: messageText(content, i) };
  });
}

/** A message's content: a string, or a list of parts of which only text parts are understood. */
function messageText(content: unknown, i: number): string {
  if (typeof content === 'string') return content;
  if (content === null || content === undefined) return '';
  if (Array.isArray(content)) {
    return content
      .map((part, j) => {
        const p = part as Json | null;
        if (p?.['type'] !== 'text' || typeof p['text'] !== 'string') throw invalidArgument(`messages[${i}].content[${j}]: only text parts ({type: "text", text}) are supported`);
        return p['text'];
      })
      .join('');
  }
  throw invalidArgument(`messages[${i}].content: must be a string or a list of text parts`);
}
