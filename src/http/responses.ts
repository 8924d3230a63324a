/** loraplex's generation events -> OpenAI's response and chunk objects (completions and chat). */
import type { TokenLogprob } from '../sampling/index.js';
import type { FinishReason } from '../scheduler/sequence.js';
import type { Tokenizer } from '../tokenizer/index.js';

export type Kind = 'completion' | 'chat';

export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
}

export const usage = (promptTokens: number, completionTokens: number): Usage => ({ prompt_tokens: promptTokens, completion_tokens: completionTokens, total_tokens: promptTokens + completionTokens });

/** A token as logprobs show it: its string in the vocabulary (e.g. `▁there`), as llama.cpp's server does. */
function tokenString(tokenizer: Tokenizer, id: number): string {
  return tokenizer.idToToken(id) ?? '';
}

/** Logprobs of some generated tokens in the endpoint's format; `offset` = text length before the first of them. */
export function logprobsBody(kind: Kind, tokenizer: Tokenizer, lps: readonly TokenLogprob[], texts: readonly string[], offset: number): object {
  if (kind === 'chat') {
    const entry = (id: number, logprob: number) => {
      const token = tokenString(tokenizer, id);
      return { token, logprob, bytes: [...Buffer.from(token, 'utf8')] };
    };
    return { content: lps.map((lp) => ({ ...entry(lp.tokenId, lp.logprob), top_logprobs: lp.top.map((t) => entry(t.tokenId, t.logprob)) })) };
  }
  const textOffset: number[] = [];
  let at = offset;
  for (const t of texts) {
    textOffset.push(at);
    at += t.length;
  }
  return {
    tokens: lps.map((lp) => tokenString(tokenizer, lp.tokenId)),
    token_logprobs: lps.map((lp) => lp.logprob),
    top_logprobs: lps.map((lp) => Object.fromEntries(lp.top.map((t) => [tokenString(tokenizer, t.tokenId), t.logprob]))),
    text_offset: textOffset,
  };
}

export interface Envelope {
  id: string;
  created: number;
  model: string;
}

/** One choice of a whole (non-streamed) response. */
export function responseBody(kind: Kind, env: Envelope, text: string, finish: FinishReason, logprobs: object | null, u: Usage): object {
  const choice = kind === 'chat' ? { index: 0, message: { role: 'assistant', content: text }, logprobs, finish_reason: finish } : { index: 0, text, logprobs, finish_reason: finish };
  return { ...env, object: kind === 'chat' ? 'chat.completion' : 'text_completion', choices: [choice], usage: u };
}

/** One streamed chunk: new text (and its logprobs), or the finish reason. */
export function chunkBody(kind: Kind, env: Envelope, text: string | null, finish: FinishReason | null, logprobs: object | null, opening = false): object {
  const delta = { ...(opening ? { role: 'assistant' } : {}), ...(text !== null ? { content: text } : {}) };
  const choice = kind === 'chat' ? { index: 0, delta, logprobs, finish_reason: finish } : { index: 0, text: text ?? '', logprobs, finish_reason: finish };
  return { ...env, object: kind === 'chat' ? 'chat.completion.chunk' : 'text_completion', choices: [choice] };
}

/** stream_options.include_usage: the last chunk, with no choices. */
export function usageChunk(kind: Kind, env: Envelope, u: Usage): object {
  return { ...env, object: kind === 'chat' ? 'chat.completion.chunk' : 'text_completion', choices: [], usage: u };
}
