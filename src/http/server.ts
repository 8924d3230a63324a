/**
 * The OpenAI-compatible HTTP front door (node:http): POST /v1/completions, POST /v1/chat/completions,
 * GET /v1/models. Each call is authenticated with the same API keys, gets a CallContext like a gRPC call, and is
 * reported to the same observer (request log line and metrics, method label `Completions`, `ChatCompletions`,
 * `Models`), so both front doors look alike in logs and dashboards.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { Metadata, status as GrpcStatus } from '@grpc/grpc-js';
import { LoraplexError } from '../errors.js';
import { LOCAL_PRINCIPAL, TENANT_SEPARATOR, type Principal } from '../adapters/tenancy.js';
import type { App } from '../rpc/app.js';
import type { CallContext, CallObserver } from '../rpc/bridge.js';
import type { AppState } from '../rpc/handlers.js';
import { REQUEST_ID_HEADER } from '../rpc/request-log.js';
import { STATUS_BY_CODE, type ErrorLogger } from '../rpc/status.js';
import { httpError, shape, type HttpError } from './errors.js';
import { chatCompletions, completions, listModels } from './handlers.js';
import { sendError } from './wire.js';

/** Request bodies above this are refused (413) before they are parsed: prompts are capped far below it anyway. */
export const MAX_BODY_BYTES = 8 * 1024 * 1024;

type Handler = (app: App, ctx: CallContext, body: unknown, res: ServerResponse) => Promise<void>;

interface Route {
  /** The method label in metrics and logs. */
  name: string;
  httpMethod: 'GET' | 'POST';
  handler: Handler;
}

const ROUTES: Readonly<Record<string, Route>> = {
  '/v1/completions': { name: 'Completions', httpMethod: 'POST', handler: completions },
  '/v1/chat/completions': { name: 'ChatCompletions', httpMethod: 'POST', handler: chatCompletions },
  '/v1/models': { name: 'Models', httpMethod: 'GET', handler: (app, ctx, _body, res) => listModels(app, ctx, res) },
};

export interface HttpApiOptions {
  state: AppState;
  /** The gRPC server's authenticator (auth.ts): the same keys and tenants. */
  authenticate?: (metadata: Metadata) => Principal;
  observer?: CallObserver;
  onError: ErrorLogger;
}

export interface HttpApi {
  listen(port: number, host: string): Promise<number>;
  close(): Promise<void>;
}

export function createHttpApi(opts: HttpApiOptions): HttpApi {
  const server: Server = createServer((req, res) => {
    serve(req, res, opts).catch((err: unknown) => {
      opts.onError(err, req.url ?? '');
      res.destroy();
    });
  });
  server.keepAliveTimeout = 5000;
  return {
    listen: (port, host) =>
      new Promise((resolve, reject) => {
        server.once('error', reject);
        server.listen(port, host, () => {
          server.off('error', reject);
          resolve((server.address() as AddressInfo).port);
        });
      }),
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}

async function serve(req: IncomingMessage, res: ServerResponse, opts: HttpApiOptions): Promise<void> {
  const path = (req.url ?? '/').split('?', 1)[0]!;
  const route = ROUTES[path];
  if (!route) return sendError(res, shape(404, `${req.method} ${path}: no such endpoint (POST /v1/completions, POST /v1/chat/completions, GET /v1/models)`, 'not_found', null));
  if (req.method !== route.httpMethod) {
    res.setHeader('allow', route.httpMethod);
    return sendError(res, shape(405, `${req.method} ${path}: use ${route.httpMethod}`, 'method_not_allowed', null));
  }
  const t0 = performance.now();
  const method = `/http/${route.name}`;
  const metadata = new Metadata();
  for (const h of ['authorization', REQUEST_ID_HEADER]) {
    const v = req.headers[h];
    if (typeof v === 'string') metadata.set(h, v);
  }
  const report = (code: GrpcStatus, ctx: CallContext | null, error?: unknown) => {
    try {
      opts.observer?.onCallEnd({ method, code, seconds: (performance.now() - t0) / 1000, ctx, ...(error !== undefined ? { error } : {}) });
    } catch (err) {
      opts.onError(err, method);
    }
  };
  let principal: Principal = LOCAL_PRINCIPAL;
  try {
    if (opts.authenticate) principal = opts.authenticate(metadata);
  } catch (err) {
    report(codeOf(err), null, err);
    return sendError(res, withoutKeys(httpError(err), ''));
  }
  const controller = new AbortController();
  // The client going away before the response ends cancels the request (its row and slot are freed).
  res.on('close', () => {
    if (!res.writableFinished) controller.abort(new LoraplexError('CANCELLED', 'call cancelled by the client'));
  });
  const ctx: CallContext = { method, metadata, deadline: undefined, signal: controller.signal, peer: `${req.socket.remoteAddress}:${req.socket.remotePort}`, principal };
  try {
    const app = opts.state.ready();
    const body = route.httpMethod === 'POST' ? await readJson(req) : undefined;
    await route.handler(app, ctx, body, res);
    const reason: unknown = controller.signal.aborted ? controller.signal.reason : undefined;
    report(reason === undefined ? GrpcStatus.OK : codeOf(reason), ctx, reason);
  } catch (err) {
    const cause = controller.signal.aborted ? controller.signal.reason : err;
    if (!(cause instanceof LoraplexError) || cause.code === 'INTERNAL') opts.onError(cause, method);
    report(codeOf(cause), ctx, cause);
    if (!res.headersSent && !res.destroyed) sendError(res, withoutKeys(httpError(cause), principal.tenant));
    else if (!res.writableEnded) res.end();
  }
}

function codeOf(err: unknown): GrpcStatus {
  return err instanceof LoraplexError ? STATUS_BY_CODE[err.code] : GrpcStatus.INTERNAL;
}

/** As bridge.ts: the caller's internal `tenant~id` keys never reach it, whatever code wrote the message. */
function withoutKeys(e: HttpError, tenant: string): HttpError {
  if (tenant) e.body.error.message = e.body.error.message.split(`${tenant}${TENANT_SEPARATOR}`).join('');
  return e;
}

async function readJson(req: IncomingMessage): Promise<unknown> {
  const declared = Number(req.headers['content-length']);
  if (Number.isFinite(declared) && declared > MAX_BODY_BYTES) throw tooLarge();
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size > MAX_BODY_BYTES) throw tooLarge();
    chunks.push(chunk);
  }
  try {
    return JSON.parse(Buffer.concat(chunks).toString('utf8'));
  } catch (e) {
    throw new LoraplexError('INVALID_ARGUMENT', `body: not valid JSON (${e instanceof Error ? e.message : String(e)})`);
  }
}

const tooLarge = () => new LoraplexError('INVALID_ARGUMENT', `body: larger than the limit of ${MAX_BODY_BYTES} bytes`);
