/**
 * Bridges protobuf-es v2 service descriptors (the generated `GenService` constants) to grpc-js, in both
 * directions, so handlers are plain functions over generated message types:
 *   unary             (req, ctx) => Promise<Res>
 *   server-streaming  async function* (req, ctx) { yield res; ... }
 * Client- and bidi-streaming are not used by loraplex.v1 and are rejected at registration.
 */
import * as grpc from '@grpc/grpc-js';
import {
  create,
  fromBinary,
  toBinary,
  type DescMessage,
  type DescMethod,
  type DescService,
  type Message,
  type MessageInitShape,
  type MessageShape,
} from '@bufbuild/protobuf';
import type { GenService, GenServiceMethods } from '@bufbuild/protobuf/codegenv2';
import { LoraplexError } from '../errors.js';
import { LOCAL_PRINCIPAL, TENANT_SEPARATOR, type Principal } from '../adapters/tenancy.js';
import { STATUS_BY_CODE, toStatus, type ErrorLogger } from './status.js';
import { decodeRequest, malformed } from './decode.js';

/** What a handler knows about its call besides the request. */
export interface CallContext {
  /** The gRPC path, e.g. `/loraplex.v1.InferenceService/Generate`. */
  readonly method: string;
  readonly metadata: grpc.Metadata;
  /** Undefined when the client set no deadline. */
  readonly deadline: Date | undefined;
  /**
   * Aborts when the client cancels or the deadline passes; the reason is a LoraplexError (CANCELLED or
   * DEADLINE_EXCEEDED), so `signal.throwIfAborted()` maps to the right status. Long awaits inside a handler
   * must observe it: a streaming handler is only stopped at its next `yield`.
   */
  readonly signal: AbortSignal;
  /** The client's address, `host:port`. */
  readonly peer: string;
  /** Who is calling: from the API key, or LOCAL_PRINCIPAL (tenant '', admin) when auth is disabled. */
  readonly principal: Principal;
}

/** What an observer learns about one finished call. */
export interface CallEndInfo {
  /** The gRPC path. */
  method: string;
  /** The final status: OK, the error's status, or CANCELLED / DEADLINE_EXCEEDED when the client left. */
  code: grpc.status;
  /** From the call's arrival to the handler settling. */
  seconds: number;
  /** Null when the call failed before a context existed (authentication). */
  ctx: CallContext | null;
  /** The error behind a non-OK code (for logs; the client saw only its status). */
  error?: unknown;
}

/** Sees every call of the services it is registered with, once, when it ends (metrics, access logs). */
export interface CallObserver {
  onCallEnd(info: CallEndInfo): void;
}

export type UnaryHandler<I extends DescMessage, O extends DescMessage> = (
  request: MessageShape<I>,
  ctx: CallContext,
) => Promise<MessageInitShape<O>> | MessageInitShape<O>;

export type ServerStreamingHandler<I extends DescMessage, O extends DescMessage> = (
  request: MessageShape<I>,
  ctx: CallContext,
) => AsyncIterable<MessageInitShape<O>>;

/** The implementation of a service: one handler per method, keyed by the method's localName (`generate`). */
export type ServiceImpl<M extends GenServiceMethods> = {
  [K in keyof M]: M[K] extends { methodKind: 'unary' }
    ? UnaryHandler<M[K]['input'], M[K]['output']>
    : M[K] extends { methodKind: 'server_streaming' }
      ? ServerStreamingHandler<M[K]['input'], M[K]['output']>
      : never;
};

export interface ClientCallOptions {
  metadata?: grpc.Metadata;
  /** Absolute deadline; `timeoutMs` is the relative form (the earlier of the two wins). */
  deadline?: Date | number;
  timeoutMs?: number;
  /** Cancels the call (the promise rejects / the iteration throws with status CANCELLED). */
  signal?: AbortSignal;
}

