import { timestampFromMs } from '@bufbuild/protobuf/wkt';
import type { MessageInitShape } from '@bufbuild/protobuf';
import type { AdapterInfo, ClientAdapterInfo } from '../adapters/registry.js';
import { AdapterState, type AdapterInfoSchema } from '../gen/loraplex/v1/adapters_pb.js';
import type { ChatPrompt, GenerateRequest, TokenizeRequest } from '../gen/loraplex/v1/inference_pb.js';
import type { GenerateInput, PromptInput } from '../validate/generate.js';

/** proto <-> domain conversion; no validation here (src/validate does it), no tensors. */

function chat(c: ChatPrompt): PromptInput['chat'] {
  return {
    messages: c.messages.map((m) => ({ role: m.role, content: m.content })),
    ...(c.addGenerationPrompt !== undefined ? { addGenerationPrompt: c.addGenerationPrompt } : {}),
  };
}

export function promptInput(p: GenerateRequest['prompt'] | TokenizeRequest['prompt']): PromptInput {
  if (p.case === 'text') return { text: p.value };
  if (p.case === 'chat') return { chat: chat(p.value) };
  if (p.case === 'tokenIds') return { tokenIds: [...p.value.ids] };
  return {};
}

export function generateInput(req: GenerateRequest): GenerateInput {
  const s = req.sampling;
  return {
    prompt: promptInput(req.prompt),
    adapterId: req.adapterId,
    ...(req.adapterScale !== undefined ? { adapterScale: req.adapterScale } : {}),
    ...(s
      ? {
          sampling: {
            temperature: s.temperature,
            topK: s.topK,
            ...(s.topP !== undefined ? { topP: s.topP } : {}),
            ...(s.repetitionPenalty !== undefined ? { repetitionPenalty: s.repetitionPenalty } : {}),
            ...(s.seed !== undefined ? { seed: s.seed } : {}),
            maxNewTokens: s.maxNewTokens,
            stopTokenIds: [...s.stopTokenIds],
            stop: [...s.stop],
            minNewTokens: s.minNewTokens,
            ignoreEos: s.ignoreEos,
            ...(s.logprobs !== undefined ? { logprobs: s.logprobs } : {}),
          },
        }
      : {}),
  };
}

const STATE: Record<AdapterInfo['state'], AdapterState> = {
  stored: AdapterState.STORED,
  loaded: AdapterState.LOADED,
  active: AdapterState.ACTIVE,
};

/** An adapter as its owner sees it (tenancy.ts asSeenBy): under the client's id, never the key. */
export function adapterInfo(i: ClientAdapterInfo): MessageInitShape<typeof AdapterInfoSchema> {
  return {
    adapterId: i.adapterId,
    state: STATE[i.state],
    rank: i.rank,
    alpha: i.alpha,
    targetModules: i.targetModules,
    bytes: BigInt(i.bytes),
    ...(i.lastUsed !== null ? { lastUsed: timestampFromMs(i.lastUsed) } : {}),
    pinned: i.pinned,
    activeRequests: i.activeRequests,
    ...(i.invalidReason ? { invalidReason: i.invalidReason } : {}),
  };
}
