/**
 * The OpenAI-compatible HTTP API against the real server, with the official `openai` package as the client:
 * completions and chat, streamed and not, an adapter as `model`, logprobs and the Generate options, errors with
 * OpenAI's JSON and fitting statuses, tenants and metrics. Each answer is checked against gRPC Generate with the
 * same request: the two front doors share one path, so they must agree token for token.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { cpSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import OpenAI from 'openai';
import type { MessageInitShape } from '@bufbuild/protobuf';
import { makeRandomAdapter, writePeftAdapter } from '../../src/adapters/peft.js';
import { readModelSpec } from '../../src/models/config.js';
import { SIMPLE_CHAT_TEMPLATE } from '../../src/models/synthetic-tokenizer.js';
import type { GenerateRequestSchema } from '../../src/gen/loraplex/v1/inference_pb.js';
import { collect, startTestServer, type TestServer } from '../helpers/server.js';
import { STORIES, tempDir } from '../helpers/engine.js';

type Request = MessageInitShape<typeof GenerateRequestSchema>;

const KEYS = { acme: 'acme-user-key-0123456789abcdef', globex: 'globex-user-key-0123456789abcdef' } as const;
const ADAPTER = 'storyteller';
const BASE = 'stories260K';

let s: TestServer;
let acme: OpenAI;
let globex: OpenAI;

/** stories260K with a chat template added, so /v1/chat/completions has something to render. */
function chatModelDir(): string {
  const dir = join(tempDir('chat-model'), BASE);
  cpSync(STORIES, dir, { recursive: true });
  const cfgPath = join(dir, 'tokenizer_config.json');
  writeFileSync(cfgPath, JSON.stringify({ ...JSON.parse(readFileSync(cfgPath, 'utf8')), chat_template: SIMPLE_CHAT_TEMPLATE }));
  return dir;
}

before(async () => {
  const keysDir = tempDir('http-keys');
  const apiKeysFile = join(keysDir, 'keys.yaml');
  writeFileSync(apiKeysFile, `keys:\n  - { key: ${KEYS.acme}, tenant: acme, role: user }\n  - { key: ${KEYS.globex}, tenant: globex, role: user }\n`);
  const modelDir = chatModelDir();
  s = await startTestServer({ modelDir, source: modelDir, auth: 'required', apiKeysFile }, undefined, { httpApi: true });
  const spec = readModelSpec(modelDir);
  writePeftAdapter(join(s.adapterRoot, 'acme', ADAPTER), makeRandomAdapter(spec, { r: 8, alpha: 16, targetModules: ['q_proj', 'v_proj', 'down_proj'], seed: 5, bStd: 0.3 }));
  // No retries: a test sees each status as the server sent it.
  acme = new OpenAI({ baseURL: s.httpUrl!, apiKey: KEYS.acme, maxRetries: 0 });
  globex = new OpenAI({ baseURL: s.httpUrl!, apiKey: KEYS.globex, maxRetries: 0 });
});
after(() => s.close());

function asAcme() {
  const metadata = new grpc.Metadata();
  metadata.set('authorization', `Bearer ${KEYS.acme}`);
  return { metadata };
}

/** gRPC Generate as acme, with per-token logprobs collected. */
async function grpcGenerate(req: Request) {
  const logprobs: { tokenId: number; logprob: number; top: number[] }[] = [];
  const out = await collect(
    (async function* () {
      for await (const m of s.inference.generate(req, asAcme())) {
        if (m.event.case === 'delta') logprobs.push(...m.event.value.logprobs.map((l) => ({ tokenId: l.tokenId, logprob: l.logprob, top: l.top.map((t) => t.logprob) })));
        yield m;
      }
    })(),
  );
  return { ...out, logprobs };
}

const text = (value: string) => ({ case: 'text' as const, value });