/** A typed client: unary methods return promises, server-streaming methods return async iterables. */
export type Client<M extends GenServiceMethods> = {
  [K in keyof M]: M[K] extends { methodKind: 'unary' }
    ? (request: MessageInitShape<M[K]['input']>, options?: ClientCallOptions) => Promise<MessageShape<M[K]['output']>>
    : M[K] extends { methodKind: 'server_streaming' }
      ? (request: MessageInitShape<M[K]['input']>, options?: ClientCallOptions) => AsyncIterable<MessageShape<M[K]['output']>>
      : never;
} & {
  /** Closes the channel. */
  close(): void;
};

/** `ServiceClient<typeof InferenceService>`: the type makeClient returns for that service. */
export type ServiceClient<S> = S extends GenService<infer M> ? Client<M> : never;

export interface AddServiceOptions {
  /** Gets the detail of every error the client sees only as INTERNAL. */
  onError?: ErrorLogger;
  /**
   * Runs before the handler of every method, on the call's metadata; throwing (UNAUTHENTICATED) fails the
   * call without running the handler. Without it every call is LOCAL_PRINCIPAL.
   */
  authenticate?: (metadata: grpc.Metadata) => Principal;
  /** Told about every call once it has ended. Must not throw (a throw goes to onError, never to the call). */
  observer?: CallObserver;
}

const definitions = new WeakMap<DescService, grpc.ServiceDefinition>();

/** The grpc-js definition of a service, keyed by proto method name (`Generate`), with localName as alias. */
export function serviceDefinition(service: DescService): grpc.ServiceDefinition {
  let definition = definitions.get(service);
  if (definition) return definition;
  const methods: Record<string, grpc.MethodDefinition<Message, Message>> = {};
  for (const method of service.methods) {
    methods[method.name] = {
      path: methodPath(method),
      requestStream: method.methodKind === 'client_streaming' || method.methodKind === 'bidi_streaming',
      responseStream: method.methodKind === 'server_streaming' || method.methodKind === 'bidi_streaming',
      requestSerialize: serializer(method.input),
      // Never throws: a malformed request reaches the handler wrapper as INVALID_ARGUMENT (decode.ts).
      requestDeserialize: (bytes: Buffer) => decodeRequest(method.input, bytes) as Message,
      responseSerialize: serializer(method.output),
      responseDeserialize: deserializer(method.output),
      // makeGenericClientConstructor also exposes the method under this name.
      originalName: method.localName,
    };
  }
  definition = methods;
  definitions.set(service, definition);
  return definition;
}

export function methodPath(method: DescMethod): string {
  return `/${method.parent.typeName}/${method.name}`;
}

function serializer(schema: DescMessage): (message: Message) => Buffer {
  return (message) => {
    const bytes = toBinary(schema, message);
    return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength); // a view, not a copy
  };
}

function deserializer(schema: DescMessage): (bytes: Buffer) => Message {
  return (bytes) => fromBinary(schema, bytes);
}

/** Registers `impl` for `service` on a grpc-js server. Errors thrown by handlers go through status.ts. */
export function addService<M extends GenServiceMethods>(
  server: grpc.Server,
  service: GenService<M>,
  impl: ServiceImpl<M>,
  options: AddServiceOptions = {},
): void {
  const desc = service as unknown as DescService;
  const handlers: grpc.UntypedServiceImplementation = {};
  for (const method of desc.methods) {
    const handler = (impl as Record<string, unknown>)[method.localName];
    if (typeof handler !== 'function') throw new Error(`${desc.typeName}: no handler for ${method.localName}`);
    switch (method.methodKind) {
      case 'unary':
        handlers[method.name] = unaryHandler(method, handler as UnaryHandler<DescMessage, DescMessage>, options);
        break;
      case 'server_streaming':
        handlers[method.name] = streamingHandler(method, handler as ServerStreamingHandler<DescMessage, DescMessage>, options);
        break;
      default:
        throw new Error(`${methodPath(method)}: ${method.methodKind} methods are not supported`);
    }
  }
  server.addService(serviceDefinition(desc), handlers);
}

