/**
 * A real grpc-js server with tiny fake loraplex.v1 implementations, shared by the rpc tests (bridge, Python
 * client). The adapter id of a Generate request picks a behaviour, so each test can drive one path.
 */
import * as grpc from '@grpc/grpc-js';
import { timestampFromDate } from '@bufbuild/protobuf/wkt';
import { LoraplexError } from '../../src/errors.js';
import { addService } from '../../src/rpc/bridge.js';
import { createHealth, type Health } from '../../src/rpc/health.js';
import { addReflection } from '../../src/rpc/reflection.js';
import { AdapterService, AdapterState } from '../../src/gen/loraplex/v1/adapters_pb.js';
import { FinishReason, InferenceService } from '../../src/gen/loraplex/v1/inference_pb.js';

/** The one adapter the fake store holds. */
export const DEMO_ADAPTER = 'demo';
export const DELTAS = ['Hel', 'lo', '!'] as const;
/** Bytes of each message of the 'flood' stream, and how many it sends. */
export const FLOOD_BYTES = 64 * 1024;
export const FLOOD_COUNT = 400;

export interface FakeServer {
  readonly address: string;
  readonly health: Health;
  /** Details of errors the clients only saw as INTERNAL, with the method path. */
  readonly internalErrors: { err: unknown; method: string }[];
  /** Settles when a Generate generator for `adapterId` has run its finally block (each run is seen once). */
  generateFinally(adapterId: string): Promise<void>;
  /** The abort reasons seen by handlers waiting on ctx.signal ('wait' adapter / 'wait' tokenize text). */
  readonly abortReasons: unknown[];
  /** How many 'flood' messages the generator has produced so far. */
  floodProduced(): number;
  stop(): Promise<void>;
}

class Waiters<T> {
  private readonly queue: T[] = [];
  private readonly waiting: ((value: T) => void)[] = [];
  push(value: T) {
    const waiter = this.waiting.shift();
    if (waiter) waiter(value);
    else this.queue.push(value);
  }
  next(): Promise<T> {
    if (this.queue.length > 0) return Promise.resolve(this.queue.shift()!);
    return new Promise((resolve) => this.waiting.push(resolve));
  }
}

