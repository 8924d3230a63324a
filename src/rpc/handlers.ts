import type { CallContext, ServiceImpl } from './bridge.js';
import type { AdapterService } from '../gen/loraplex/v1/adapters_pb.js';
import { FinishReason, type InferenceService } from '../gen/loraplex/v1/inference_pb.js';
import { LoraplexError } from '../errors.js';
import { validateAdapterId } from '../adapters/ids.js';
import { promptIds, validateGenerate, type GenerateLimits } from '../validate/generate.js';
import { adapterInfo, generateInput, promptInput } from './convert.js';
import type { App } from './server.js';

/** Bounds on request size that no model setting implies. */
const MAX_CHAT_MESSAGES = 256;
const MAX_PROMPT_CHARS = 1 << 20;

export interface AppState {
  /** The app once the model is loaded; throws UNAVAILABLE while loading or draining. */
  ready(): App;
}

function limits(app: App): GenerateLimits {
  return {
    maxModelLen: app.maxModelLen,
    maxNewTokensDefault: app.cfg.maxNewTokensDefault,
    vocabSize: app.compiled.spec.vocabSize,
    maxChatMessages: MAX_CHAT_MESSAGES,
    maxPromptChars: MAX_PROMPT_CHARS,
  };
}

/** PEFT short names of the modules with a LoRA path ('model.layers.0.self_attn.q_proj' -> 'q_proj'). */
function targetModuleNames(app: App): string[] {
  return [...new Set(app.compiled.layout.loraModules.map((m) => m.module.split('.').pop()!))];
}

export function inferenceHandlers(state: AppState): ServiceImpl<(typeof InferenceService)['method']> {
  return {
    async *generate(req, ctx: CallContext) {
      const app = state.ready();
      const valid = validateGenerate(generateInput(req), app.tokenizer, limits(app));
      const events = app.scheduler.submit({ ...valid, signal: ctx.signal });
      for await (const e of events) {
        if (e.type === 'token') {
          yield { event: { case: 'delta', value: { text: e.text, tokenIds: e.tokenIds } } };
        } else {
          yield {
            event: {
              case: 'finished',
              value: {
                finishReason: e.reason === 'stop' ? FinishReason.STOP : FinishReason.LENGTH,
                promptTokens: e.promptTokens,
                generatedTokens: e.generatedTokens,
                timings: e.timings,
              },
            },
          };
        }
      }
    },

    tokenize(req) {
      const app = state.ready();
      const { ids, rendered } = promptIds(promptInput(req.prompt), app.tokenizer, limits(app));
      return { tokenIds: ids, rendered };
    },

    getModelInfo() {
      const app = state.ready();
      const { spec } = app.compiled;
      const { cfg } = app;
      return {
        model: {
          source: cfg.source,
          modelType: spec.modelType,
          quantization: cfg.quant.kind,
          vocabSize: spec.vocabSize,
          hiddenSize: spec.hiddenSize,
          numLayers: spec.numLayers,
          maxModelLen: app.maxModelLen,
          eosTokenIds: spec.eosTokenIds,
          hasChatTemplate: app.tokenizer.chatTemplate !== null,
          loraTargetModules: targetModuleNames(app),
        },
        limits: {
          maxLoras: cfg.maxLoras,
          maxCpuLoras: cfg.maxCpuLoras,
          maxLoraRank: cfg.maxLoraRank,
          maxNumSeqs: cfg.maxNumSeqs,
          maxWaiting: cfg.maxWaiting,
          maxNewTokensDefault: cfg.maxNewTokensDefault,
          maxAdapterBytes: BigInt(cfg.maxAdapterBytes),
        },
      };
    },
  };
}

export function adapterHandlers(state: AppState): ServiceImpl<(typeof AdapterService)['method']> {
  return {
    async loadAdapter(req) {
      const app = state.ready();
      const { info, loadSeconds } = await app.adapters.load(validateAdapterId(req.adapterId), { pin: req.pin });
      return { adapter: adapterInfo(info), loadSeconds };
    },
    async unloadAdapter(req) {
      const app = state.ready();
      const info = await app.adapters.unload(validateAdapterId(req.adapterId), { deleteFromStore: req.deleteFromStore });
      return { adapter: adapterInfo(info) };
    },
    listAdapters() {
      const app = state.ready();
      return { adapters: app.adapters.list().map(adapterInfo) };
    },
  };
}

export const unavailable = (why: string) => new LoraplexError('UNAVAILABLE', why);