test('completions: greedy text and usage equal gRPC Generate; streamed chunks add up to the same text', async () => {
  const ref = await grpcGenerate({ prompt: text('Once upon a time'), sampling: { maxNewTokens: 24 } });
  const done = await acme.completions.create({ model: BASE, prompt: 'Once upon a time', max_tokens: 24, temperature: 0 });
  assert.equal(done.object, 'text_completion');
  assert.equal(done.model, BASE);
  assert.equal(done.choices[0]!.text, ref.text);
  assert.equal(done.choices[0]!.finish_reason, 'length');
  assert.deepEqual(done.usage, { prompt_tokens: 5, completion_tokens: 24, total_tokens: 29 });

  const stream = await acme.completions.create({ model: BASE, prompt: 'Once upon a time', max_tokens: 24, temperature: 0, stream: true, stream_options: { include_usage: true } });
  let streamed = '';
  const finishes: (string | null)[] = [];
  let usage: OpenAI.CompletionUsage | undefined;
  for await (const chunk of stream) {
    for (const c of chunk.choices) {
      streamed += c.text;
      finishes.push(c.finish_reason);
    }
    if (chunk.usage) usage = chunk.usage;
  }
  assert.equal(streamed, ref.text);
  assert.equal(finishes.at(-1), 'length');
  assert.ok(finishes.slice(0, -1).every((f) => f === null));
  assert.equal(usage?.completion_tokens, 24);
});

test('an adapter as model: its own text (not the base model\'s), the same as gRPC with adapter_id, streamed or not', async () => {
  const ref = await grpcGenerate({ prompt: text('The cat'), adapterId: ADAPTER, sampling: { maxNewTokens: 20 } });
  const base = await grpcGenerate({ prompt: text('The cat'), sampling: { maxNewTokens: 20 } });
  assert.notEqual(ref.text, base.text, 'the adapter changes the output');
  const done = await acme.completions.create({ model: ADAPTER, prompt: 'The cat', max_tokens: 20, temperature: 0 });
  assert.equal(done.choices[0]!.text, ref.text);
  let streamed = '';
  for await (const chunk of await acme.completions.create({ model: ADAPTER, prompt: 'The cat', max_tokens: 20, temperature: 0, stream: true })) streamed += chunk.choices[0]?.text ?? '';
  assert.equal(streamed, ref.text);
});

test('the stream is OpenAI\'s Server-Sent Events, ending with data: [DONE]', async () => {
  const res = await fetch(`${s.httpUrl}/completions`, {
    method: 'POST',
    headers: { authorization: `Bearer ${KEYS.acme}`, 'content-type': 'application/json' },
    body: JSON.stringify({ model: BASE, prompt: 'One day', max_tokens: 4, temperature: 0, stream: true }),
  });
  assert.equal(res.status, 200);
  assert.match(res.headers.get('content-type') ?? '', /^text\/event-stream/);
  const events = (await res.text()).split('\n\n').filter((e) => e !== '');
  assert.ok(events.every((e) => e.startsWith('data: ')), JSON.stringify(events));
  assert.equal(events.at(-1), 'data: [DONE]');
  assert.equal(JSON.parse(events.at(-2)!.slice(6)).choices[0].finish_reason, 'length');
});

test('chat: rendered with the chat template; text and logprobs equal gRPC chat, streamed or not', async () => {
  const messages = [{ role: 'system', content: 'Tell a story.' }, { role: 'user', content: 'A dog and a ball' }] as const;
  const ref = await grpcGenerate({ prompt: { case: 'chat', value: { messages: [...messages] } }, sampling: { maxNewTokens: 16, logprobs: 2 } });
  const done = await acme.chat.completions.create({ model: BASE, messages: [...messages], max_tokens: 16, temperature: 0, logprobs: true, top_logprobs: 2 });
  assert.equal(done.object, 'chat.completion');
  assert.equal(done.choices[0]!.message.role, 'assistant');
  assert.equal(done.choices[0]!.message.content, ref.text);
  const content = done.choices[0]!.logprobs!.content!;
  assert.equal(content.length, ref.logprobs.length);
  content.forEach((c, i) => {
    // The wire carries float32 from gRPC and a JSON double from HTTP: the same number once rounded.
    assert.equal(Math.fround(c.logprob), ref.logprobs[i]!.logprob);
    assert.deepEqual(c.top_logprobs.map((t) => Math.fround(t.logprob)), ref.logprobs[i]!.top);
  });

  let streamed = '';
  let role: string | undefined;
  for await (const chunk of await acme.chat.completions.create({ model: ADAPTER, messages: [...messages], max_tokens: 16, temperature: 0, stream: true })) {
    role ??= chunk.choices[0]?.delta.role;
    streamed += chunk.choices[0]?.delta.content ?? '';
  }
  const adapterRef = await grpcGenerate({ prompt: { case: 'chat', value: { messages: [...messages] } }, adapterId: ADAPTER, sampling: { maxNewTokens: 16 } });
  assert.equal(role, 'assistant');
  assert.equal(streamed, adapterRef.text);
});