function untilAborted(signal: AbortSignal): Promise<unknown> {
  return new Promise((resolve) =>
    signal.aborted ? resolve(signal.reason) : signal.addEventListener('abort', () => resolve(signal.reason), { once: true }),
  );
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

export async function startFakeServer(): Promise<FakeServer> {
  const server = new grpc.Server();
  const internalErrors: { err: unknown; method: string }[] = [];
  const finallies = new Map<string, Waiters<void>>();
  const finallyOf = (adapterId: string) => {
    let waiters = finallies.get(adapterId);
    if (!waiters) finallies.set(adapterId, (waiters = new Waiters<void>()));
    return waiters;
  };
  const abortReasons: unknown[] = [];
  let floodProduced = 0;
  const onError = (err: unknown, method: string) => internalErrors.push({ err, method });

  addService(
    server,
    InferenceService,
    {
      async *generate(req, ctx) {
        try {
          switch (req.adapterId) {
            case '':
            case DEMO_ADAPTER:
              for (const [i, text] of DELTAS.entries()) yield { event: { case: 'delta', value: { text, tokenIds: [100 + i] } } };
              yield {
                event: {
                  case: 'finished',
                  value: {
                    finishReason: FinishReason.STOP,
                    promptTokens: req.prompt.case === 'text' ? req.prompt.value.length : 0,
                    generatedTokens: DELTAS.length,
                    timings: { queueSeconds: 0.25, timeToFirstTokenSeconds: 0.5, totalSeconds: 1.5 },
                  },
                },
              };
              return;
            case 'slow': // endless, one delta every 20 ms, until cancelled
              for (;;) {
                yield { event: { case: 'delta', value: { text: '.' } } };
                await sleep(20);
              }
            case 'wait': // sits on an await until the signal fires (deadline / cancel)
              yield { event: { case: 'delta', value: { text: 'waiting' } } };
              abortReasons.push(await untilAborted(ctx.signal));
              ctx.signal.throwIfAborted();
              return;
            case 'flood': {
              const text = 'x'.repeat(FLOOD_BYTES);
              for (let i = 0; i < FLOOD_COUNT; i++) {
                floodProduced++;
                yield { event: { case: 'delta', value: { text } } };
              }
              return;
            }
            case 'busy': {
              const err = new LoraplexError('RESOURCE_EXHAUSTED', 'waiting queue is full (maxWaiting=2); retry later');
              throw Object.assign(err, { retryAfterMs: 1499.2 });
            }
            case 'boom':
              yield { event: { case: 'delta', value: { text: 'partial' } } };
              throw new Error('engine exploded at /srv/secret/model.onnx');
            default:
              throw new LoraplexError('NOT_FOUND', `adapter_id "${req.adapterId}" is not in the adapter store`);
          }
        } finally {
          finallyOf(req.adapterId).push();
        }
      },
      async tokenize(req, ctx) {
        const text = req.prompt.case === 'text' ? req.prompt.value : '';
        if (text === 'wait') {
          abortReasons.push(await untilAborted(ctx.signal));
          ctx.signal.throwIfAborted();
        }
        if (text === '') throw new LoraplexError('INVALID_ARGUMENT', 'prompt: text must not be empty');
        return { tokenIds: [...text].map((c) => c.codePointAt(0)!), rendered: text };
      },
      getModelInfo(_req, ctx) {
        // Echoes the call context so the test can check what the bridge passes.
        const source = JSON.stringify({ peer: ctx.peer, test: ctx.metadata.get('x-test'), deadline: ctx.deadline?.toISOString() ?? null, method: ctx.method });
        return { model: { source, modelType: 'fake', eosTokenIds: [2] }, limits: { maxLoras: 4, maxAdapterBytes: 1n << 40n } };
      },
    },
    { onError },
  );

  addService(
    server,
    AdapterService,
    {
      // The fake store holds one adapter: merging or exporting needs more, so these only report that.
      async mergeAdapters() {
        throw new LoraplexError('FAILED_PRECONDITION', 'the fake adapter store cannot merge');
      },
      async exportMergedModel() {
        throw new LoraplexError('FAILED_PRECONDITION', 'the fake adapter store cannot export');
      },
      async loadAdapter(req) {
        if (req.adapterId !== DEMO_ADAPTER) throw new LoraplexError('NOT_FOUND', `adapter_id "${req.adapterId}" is not in the adapter store`);
        return {
          adapter: {
            adapterId: req.adapterId,
            state: AdapterState.LOADED,
            rank: 8,
            alpha: 16,
            targetModules: ['q_proj', 'v_proj'],
            bytes: 123456n,
            lastUsed: timestampFromDate(new Date('2024-01-02T03:04:05.678Z')),
            pinned: req.pin,
          },
          loadSeconds: 0.125,
        };
      },
      async unloadAdapter() {
        throw new Error('disk on fire at /srv/secret/adapters');
      },
      async listAdapters() {
        return { adapters: [{ adapterId: DEMO_ADAPTER, state: AdapterState.STORED }] };
      },
    },
    { onError },
  );

  const health = createHealth();
  health.addTo(server);
  addReflection(server);

  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, port) => (err ? reject(err) : resolve(port))),
  );
  return {
    address: `127.0.0.1:${port}`,
    health,
    internalErrors,
    abortReasons,
    generateFinally: (adapterId) => finallyOf(adapterId).next(),
    floodProduced: () => floodProduced,
    stop: () =>
      new Promise<void>((resolve) => {
        server.tryShutdown(() => resolve());
        setTimeout(() => {
          server.forceShutdown();
          resolve();
        }, 2000).unref();
      }),
  };
}
