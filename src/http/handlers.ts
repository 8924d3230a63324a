/**
 * The OpenAI-compatible endpoints. Each request goes through the same generation path as gRPC's Generate
 * (src/rpc/generation.ts: tokenize, validate, adapter, scheduler); this file only maps `model` to the base or an
 * adapter and writes OpenAI's JSON or Server-Sent Events.
 */
import { randomUUID } from 'node:crypto';
import type { ServerResponse } from 'node:http';
import { LoraplexError } from '../errors.js';
import { scopeAdapterId, visibleAdapters, type Principal } from '../adapters/tenancy.js';
import type { App } from '../rpc/app.js';
import type { CallContext } from '../rpc/bridge.js';
import { startGeneration } from '../rpc/generation.js';
import { annotate } from '../rpc/request-log.js';
import type { TokenLogprob } from '../sampling/index.js';
import type { FinishReason } from '../scheduler/sequence.js';
import { CHAT_FIELDS, chatRequest, COMPLETION_FIELDS, completionRequest, type OpenAiRequest } from './request.js';
import { chunkBody, logprobsBody, responseBody, usage, usageChunk, type Envelope, type Kind } from './responses.js';
import { sendJson, SseStream } from './wire.js';

/** `model` -> '' for the base model, else the caller's adapter id (NOT_FOUND naming the model otherwise). */
async function resolveModel(app: App, principal: Principal, model: string): Promise<string> {
  if (model === app.cfg.servedModelName) return '';
  const unknown = () => new LoraplexError('NOT_FOUND', `model ${JSON.stringify(model)}: neither the served model ${JSON.stringify(app.cfg.servedModelName)} nor one of your adapters (GET /v1/models lists them)`);
  let key;
  try {
    key = scopeAdapterId(principal, model);
  } catch {
    throw unknown(); // not even a valid adapter id
  }
  try {
    await app.adapters.info(key);
  } catch (e) {
    if (e instanceof LoraplexError && e.code === 'NOT_FOUND') throw unknown();
    throw e;
  }
  return model;
}

/** GET /v1/models: the base model, then the caller's adapters. */
export async function listModels(app: App, ctx: CallContext, res: ServerResponse): Promise<void> {
  const created = Math.floor(Date.now() / 1000);
  const base = app.cfg.servedModelName;
  const adapters = visibleAdapters(ctx.principal, await app.adapters.list()).sort((a, b) => a.adapterId.localeCompare(b.adapterId));
  sendJson(res, 200, {
    object: 'list',
    data: [
      { id: base, object: 'model', created, owned_by: 'loraplex', root: base, parent: null, max_model_len: app.maxModelLen },
      ...adapters.map((a) => ({ id: a.adapterId, object: 'model', created, owned_by: ctx.principal.tenant || 'loraplex', root: a.adapterId, parent: base, max_model_len: app.maxModelLen })),
    ],
  });
}

export const completions = (app: App, ctx: CallContext, body: unknown, res: ServerResponse) => generate(app, ctx, 'completion', completionRequest(body), res);

export async function chatCompletions(app: App, ctx: CallContext, body: unknown, res: ServerResponse): Promise<void> {
  const req = chatRequest(body);
  if (!app.tokenizer.chatTemplate) {
    throw new LoraplexError('INVALID_ARGUMENT', `messages: the served model ${JSON.stringify(app.cfg.servedModelName)} has no chat template; use /v1/completions with a text prompt`);
  }
  return generate(app, ctx, 'chat', req, res);
}

async function generate(app: App, ctx: CallContext, kind: Kind, req: OpenAiRequest, res: ServerResponse): Promise<void> {
  const adapterId = await resolveModel(app, ctx.principal, req.model);
  annotate(ctx, { model: req.model, stream: req.stream });
  const { events } = await startGeneration(app, {
    input: { ...req.input, adapterId },
    mix: [],
    principal: ctx.principal,
    signal: ctx.signal,
    names: kind === 'chat' ? CHAT_FIELDS : COMPLETION_FIELDS,
    annotate: (fields) => annotate(ctx, fields),
  });
  const env: Envelope = { id: `${kind === 'chat' ? 'chatcmpl' : 'cmpl'}-${randomUUID()}`, created: Math.floor(Date.now() / 1000), model: req.model };
  const logText = app.cfg.logPrompts;
  const lps: TokenLogprob[] = [];
  const texts: string[] = [];
  let text = '';
  let generated = 0;
  // Headers wait for the first event, so an error before any token (e.g. the adapter fails to load) still gets its status.
  // (Typed by assertion: openStream assigns it, which TypeScript's narrowing of a `let` to null does not see.)
  let sse = null as SseStream | null;
  const openStream = async (): Promise<SseStream> => {
    if (sse) return sse;
    sse = new SseStream(res, ctx.signal);
    if (kind === 'chat') await sse.send(chunkBody(kind, env, '', null, null, true));
    return sse;
  };
  try {
    for await (const e of events) {
      if (e.type === 'token') {
        generated += e.tokenIds.length;
        const eventLogprobs = req.logprobs && e.logprobs ? e.logprobs : null;
        // The text an event completes belongs to its last token.
        const tokenTexts = e.tokenIds.map((_, i, all) => (i === all.length - 1 ? e.text : ''));
        if (req.stream) {
          const stream = await openStream();
          const chunkLogprobs = eventLogprobs ? logprobsBody(kind, app.tokenizer, eventLogprobs, tokenTexts, text.length) : null;
          if (e.text || chunkLogprobs) await stream.send(chunkBody(kind, env, e.text, null, chunkLogprobs));
        } else if (eventLogprobs) {
          lps.push(...eventLogprobs);
          texts.push(...tokenTexts);
        }
        text += e.text;
      } else {
        annotate(ctx, { finishReason: e.reason, timings: e.timings });
        const u = usage(e.promptTokens, e.generatedTokens);
        if (!req.stream) {
          sendJson(res, 200, responseBody(kind, env, text, e.reason, req.logprobs ? logprobsBody(kind, app.tokenizer, lps, texts, 0) : null, u));
          return;
        }
        const stream = await openStream();
        await stream.send(chunkBody(kind, env, null, e.reason satisfies FinishReason, null));
        if (req.includeUsage) await stream.send(usageChunk(kind, env, u));
        stream.done();
      }
    }
  } catch (err) {
    // Once the stream has begun, an error can only travel in it (as vLLM does); the status stays 200.
    sse?.fail(err);
    throw err;
  } finally {
    annotate(ctx, { generatedTokens: generated, ...(logText ? { text } : {}) });
  }
}