test('completions: token-id prompts, logprobs, seed, stop, min_tokens and ignore_eos map onto Generate\'s options', async () => {
  const ids = [1, 403, 407, 261, 378];
  const ref = await grpcGenerate({ prompt: { case: 'tokenIds', value: { ids } }, sampling: { maxNewTokens: 12, temperature: 0.8, seed: 11n, logprobs: 3, minNewTokens: 12, ignoreEos: true } });
  // vLLM's extras (min_tokens, ignore_eos) ride in the body as they do with vLLM.
  const done = await acme.completions.create({ model: BASE, prompt: ids, max_tokens: 12, temperature: 0.8, seed: 11, logprobs: 3, min_tokens: 12, ignore_eos: true } as OpenAI.CompletionCreateParamsNonStreaming);
  assert.equal(done.choices[0]!.text, ref.text);
  const lp = done.choices[0]!.logprobs!;
  assert.deepEqual(lp.token_logprobs!.map((x) => Math.fround(x)), ref.logprobs.map((l) => l.logprob));
  assert.ok(lp.top_logprobs!.every((t) => Object.keys(t).length === 3));
  assert.equal(lp.tokens!.length, 12);
  assert.equal(done.usage?.prompt_tokens, ids.length);
  const streamedLogprobs: number[] = [];
  const params = { model: BASE, prompt: ids, max_tokens: 12, temperature: 0.8, seed: 11, logprobs: 3, min_tokens: 12, ignore_eos: true, stream: true };
  for await (const chunk of await acme.completions.create(params as OpenAI.CompletionCreateParamsStreaming)) streamedLogprobs.push(...(chunk.choices[0]?.logprobs?.token_logprobs ?? []));
  assert.deepEqual(streamedLogprobs, lp.token_logprobs);

  // A stop string ends the text before it, as gRPC's stop does.
  const cut = ref.text.indexOf(' ', 3);
  const stop = ref.text.slice(cut, cut + 2);
  const stopped = await acme.completions.create({ model: BASE, prompt: ids, max_tokens: 12, temperature: 0.8, seed: 11, stop: [stop], ignore_eos: true } as OpenAI.CompletionCreateParamsNonStreaming);
  assert.equal(stopped.choices[0]!.finish_reason, 'stop');
  assert.equal(stopped.choices[0]!.text, ref.text.slice(0, ref.text.indexOf(stop)));
});

test('GET /v1/models: the served model and the caller\'s adapters only', async () => {
  const ids = async (client: OpenAI) => (await client.models.list()).data.map((m) => m.id);
  assert.deepEqual(await ids(acme), [BASE, ADAPTER]);
  assert.deepEqual(await ids(globex), [BASE]);
});

