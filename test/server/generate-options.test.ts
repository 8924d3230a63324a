/**
 * Generate's request options beyond sampling, through the real server: prompts as token ids, per-token logprobs
 * (checked against log-softmax of the plain-TS reference forward), min_new_tokens and ignore_eos, and that a
 * request's tokens and logprobs are the same alone and in a busy batch.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { status } from '@grpc/grpc-js';
import type { MessageInitShape } from '@bufbuild/protobuf';
import { referenceForward, referenceWeights } from '../../kernels/reference/transformer.js';
import { SafetensorsSource } from '../../src/models/safetensors.js';
import type { GenerateRequestSchema } from '../../src/gen/loraplex/v1/inference_pb.js';
import { collect, failure, startTestServer, type Collected, type TestServer } from '../helpers/server.js';
import { STORIES } from '../helpers/engine.js';

type Request = MessageInitShape<typeof GenerateRequestSchema>;

let s: TestServer;
before(async () => {
  // float32 weights: the reference forward computes the same function, so logprobs compare to ~1e-5.
  s = await startTestServer({ maxModelLen: 512, maxNumSeqs: 8 }, { kind: 'none' });
});
after(() => s.close());

const ONCE_UPON_A_TIME = [1, 403, 407, 261, 378]; // BOS + "Once upon a time"
const text = (value: string) => ({ case: 'text' as const, value });
const tokenIds = (ids: number[]) => ({ case: 'tokenIds' as const, value: { ids } });

interface Logprobs {
  tokenId: number;
  logprob: number;
  top: { tokenId: number; logprob: number }[];
}

/** Tokens with their logprobs (one TokenLogprob per token id of each delta). */
async function withLogprobs(req: Request): Promise<Collected & { logprobs: Logprobs[] }> {
  const logprobs: Logprobs[] = [];
  const stream = s.inference.generate(req);
  const out = await collect(
    (async function* () {
      for await (const m of stream) {
        if (m.event.case === 'delta') {
          assert.equal(m.event.value.logprobs.length, m.event.value.tokenIds.length, 'one logprob per token id');
          logprobs.push(...m.event.value.logprobs.map((l) => ({ tokenId: l.tokenId, logprob: l.logprob, top: l.top.map((t) => ({ tokenId: t.tokenId, logprob: t.logprob })) })));
        }
        yield m;
      }
    })(),
  );
  return { ...out, logprobs };
}

/** log-softmax in float64 of one row. */
function logSoftmax(row: Float32Array): Float64Array {
  let max = -Infinity;
  for (const v of row) max = Math.max(max, v);
  let sum = 0;
  for (const v of row) sum += Math.exp(v - max);
  const logZ = max + Math.log(sum);
  return Float64Array.from(row, (v) => v - logZ);
}

test('a token-id prompt generates what its text does; logprobs equal log-softmax of the reference forward', async () => {
  const asText = await collect(s.inference.generate({ prompt: text('Once upon a time'), sampling: { maxNewTokens: 12 } }));
  const r = await withLogprobs({ prompt: tokenIds(ONCE_UPON_A_TIME), sampling: { maxNewTokens: 12, logprobs: 5 } });
  assert.deepEqual(r.tokenIds, asText.tokenIds);
  assert.equal(r.finished?.promptTokens, ONCE_UPON_A_TIME.length);
  assert.equal(r.logprobs.length, 12);

  const spec = s.server.app.compiled.spec;
  const V = spec.vocabSize;
  const seq = [...ONCE_UPON_A_TIME, ...r.tokenIds];
  const logits = referenceForward(spec, referenceWeights(SafetensorsSource.fromModelDir(STORIES)), seq.slice(0, -1));
  let worst = 0;
  r.logprobs.forEach((lp, i) => {
    const pos = ONCE_UPON_A_TIME.length - 1 + i;
    const ref = logSoftmax(logits.subarray(pos * V, (pos + 1) * V));
    assert.equal(lp.tokenId, r.tokenIds[i]);
    worst = Math.max(worst, Math.abs(lp.logprob - ref[lp.tokenId]!));
    const order = [...ref.keys()].sort((a, b) => ref[b]! - ref[a]! || a - b).slice(0, 5);
    assert.deepEqual(lp.top.map((t) => t.tokenId), order, `top 5 at generated token ${i}`);
    for (const t of lp.top) worst = Math.max(worst, Math.abs(t.logprob - ref[t.tokenId]!));
    // Greedy: the chosen token is the most likely one.
    assert.equal(lp.top[0]!.tokenId, lp.tokenId);
  });
  assert.ok(worst < 1e-4, `max |logprob - reference| ${worst}`);
  // logprobs 0: the chosen token's only.
  const bare = await withLogprobs({ prompt: tokenIds(ONCE_UPON_A_TIME), sampling: { maxNewTokens: 3, logprobs: 0 } });
  assert.deepEqual(bare.logprobs.map((l) => l.top.length), [0, 0, 0]);
  assert.deepEqual(bare.logprobs.map((l) => l.logprob), r.logprobs.slice(0, 3).map((l) => l.logprob));
});