// setTimeout fires at once for delays over 2^31-1 ms; deadlines that far away are left to grpc-js.
const MAX_TIMER_MS = 2 ** 31 - 1;
/** How long before its deadline a client's cancel still counts as the deadline passing (see callContext). */
export const DEADLINE_SLACK_MS = 1000;

/** The context of one call; `finish()` detaches it once the handler has settled. */
function callContext(call: grpc.ServerUnaryCall<Message, Message> | grpc.ServerWritableStream<Message, Message>, path: string, principal: Principal) {
  const controller = new AbortController();
  const raw = call.getDeadline();
  const deadlineMs = raw instanceof Date ? raw.getTime() : raw;
  const deadline = Number.isFinite(deadlineMs) ? new Date(deadlineMs) : undefined;
  const expire = () => controller.abort(new LoraplexError('DEADLINE_EXCEEDED', 'deadline exceeded'));
  // A client whose deadline passes resets the stream, which reaches us as 'cancelled' BEFORE our own copy of the
  // deadline: ours is computed from the grpc-timeout header on arrival, so it runs late by the request's transit
  // time (hundreds of ms on a busy machine). A cancel within DEADLINE_SLACK_MS of the deadline is therefore
  // recorded as DEADLINE_EXCEEDED; the server cannot tell it from an explicit cancel in that last instant.
  const onCancelled = () =>
    deadline && Date.now() >= deadlineMs - DEADLINE_SLACK_MS ? expire() : controller.abort(new LoraplexError('CANCELLED', 'call cancelled by the client'));
  let timer: NodeJS.Timeout | undefined;
  if (deadline) {
    const ms = deadlineMs - Date.now();
    if (ms <= 0) expire();
    else if (ms <= MAX_TIMER_MS) timer = setTimeout(expire, ms);
  }
  call.on('cancelled', onCancelled);
  const ctx: CallContext = { method: path, metadata: call.metadata, deadline, signal: controller.signal, peer: call.getPeer(), principal };
  const finish = () => {
    clearTimeout(timer);
    call.off('cancelled', onCancelled);
  };
  return { ctx, finish };
}

/** An error caused by the call's own cancellation maps to CANCELLED / DEADLINE_EXCEEDED and is not logged. */
function causeOf(err: unknown, signal: AbortSignal): unknown {
  if (signal.aborted && (err === signal.reason || (err instanceof Error && err.name === 'AbortError'))) return signal.reason;
  return err;
}

/**
 * Authenticates a call and reports its end to the observer, once: principal() gives the caller or the
 * status the call fails with; then ok() or fail() when the handler settles.
 */
function callTracker(path: string, metadata: grpc.Metadata, options: AddServiceOptions) {
  const t0 = performance.now();
  const log = options.onError;
  const report = (info: Omit<CallEndInfo, 'method' | 'seconds'>) => {
    if (!options.observer) return;
    try {
      options.observer.onCallEnd({ method: path, seconds: (performance.now() - t0) / 1000, ...info });
    } catch (err) {
      log?.(err, path);
    }
  };
  return {
    principal(): { principal: Principal } | { status: grpc.ServerErrorResponse } {
      if (!options.authenticate) return { principal: LOCAL_PRINCIPAL };
      try {
        return { principal: options.authenticate(metadata) };
      } catch (err) {
        const status = toStatus(err, path, log);
        report({ code: status.code ?? grpc.status.UNKNOWN, ctx: null, error: err });
        return { status };
      }
    },
    /** The handler succeeded. */
    ok(ctx: CallContext): void {
      // If the client had already gone (cancel, deadline), that is how the call ended for it.
      const reason: unknown = ctx.signal.aborted ? ctx.signal.reason : undefined;
      const code = reason instanceof LoraplexError ? STATUS_BY_CODE[reason.code] : grpc.status.OK;
      report({ code, ctx, ...(code !== grpc.status.OK ? { error: reason } : {}) });
    },
    /** The handler failed: the status the client gets. */
    fail(ctx: CallContext, err: unknown): grpc.ServerErrorResponse {
      const cause = causeOf(err, ctx.signal);
      const status = toStatus(cause, path, log);
      // Last line of defence: the caller's internal `tenant~id` keys never reach it, whatever code wrote the message.
      const { tenant } = ctx.principal;
      if (tenant && status.details?.includes(`${tenant}${TENANT_SEPARATOR}`)) {
        status.details = status.details!.split(`${tenant}${TENANT_SEPARATOR}`).join('');
        status.message = status.details;
      }
      report({ code: status.code ?? grpc.status.UNKNOWN, ctx, error: cause });
      return status;
    },
  };
}

