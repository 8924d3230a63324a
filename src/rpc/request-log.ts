/**
 * One log line per RPC and the RPC metrics, fed by the bridge's call observer. Handlers add details to their
 * call's line with annotate(ctx, {...}); the line is written when the call ends, whatever the outcome.
 */
import { randomUUID } from 'node:crypto';
import { status as GrpcStatus } from '@grpc/grpc-js';
import type { Logger } from '../obs/logger.js';
import { shortMethod, statusName, type Metrics } from '../obs/metrics.js';
import type { CallContext, CallEndInfo, CallObserver } from './bridge.js';

export type { CallEndInfo, CallObserver };

/** Fields handlers may attach; anything else is allowed too, but these are the names to use. */
export interface CallFields {
  adapterId?: string | null;
  promptTokens?: number;
  generatedTokens?: number;
  finishReason?: string;
  timings?: object;
  /** Logged only with logPrompts. */
  prompt?: unknown;
  /** Logged only with logPrompts. */
  text?: string;
  [key: string]: unknown;
}

export interface RequestLogOptions {
  log: Logger;
  metrics?: Metrics;
  /** Log prompts and generated text (`prompt`, `text`). Off by default: they are user data. */
  logPrompts?: boolean;
}

export const REQUEST_ID_HEADER = 'x-request-id';
/** Printable ASCII without spaces, bounded: ids end up in log lines and in other systems' queries. */
const USABLE_ID = /^[\x21-\x7e]{1,128}$/;
const PRIVATE_FIELDS = ['prompt', 'text'] as const;
/** Codes that mean the server failed rather than the request. */
const SERVER_FAULTS = new Set<GrpcStatus>([GrpcStatus.INTERNAL, GrpcStatus.UNKNOWN, GrpcStatus.DATA_LOSS, GrpcStatus.UNIMPLEMENTED]);

export function requestIdFrom(ctx: Pick<CallContext, 'metadata'>): string | null {
  const v = ctx.metadata.get(REQUEST_ID_HEADER)[0];
  const id = typeof v === 'string' ? v : undefined;
  return id !== undefined && USABLE_ID.test(id) ? id : null;
}

// Per call, keyed by the bridge's context object (one per call): freed with it, shared by every observer.
const ids = new WeakMap<CallContext, string>();
const fields = new WeakMap<CallContext, Record<string, unknown>>();

/** The call's request id: the client's `x-request-id` if usable, else a generated one (stable per call). */
export function requestId(ctx: CallContext): string {
  let id = ids.get(ctx);
  if (id === undefined) {
    id = requestIdFrom(ctx) ?? randomUUID();
    ids.set(ctx, id);
  }
  return id;
}

/** Merges fields into the call's summary line (later values win). `prompt` / `text` are kept only with logPrompts. */
export function annotate(ctx: CallContext, add: CallFields): void {
  const own = fields.get(ctx);
  if (own) Object.assign(own, add);
  else fields.set(ctx, { ...add });
}

/** The bridge's call observer: one 'request' line per call (warn for server faults) and the RPC metrics. */
export function createRequestLog(opts: RequestLogOptions): CallObserver {
  const { log, metrics } = opts;
  const logPrompts = opts.logPrompts ?? false;
  return {
    onCallEnd({ method, code, seconds, ctx, error }: CallEndInfo) {
      metrics?.observeCall(method, code, seconds);
      const extra = { ...(ctx ? fields.get(ctx) : undefined) };
      if (!logPrompts) for (const k of PRIVATE_FIELDS) delete extra[k];
      // The core fields come last so an annotation cannot overwrite them.
      const line: Record<string, unknown> = {
        ...extra,
        requestId: ctx ? requestId(ctx) : randomUUID(),
        // The authenticated tenant is the truth; '' = auth disabled, nothing to say.
        ...(ctx?.principal.tenant ? { tenant: ctx.principal.tenant } : {}),
        method: shortMethod(method),
        code: statusName(code),
        seconds: +seconds.toFixed(4),
      };
      if (code !== GrpcStatus.OK && error !== undefined) line['error'] = error instanceof Error ? error.message : String(error);
      if (SERVER_FAULTS.has(code)) log.warn(line, 'request');
      else log.info(line, 'request');
    },
  };
}