test('tokens and logprobs of each request are the same alone and in a busy batch', async () => {
  const requests: Request[] = [
    { prompt: text('The cat'), sampling: { maxNewTokens: 20, logprobs: 3 } },
    { prompt: tokenIds([1, 365, 356]), sampling: { maxNewTokens: 16, temperature: 0.9, topP: 0.9, seed: 7n, logprobs: 20 } },
    { prompt: text('Lily and Ben'), sampling: { maxNewTokens: 24, temperature: 1.2, topK: 40, seed: 3n, logprobs: 1, minNewTokens: 10 } },
  ];
  const alone: Awaited<ReturnType<typeof withLogprobs>>[] = [];
  for (const req of requests) alone.push(await withLogprobs(req));
  const filler = [0, 1, 2, 3].map((i) => collect(s.inference.generate({ prompt: text(`Once upon a time ${i}`), sampling: { maxNewTokens: 30, temperature: 1, seed: BigInt(i) } })));
  const together = await Promise.all(requests.map((req) => withLogprobs(req)));
  await Promise.all(filler);
  together.forEach((t, i) => {
    assert.deepEqual(t.tokenIds, alone[i]!.tokenIds, `request ${i}: tokens`);
    assert.deepEqual(t.logprobs, alone[i]!.logprobs, `request ${i}: logprobs`);
  });
});

test('ignore_eos generates past the eos; min_new_tokens holds the eos back', async () => {
  // Greedy "The cat" ends its story by itself (the model's eos) well before 260 tokens.
  const plain = await collect(s.inference.generate({ prompt: text('The cat'), sampling: { maxNewTokens: 260 } }));
  const n = plain.tokenIds.length;
  assert.equal(plain.finished?.finishReason, 1 /* STOP */);
  assert.ok(n < 250, `stopped after ${n}`);
  const eos = s.server.app.compiled.spec.eosTokenIds;

  const ignoring = await collect(s.inference.generate({ prompt: text('The cat'), sampling: { maxNewTokens: n + 8, ignoreEos: true } }));
  assert.equal(ignoring.tokenIds.length, n + 8);
  assert.equal(ignoring.finished?.finishReason, 2 /* LENGTH */);
  assert.deepEqual(ignoring.tokenIds.slice(0, n), plain.tokenIds);
  assert.ok(eos.includes(ignoring.tokenIds[n]!), 'the eos the model chose is generated as a token');

  const held = await collect(s.inference.generate({ prompt: text('The cat'), sampling: { maxNewTokens: n + 8, minNewTokens: n + 4 } }));
  assert.ok(held.tokenIds.length >= n + 4, `${held.tokenIds.length} tokens`);
  assert.deepEqual(held.tokenIds.slice(0, n), plain.tokenIds);
  assert.ok(held.tokenIds.slice(0, n + 4).every((id) => !eos.includes(id)), 'no eos before min_new_tokens');
});

test('bad options: INVALID_ARGUMENT naming the field and the limit', async () => {
  const bad = async (req: Request) => {
    const f = await failure(collect(s.inference.generate(req)));
    assert.equal(f.code, status.INVALID_ARGUMENT, f.details);
    return f.details;
  };
  assert.equal(await bad({ prompt: text('x'), sampling: { logprobs: 21 } }), "sampling.logprobs 21: must be an integer in [0, 20] (the server's limit on alternatives)");
  assert.equal(await bad({ prompt: text('x'), sampling: { maxNewTokens: 5, minNewTokens: 6 } }), 'sampling.min_new_tokens 6: must be an integer in [0, 5] (at most maxNewTokens)');
  assert.equal(await bad({ prompt: tokenIds([1, 512]) }), 'token_ids.ids[1] 512: must be a token id in [0, 511]');
  assert.equal(await bad({ prompt: tokenIds([]) }), 'token_ids.ids: the prompt must hold at least one token id');
  assert.equal(await bad({ prompt: tokenIds(new Array(512).fill(5)) }), 'token_ids.ids: 512 tokens leave no room to generate within maxModelLen 512');
});