function unaryHandler(method: DescMethod, handler: UnaryHandler<DescMessage, DescMessage>, options: AddServiceOptions): grpc.handleUnaryCall<Message, Message> {
  const path = methodPath(method);
  return (call, callback) => {
    const tracker = callTracker(path, call.metadata, options);
    const auth = tracker.principal();
    if ('status' in auth) return callback(auth.status);
    const { ctx, finish } = callContext(call, path, auth.principal);
    Promise.resolve()
      .then(() => {
        ctx.signal.throwIfAborted();
        const bad = malformed(call.request);
        if (bad) throw bad;
        return handler(call.request, ctx);
      })
      .then((response) => create(method.output, response))
      .then(
        (response) => {
          finish();
          tracker.ok(ctx);
          callback(null, response);
        },
        (err: unknown) => {
          finish();
          callback(tracker.fail(ctx, err));
        },
      );
  };
}

function streamingHandler(
  method: DescMethod,
  handler: ServerStreamingHandler<DescMessage, DescMessage>,
  options: AddServiceOptions,
): grpc.handleServerStreamingCall<Message, Message> {
  const path = methodPath(method);
  return (call) => {
    const tracker = callTracker(path, call.metadata, options);
    const auth = tracker.principal();
    if ('status' in auth) {
      call.emit('error', auth.status);
      return;
    }
    const { ctx, finish } = callContext(call, path, auth.principal);
    pump(call, method.output, handler, ctx, options.onError).then(
      () => {
        finish();
        tracker.ok(ctx);
        if (!ctx.signal.aborted) call.end();
      },
      (err: unknown) => {
        finish();
        // Sets the status and ends the call (grpc-js's ServerWritableStream listens for its own 'error').
        call.emit('error', tracker.fail(ctx, err));
      },
    );
  };
}

/** Writes what the handler yields, honouring backpressure, until it ends, throws, or the call is cancelled. */
async function pump(
  call: grpc.ServerWritableStream<Message, Message>,
  output: DescMessage,
  handler: ServerStreamingHandler<DescMessage, DescMessage>,
  ctx: CallContext,
  log?: ErrorLogger,
): Promise<void> {
  const path = ctx.method;
  ctx.signal.throwIfAborted(); // e.g. the deadline had passed on arrival: don't start work nobody waits for
  const bad = malformed(call.request);
  if (bad) throw bad;
  const iterator = handler(call.request, ctx)[Symbol.asyncIterator]();
  let open = true;
  // return() runs the generator's finally blocks (it is parked at a yield whenever we get here, so at once).
  const close = () => {
    if (!open) return;
    open = false;
    try {
      iterator.return?.()?.catch((err: unknown) => log?.(err, path));
    } catch (err) {
      log?.(err, path);
    }
  };
  try {
    for (;;) {
      let result: IteratorResult<MessageInitShape<DescMessage>>;
      try {
        result = await iterator.next();
      } catch (err) {
        open = false; // the generator threw: it is already finished
        throw err;
      }
      if (result.done) {
        open = false;
        return;
      }
      if (ctx.signal.aborted) return;
      if (!call.write(create(output, result.value))) await drained(call, ctx.signal);
      if (ctx.signal.aborted) return;
    }
  } finally {
    close(); // on cancel, deadline, or a failed write: the generator stops at the yield it is parked at
  }
}

