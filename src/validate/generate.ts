import { invalidArgument, LoraplexError } from '../errors.js';
import { SamplingParamsError, validateSamplingParams, type SamplingParams } from '../sampling/index.js';
import type { ChatMessage, Tokenizer } from '../tokenizer/index.js';
import type { AdapterKey } from '../adapter-key.js';
import { scopeAdapterId, type Principal } from '../adapters/tenancy.js';

/** Proto-independent shapes of the request fields (src/rpc converts the messages into these). */
export interface PromptInput {
  text?: string;
  chat?: { messages: ChatMessage[]; addGenerationPrompt?: boolean };
  /** Token ids fed as they are (no BOS added). */
  tokenIds?: number[];
}

export interface SamplingInput {
  temperature: number;
  topK: number;
  topP?: number;
  repetitionPenalty?: number;
  seed?: bigint;
  maxNewTokens: number;
  stopTokenIds: number[];
  stop: string[];
  minNewTokens?: number;
  ignoreEos?: boolean;
  /** Alternatives per token; absent = no logprobs. */
  logprobs?: number;
}

export interface GenerateInput {
  prompt: PromptInput;
  /** The client's id; '' for none. */
  adapterId: string;
  adapterScale?: number;
  sampling?: SamplingInput;
}

export interface GenerateLimits {
  maxModelLen: number;
  maxNewTokensDefault: number;
  vocabSize: number;
  maxChatMessages: number;
  maxPromptChars: number;
  /** Tokenizer.maxInputBytesPerToken: with maxModelLen, bounds a prompt's UTF-8 size before it is tokenized. */
  maxInputBytesPerToken: number;
}

export type PromptLimits = Pick<GenerateLimits, 'maxChatMessages' | 'maxPromptChars' | 'maxModelLen' | 'maxInputBytesPerToken' | 'vocabSize'>;

export interface ValidGenerate {
  promptIds: number[];
  params: SamplingParams;
  /** The adapter in the caller's namespace; null for the base model. */
  adapterKey: AdapterKey | null;
  adapterScale: number;
}

/**
 * How messages name each field: the API's own name, so one validation serves gRPC (these names) and the HTTP API
 * (its OpenAI names) with the same rules and limits.
 */
export interface FieldNames {
  text: string;
  chat: string;
  /** The chat's list of messages (`chat.messages` in gRPC). */
  chatMessages: string;
  tokenIds: string;
  /** The prompt as a whole (neither form set, or too long once tokenized). */
  prompt: string;
  adapterScale: string;
  /** SamplingParams fields (src/sampling/params.ts) -> the API's names. */
  sampling: Record<string, string>;
}

export const GRPC_FIELDS: FieldNames = {
  text: 'text',
  chat: 'chat',
  chatMessages: 'chat.messages',
  tokenIds: 'token_ids.ids',
  prompt: 'prompt',
  adapterScale: 'adapter_scale',
  sampling: {
    temperature: 'sampling.temperature',
    topK: 'sampling.top_k',
    topP: 'sampling.top_p',
    repetitionPenalty: 'sampling.repetition_penalty',
    seed: 'sampling.seed',
    maxNewTokens: 'sampling.max_new_tokens',
    stopTokenIds: 'sampling.stop_token_ids',
    stopStrings: 'sampling.stop',
    minNewTokens: 'sampling.min_new_tokens',
    ignoreEos: 'sampling.ignore_eos',
    logprobs: 'sampling.logprobs',
  },
};

/**
 * The cheap checks of a prompt, before anything is tokenized: present, not too many characters, and not so many
 * UTF-8 bytes that its tokens could never fit maxModelLen (each token stands for at most maxInputBytesPerToken
 * bytes; a chat template only adds to the messages). Returns the prompt's size in UTF-8 bytes.
 */
export function checkPromptSize(prompt: PromptInput, limits: PromptLimits, names: FieldNames = GRPC_FIELDS): number {
  const maxBytes = limits.maxModelLen * limits.maxInputBytesPerToken;
  const bound = (field: string, bytes: number) => {
    if (bytes > maxBytes) {
      throw invalidArgument(
        `${field}: ${bytes} UTF-8 bytes exceed the limit of ${maxBytes} (maxModelLen ${limits.maxModelLen} tokens of at most ${limits.maxInputBytesPerToken} bytes each)`,
      );
    }
    return bytes;
  };
  const { text, chat, tokenIds } = names;
  if (prompt.text !== undefined) {
    if (prompt.text.length === 0) throw invalidArgument(`${text}: the prompt must not be empty`);
    if (prompt.text.length > limits.maxPromptChars) throw invalidArgument(`${text}: ${prompt.text.length} characters exceed the limit of ${limits.maxPromptChars}`);
    return bound(text, Buffer.byteLength(prompt.text, 'utf8'));
  }
  if (prompt.chat !== undefined) {
    const { messages } = prompt.chat;
    if (messages.length === 0) throw invalidArgument(`${names.chatMessages}: must hold at least one message`);
    if (messages.length > limits.maxChatMessages) throw invalidArgument(`${names.chatMessages}: ${messages.length} messages exceed the limit of ${limits.maxChatMessages}`);
    messages.forEach((m, i) => {
      if (!m.role) throw invalidArgument(`${names.chatMessages}[${i}].role: must not be empty`);
    });
    const chars = messages.reduce((n, m) => n + m.content.length, 0);
    if (chars > limits.maxPromptChars) throw invalidArgument(`${names.chatMessages}: ${chars} characters exceed the limit of ${limits.maxPromptChars}`);
    return bound(`${names.chatMessages}`, messages.reduce((n, m) => n + Buffer.byteLength(m.content, 'utf8'), 0));
  }
  if (prompt.tokenIds !== undefined) {
    const ids = prompt.tokenIds;
    if (ids.length === 0) throw invalidArgument(`${tokenIds}: the prompt must hold at least one token id`);
    if (ids.length >= limits.maxModelLen) {
      throw invalidArgument(`${tokenIds}: ${ids.length} tokens leave no room to generate within maxModelLen ${limits.maxModelLen}`);
    }
    const bad = ids.findIndex((id) => !Number.isSafeInteger(id) || id < 0 || id >= limits.vocabSize);
    if (bad >= 0) throw invalidArgument(`${tokenIds}[${bad}] ${ids[bad]}: must be a token id in [0, ${limits.vocabSize - 1}]`);
    return 0;
  }
  throw invalidArgument(`${names.prompt}: set ${text}, ${chat} or ${tokenIds}`);
}

