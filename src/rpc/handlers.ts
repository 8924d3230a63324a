import type { CallContext, ServiceImpl } from './bridge.js';
import { ExportDtype, MajoritySignMethod, MergeMethod, type AdapterService, type WeightedAdapter } from '../gen/loraplex/v1/adapters_pb.js';
import type { MergeMethod as DomainMergeMethod, MergeOptions } from '../adapters/merge.js';
import { validateOutputName } from '../adapters/export.js';
import { invalidArgument } from '../errors.js';
import { FinishReason, type InferenceService } from '../gen/loraplex/v1/inference_pb.js';
import { LoraplexError } from '../errors.js';
import { asSeenBy, requireAdmin, scopeAdapterId, visibleAdapters, type Principal } from '../adapters/tenancy.js';
import { annotate } from './request-log.js';
import { checkWeights, startGeneration, tokenizePrompt } from './generation.js';
import { adapterInfo, generateInput, promptInput } from './convert.js';
import type { App } from './app.js';

export interface AppState {
  /** The app once the model is loaded; throws UNAVAILABLE while loading or draining. */
  ready(): App;
}

/** PEFT short names of the modules with a LoRA path ('model.layers.0.self_attn.q_proj' -> 'q_proj'). */
function targetModuleNames(app: App): string[] {
  return [...new Set(app.compiled.layout.loraModules.map((m) => m.module.split('.').pop()!))];
}

export function inferenceHandlers(state: AppState): ServiceImpl<(typeof InferenceService)['method']> {
  return {
    async *generate(req, ctx: CallContext) {
      const app = state.ready();
      const { events } = await startGeneration(app, {
        input: generateInput(req),
        mix: req.adapters,
        principal: ctx.principal,
        signal: ctx.signal,
        annotate: (fields) => annotate(ctx, fields),
      });
      const logText = app.cfg.logPrompts;
      let generated = 0;
      let text = '';
      try {
        for await (const e of events) {
          if (e.type === 'token') {
            generated += e.tokenIds.length;
            if (logText) text += e.text;
            yield { event: { case: 'delta', value: { text: e.text, tokenIds: e.tokenIds, logprobs: e.logprobs ?? [] } } };
          } else {
            annotate(ctx, { finishReason: e.reason, timings: e.timings });
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
      } finally {
        // Also on cancel: the request log line says how far it got.
        annotate(ctx, { generatedTokens: generated, ...(logText ? { text } : {}) });
      }
    },

    async tokenize(req) {
      const app = state.ready();
      const { ids, rendered } = await tokenizePrompt(app, promptInput(req.prompt));
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
    async loadAdapter(req, ctx) {
      const app = state.ready();
      annotate(ctx, { adapterId: req.adapterId });
      const { info, loadSeconds } = await app.adapters.load(scopeAdapterId(ctx.principal, req.adapterId), { pin: req.pin });
      return { adapter: adapterInfo(asSeenBy(ctx.principal, info)!), loadSeconds };
    },
    async unloadAdapter(req, ctx) {
      const app = state.ready();
      annotate(ctx, { adapterId: req.adapterId });
      const info = await app.adapters.unload(scopeAdapterId(ctx.principal, req.adapterId), { deleteFromStore: req.deleteFromStore });
      return { adapter: adapterInfo(asSeenBy(ctx.principal, info)!) };
    },
    async listAdapters(_req, ctx) {
      const app = state.ready();
      return { adapters: visibleAdapters(ctx.principal, await app.adapters.list()).map(adapterInfo) };
    },

    async mergeAdapters(req, ctx) {
      const app = state.ready();
      const t0 = performance.now();
      const newAdapterKey = scopeAdapterId(ctx.principal, req.newAdapterId);
      annotate(ctx, { adapterId: req.newAdapterId });
      const method = MERGE_METHODS[req.method];
      if (!method) throw invalidArgument(`method: set one of ${Object.values(MERGE_METHODS).join(', ')}`);
      const sources = await weightedSources(app, ctx.principal, req.sources, 'sources');
      const options: MergeOptions = {
        method,
        ...(req.svdRank !== undefined ? { svdRank: req.svdRank } : {}),
        ...(req.svdClamp !== undefined ? { svdClamp: req.svdClamp } : {}),
        ...(req.density !== undefined ? { density: req.density } : {}),
        majoritySignMethod: req.majoritySignMethod === MajoritySignMethod.FREQUENCY ? 'frequency' : 'total',
        ...(req.seed !== undefined ? { seed: Number(BigInt.asUintN(53, req.seed)) } : {}),
      };
      const merged = await app.pool.run('mergeAdapters', { sources, options });
      const info = await app.adapters.create(newAdapterKey, merged);
      return { adapter: adapterInfo(asSeenBy(ctx.principal, info)!), mergeSeconds: (performance.now() - t0) / 1000 };
    },

    async exportMergedModel(req, ctx) {
      const app = state.ready();
      // Writes a whole model onto the server's disk: a model-wide operation.
      requireAdmin(ctx.principal, 'ExportMergedModel');
      const name = validateOutputName(req.outputName);
      if (req.adapters.length === 0) throw invalidArgument('adapters: give at least one adapter to merge into the base');
      const sources = await weightedSources(app, ctx.principal, req.adapters, 'adapters');
      const dtype = req.dtype === ExportDtype.FLOAT32 ? 'F32' : 'F16';
      const { modelDir, quant, exportRoot } = app.cfg;
      const r = await app.pool.run('exportMergedModel', { modelDir, quant, sources, exportRoot, outputName: name, dtype });
      return { outputName: name, bytes: BigInt(r.bytes), seconds: r.seconds };
    },
  };
}

const MERGE_METHODS: Partial<Record<MergeMethod, DomainMergeMethod>> = {
  [MergeMethod.LINEAR]: 'linear',
  [MergeMethod.CAT]: 'cat',
  [MergeMethod.SVD]: 'svd',
  [MergeMethod.TIES]: 'ties',
  [MergeMethod.DARE_LINEAR]: 'dare_linear',
  [MergeMethod.DARE_TIES]: 'dare_ties',
};

/** Weighted adapters of a request in the caller's namespace, their tensors loaded (NOT_FOUND for a missing one). */
async function weightedSources(app: App, principal: Principal, list: WeightedAdapter[], field: string) {
  checkWeights(list, field);
  return Promise.all(
    list.map(async (w) => {
      const adapterKey = scopeAdapterId(principal, w.adapterId);
      // The client's own id: it is what merge messages (and an export's metadata) show.
      return { adapterId: w.adapterId, weight: w.weight ?? 1, adapter: await app.adapters.tensors(adapterKey) };
    }),
  );
}

export const unavailable = (why: string) => new LoraplexError('UNAVAILABLE', why);