function drained(call: NodeJS.EventEmitter, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      call.off('drain', done);
      call.off('close', done);
      signal.removeEventListener('abort', done);
      resolve();
    };
    call.on('drain', done);
    call.on('close', done);
    signal.addEventListener('abort', done);
  });
}

/**
 * A typed client over grpc-js's generic client, built from the same definitions as the server (for tests and
 * tools). Streaming calls start when iteration starts; leaving the loop early cancels the call.
 */
export function makeClient<M extends GenServiceMethods>(
  service: GenService<M>,
  address: string,
  options: { credentials?: grpc.ChannelCredentials; channelOptions?: grpc.ChannelOptions } = {},
): Client<M> {
  const desc = service as unknown as DescService;
  const Ctor = grpc.makeGenericClientConstructor(serviceDefinition(desc), desc.typeName);
  const raw = new Ctor(address, options.credentials ?? grpc.credentials.createInsecure(), options.channelOptions);
  const client: Record<string, unknown> = { close: () => raw.close() };
  for (const method of desc.methods) {
    const invoke = raw[method.name] as (...args: unknown[]) => grpc.ClientUnaryCall | grpc.ClientReadableStream<Message>;
    switch (method.methodKind) {
      case 'unary':
        client[method.localName] = (request: MessageInitShape<DescMessage>, opts: ClientCallOptions = {}) =>
          new Promise<Message>((resolve, reject) => {
            const call = invoke.call(
              raw,
              create(method.input, request),
              opts.metadata ?? new grpc.Metadata(),
              callOptions(opts),
              (err: grpc.ServiceError | null, response?: Message) => (err ? reject(err) : resolve(response!)),
            );
            cancelOnAbort(call, opts.signal);
          });
        break;
      case 'server_streaming':
        client[method.localName] = (request: MessageInitShape<DescMessage>, opts: ClientCallOptions = {}) =>
          iterate(() => invoke.call(raw, create(method.input, request), opts.metadata ?? new grpc.Metadata(), callOptions(opts)) as grpc.ClientReadableStream<Message>, opts.signal);
        break;
      default:
        // Not used by loraplex.v1; calling it fails loudly rather than hanging.
        client[method.localName] = () => {
          throw new Error(`${methodPath(method)}: ${method.methodKind} methods are not supported by makeClient`);
        };
    }
  }
  return client as Client<M>;
}

function callOptions(opts: ClientCallOptions): grpc.CallOptions {
  const deadlines = [
    opts.deadline === undefined ? Infinity : +opts.deadline,
    opts.timeoutMs === undefined ? Infinity : Date.now() + opts.timeoutMs,
  ];
  const deadline = Math.min(...deadlines);
  return Number.isFinite(deadline) ? { deadline } : {};
}

function cancelOnAbort(call: grpc.ClientUnaryCall | grpc.ClientReadableStream<Message>, signal: AbortSignal | undefined): () => void {
  if (!signal) return () => {};
  const cancel = () => call.cancel();
  if (signal.aborted) cancel();
  else signal.addEventListener('abort', cancel, { once: true });
  return () => signal.removeEventListener('abort', cancel);
}

async function* iterate(start: () => grpc.ClientReadableStream<Message>, signal: AbortSignal | undefined): AsyncGenerator<Message> {
  const call = start();
  const detach = cancelOnAbort(call, signal);
  let ended = false;
  try {
    // A non-OK status arrives as the stream's 'error', which the iteration rethrows (a grpc ServiceError).
    for await (const message of call) yield message as Message;
    ended = true;
  } finally {
    detach();
    if (!ended) call.cancel(); // the consumer left early: tell the server
  }
}