/** Prompt -> token ids; the message names the field (text / chat) and the limit. */
export function promptIds(prompt: PromptInput, tokenizer: Tokenizer, limits: PromptLimits, names: FieldNames = GRPC_FIELDS): { ids: number[]; rendered: string } {
  checkPromptSize(prompt, limits, names);
  if (prompt.tokenIds !== undefined) return { ids: [...prompt.tokenIds], rendered: '' };
  if (prompt.text !== undefined) return { ids: tokenizer.encode(prompt.text), rendered: '' };
  if (prompt.chat !== undefined) {
    const { messages } = prompt.chat;
    if (!tokenizer.chatTemplate) throw invalidArgument(`${names.chat}: the served model has no chat template; send the prompt as text`);
    let rendered: string;
    try {
      rendered = tokenizer.applyChatTemplate(messages, { addGenerationPrompt: prompt.chat.addGenerationPrompt ?? true });
    } catch (e) {
      throw invalidArgument(`${names.chat}: the chat template refused the messages: ${e instanceof Error ? e.message : String(e)}`);
    }
    return { ids: tokenizer.encode(rendered, { addSpecialTokens: false }), rendered };
  }
  throw invalidArgument(`${names.prompt}: set ${names.text}, ${names.chat} or ${names.tokenIds}`);
}

/**
 * Validates a request whose prompt is already tokenized (promptIds, here or in a worker). Its adapter_id is checked
 * here, once, as it becomes a key in the caller's namespace.
 */
export function validateGenerate(input: GenerateInput, ids: number[], limits: GenerateLimits, principal: Principal, names: FieldNames = GRPC_FIELDS): ValidGenerate {
  const field = (name: string) => names.sampling[name] ?? name;
  if (ids.length === 0) throw invalidArgument(`${names.text}: the prompt encodes to no tokens`);
  const left = limits.maxModelLen - ids.length;
  if (left < 1) throw invalidArgument(`${names.prompt}: ${ids.length} tokens leave no room to generate within maxModelLen ${limits.maxModelLen}`);
  const adapterKey = input.adapterId === '' ? null : scopeAdapterId(principal, input.adapterId);
  const adapterScale = input.adapterScale ?? 1;
  if (!Number.isFinite(adapterScale) || adapterScale < -8 || adapterScale > 8) throw invalidArgument(`${names.adapterScale} ${adapterScale}: must be in [-8, 8]`);
  if (input.adapterScale !== undefined && adapterKey === null) throw invalidArgument(`${names.adapterScale}: set only together with adapter_id`);
  const s = input.sampling;
  if (s?.seed !== undefined && s.seed > BigInt(Number.MAX_SAFE_INTEGER)) throw invalidArgument(`${field('seed')} ${s.seed}: must be at most ${Number.MAX_SAFE_INTEGER}`);
  const requested = s?.maxNewTokens ?? 0;
  if (requested > left) {
    throw invalidArgument(`${field('maxNewTokens')} ${requested}: exceeds the ${left} tokens left in the context (maxModelLen ${limits.maxModelLen} - ${ids.length} prompt tokens)`);
  }
  const params: SamplingParams = {
    temperature: s?.temperature ?? 0,
    topK: s?.topK ?? 0,
    topP: s?.topP ?? 1,
    repetitionPenalty: s?.repetitionPenalty ?? 1,
    maxNewTokens: requested === 0 ? Math.min(limits.maxNewTokensDefault, left) : requested,
    stopTokenIds: s?.stopTokenIds ?? [],
    stopStrings: s?.stop ?? [],
    ...(s?.seed !== undefined ? { seed: Number(s.seed) } : {}),
    ...(s?.minNewTokens ? { minNewTokens: s.minNewTokens } : {}),
    ...(s?.ignoreEos ? { ignoreEos: true } : {}),
    ...(s?.logprobs !== undefined ? { logprobs: s.logprobs } : {}),
  };
  try {
    validateSamplingParams(params, { maxNewTokensLimit: left, vocabSize: limits.vocabSize });
  } catch (e) {
    if (e instanceof SamplingParamsError) throw invalidArgument(e.message.replace(e.field, field(e.field)));
    throw e instanceof LoraplexError ? e : invalidArgument(String(e));
  }
  return { promptIds: ids, params, adapterKey, adapterScale };
}