test('errors: OpenAI\'s JSON with 400 naming the field, 401, 404 naming the model; another tenant\'s adapter does not exist', async () => {
  const fails = async (p: Promise<unknown>) => {
    try {
      await p;
    } catch (e) {
      assert.ok(e instanceof OpenAI.APIError, String(e));
      // The SDK prefixes its own message with the status; the body's error is the server's.
      const error = e.error as { message: string; type: string; param: string | null; code: string | null };
      assert.equal(e.type, error.type);
      return Object.assign(e, { serverMessage: error.message });
    }
    assert.fail('the request succeeded');
  };
  const tooLong = await fails(acme.completions.create({ model: BASE, prompt: 'Once upon a time', max_tokens: 1000 }));
  assert.equal(tooLong.status, 400);
  assert.equal(tooLong.type, 'invalid_request_error');
  assert.equal(tooLong.param, 'max_tokens');
  assert.match(tooLong.serverMessage, /^max_tokens 1000: exceeds the 251 tokens left in the context \(maxModelLen 256 - 5 prompt tokens\)/);

  const hot = await fails(acme.chat.completions.create({ model: BASE, messages: [{ role: 'user', content: 'hi' }], temperature: -1 }));
  assert.equal(hot.status, 400);
  assert.equal(hot.param, 'temperature');

  const top = await fails(acme.chat.completions.create({ model: BASE, messages: [{ role: 'user', content: 'hi' }], logprobs: true, top_logprobs: 21 }));
  assert.match(top.serverMessage, /^top_logprobs 21: must be an integer in \[0, 20\]/);

  const badKey = await fails(new OpenAI({ baseURL: s.httpUrl!, apiKey: 'wrong-key-0123456789abcdef', maxRetries: 0 }).models.list());
  assert.equal(badKey.status, 401);
  assert.ok(badKey instanceof OpenAI.AuthenticationError);

  const missing = await fails(acme.completions.create({ model: 'no-such-model', prompt: 'x' }));
  assert.equal(missing.status, 404);
  assert.equal(missing.param, 'model');
  assert.match(missing.serverMessage, /^model "no-such-model": neither the served model "stories260K" nor one of your adapters/);
  const foreign = await fails(globex.completions.create({ model: ADAPTER, prompt: 'x' }));
  assert.equal(foreign.status, 404);
  assert.equal(foreign.serverMessage, missing.serverMessage.replace('no-such-model', ADAPTER));
});

test('metrics count HTTP calls under their own method label', async () => {
  const text = await s.server.metrics.registry.metrics();
  assert.match(text, /loraplex_rpc_requests_total\{method="Completions",code="OK"\} [1-9]/);
  assert.match(text, /loraplex_rpc_requests_total\{method="ChatCompletions",code="OK"\} [1-9]/);
  assert.match(text, /loraplex_rpc_requests_total\{method="Completions",code="NOT_FOUND"\} [1-9]/);
  assert.match(text, /loraplex_rpc_requests_total\{method="Models",code="UNAUTHENTICATED"\} 1/);
});

test('a full queue answers 429 with Retry-After; a draining server 503', async () => {
  const small = await startTestServer({ maxNumSeqs: 1, maxWaiting: 1 }, undefined, { httpApi: true });
  const post = (body: object) => fetch(`${small.httpUrl}/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ model: BASE, temperature: 0, ...body }) });
  try {
    // The first request holds the only row (it has streamed a token); the second waits.
    const first = await post({ prompt: 'Once upon a time', max_tokens: 200, stream: true });
    const reader = first.body!.getReader();
    await reader.read();
    const second = post({ prompt: 'One day', max_tokens: 4 });
    for (let i = 0; i < 2000 && small.server.app.scheduler.stats().waiting < 1; i++) await new Promise((r) => setTimeout(r, 1));
    const full = await post({ prompt: 'The cat', max_tokens: 4 });
    assert.equal(full.status, 429);
    assert.match(full.headers.get('retry-after') ?? '', /^[1-9]\d*$/);
    const body = (await full.json()) as { error: { type: string; message: string } };
    assert.equal(body.error.type, 'rate_limit_error');
    assert.match(body.error.message, /maxWaiting 1/);

    const drained = small.server.drain();
    const late = await post({ prompt: 'The cat', max_tokens: 4 });
    assert.equal(late.status, 503);
    assert.match(((await late.json()) as { error: { message: string } }).error.message, /draining/);
    await reader.cancel();
    assert.equal((await second).status, 200);
    await drained;
  } finally {
    await small.close();
  }
});
