import type { CallContext, ServiceImpl } from './bridge.js';
import { ExportDtype, MajoritySignMethod, MergeMethod, type AdapterService, type WeightedAdapter } from '../gen/loraplex/v1/adapters_pb.js';
import type { MergeMethod as DomainMergeMethod, MergeOptions } from '../adapters/merge.js';
import { validateOutputName } from '../adapters/export.js';
import { invalidArgument } from '../errors.js';
import { FinishReason, type InferenceService } from '../gen/loraplex/v1/inference_pb.js';
import { LoraplexError } from '../errors.js';
import type { AdapterKey } from '../adapter-key.js';
import type { MixSource } from '../adapters/manager.js';
import { asSeenBy, requireAdmin, scopeAdapterId, visibleAdapters, type Principal } from '../adapters/tenancy.js';
import { annotate } from './request-log.js';
import { checkPromptSize, promptIds, validateGenerate, type GenerateLimits, type PromptInput } from '../validate/generate.js';
import { adapterInfo, generateInput, promptInput } from './convert.js';
import type { App } from './app.js';

/** Bounds on request size that no model setting implies. */
const MAX_CHAT_MESSAGES = 256;
const MAX_PROMPT_CHARS = 1 << 20;
/** Prompts up to this size tokenize on the event loop (well under a millisecond); larger ones in the pool. */
const INLINE_TOKENIZE_BYTES = 16 * 1024;

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
    maxInputBytesPerToken: app.tokenizer.maxInputBytesPerToken,
  };
}

/** Cheap size limits first, then the tokenizer: inline for small prompts, in the worker pool for large ones. */
async function tokenizePrompt(app: App, prompt: PromptInput): Promise<{ ids: number[]; rendered: string }> {
  const lim = limits(app);
  const bytes = checkPromptSize(prompt, lim);
  if (bytes <= INLINE_TOKENIZE_BYTES) return promptIds(prompt, app.tokenizer, lim);
  return app.pool.run('tokenizePrompt', { modelDir: app.cfg.modelDir, prompt, limits: lim });
}

/** PEFT short names of the modules with a LoRA path ('model.layers.0.self_attn.q_proj' -> 'q_proj'). */
function targetModuleNames(app: App): string[] {
  return [...new Set(app.compiled.layout.loraModules.map((m) => m.module.split('.').pop()!))];
}

export function inferenceHandlers(state: AppState): ServiceImpl<(typeof InferenceService)['method']> {
  return {
    async *generate(req, ctx: CallContext) {
      const app = state.ready();
      const input = generateInput(req);
      if (req.adapters.length > 0 && req.adapterId !== '') throw invalidArgument('adapters: set either adapter_id or adapters (a mix), not both');
      const { ids } = await tokenizePrompt(app, input.prompt);
      const { promptIds: validIds, params, adapterScale, adapterKey: namedKey } = validateGenerate(input, ids, limits(app), ctx.principal);
      const adapterKey = req.adapters.length > 0 ? await mixKey(app, ctx.principal, req.adapters) : namedKey;
      const logText = app.cfg.logPrompts;
      annotate(ctx, { adapterId: req.adapterId || null, ...(req.adapters.length ? { mixOf: req.adapters.length } : {}), promptTokens: validIds.length, ...(logText ? { prompt: input.prompt } : {}) });
      // Errors name the adapter as the client did, never by its internal key.
      const adapterLabel = req.adapters.length > 0 ? `adapters (${req.adapters.map((w) => JSON.stringify(w.adapterId)).join(', ')})` : namedKey === null ? undefined : `adapter_id ${JSON.stringify(req.adapterId)}`;
      const events = app.scheduler.submit({ promptIds: validIds, params, adapterScale, adapterKey, signal: ctx.signal, ...(ctx.principal.tenant ? { tenant: ctx.principal.tenant } : {}), ...(adapterLabel ? { adapterLabel } : {}) });
      let generated = 0;
      let text = '';
      try {
        for await (const e of events) {
          if (e.type === 'token') {
            generated += e.tokenIds.length;
            if (logText) text += e.text;
            yield { event: { case: 'delta', value: { text: e.text, tokenIds: e.tokenIds } } };
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

function checkWeights(list: WeightedAdapter[], field: string): void {
  if (list.length > 64) throw invalidArgument(`${field}: ${list.length} adapters exceed the limit of 64`);
  list.forEach((w, i) => {
    const weight = w.weight ?? 1;
    if (!Number.isFinite(weight) || Math.abs(weight) > 1000) throw invalidArgument(`${field}[${i}].weight ${weight}: must be a finite number in [-1000, 1000]`);
  });
}

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

/**
 * A per-request mix: the key of a virtual adapter that is the exact cat merge of the sources (built on first use,
 * cached with the loaded adapters). NOT_FOUND for a missing source; INVALID_ARGUMENT when the ranks add up to more
 * than maxLoraRank (the mix must fit one slot).
 */
async function mixKey(app: App, principal: Principal, list: WeightedAdapter[]): Promise<AdapterKey> {
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

export const unavailable = (why: string) => new LoraplexError('UNAVAILABLE', why);
