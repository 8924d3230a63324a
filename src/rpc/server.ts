import * as grpc from '@grpc/grpc-js';
import { AdapterService } from '../gen/loraplex/v1/adapters_pb.js';
import { InferenceService } from '../gen/loraplex/v1/inference_pb.js';
import { TrainService } from '../gen/loraplex/v1/train_pb.js';
import type { Logger } from '../obs/logger.js';
import type { App } from './app.js';
import { addService, type CallObserver } from './bridge.js';
import type { Principal } from '../adapters/tenancy.js';
import { adapterHandlers, inferenceHandlers, unavailable, type AppState } from './handlers.js';
import { createHealth, type Health } from './health.js';
import { addReflection } from './reflection.js';
import { trainHandlers } from './train-handlers.js';

export interface RpcServer {
  server: grpc.Server;
  health: Health;
  /** The app once loaded; UNAVAILABLE while loading or draining (the HTTP API shares it). */
  state: AppState;
  setApp(app: App): void;
  /** New calls get UNAVAILABLE; running streams go on. */
  setDraining(): void;
}

export interface RpcServerOptions {
  /** Runs before every loraplex RPC (auth.ts); health and reflection stay open for probes and tools. */
  authenticate?: (metadata: grpc.Metadata) => Principal;
  /** Sees every loraplex RPC when it ends (metrics, access logs). */
  observer?: CallObserver;
}

/**
 * The grpc-js server with loraplex's services, health and reflection. It is created before the model loads,
 * so the port answers at once: health says NOT_SERVING and RPCs get UNAVAILABLE until setApp (after
 * authentication: an unauthenticated call learns nothing, not even that the server is loading).
 */
export function createRpcServer(log: Logger, options: RpcServerOptions = {}): RpcServer {
  const server = new grpc.Server({
    'grpc.max_receive_message_length': 16 * 1024 * 1024,
    'grpc.keepalive_permit_without_calls': 1,
  });
  let app: App | null = null;
  let draining = false;
  const state: AppState = {
    ready(): App {
      if (draining) throw unavailable('server is draining; retry on another replica');
      if (!app) throw unavailable('server is loading the model; retry shortly');
      return app;
    },
  };
  const onError = (err: unknown, method: string) => log.error({ err, method }, 'internal error');
  const serviceOptions = { onError, ...(options.authenticate ? { authenticate: options.authenticate } : {}), ...(options.observer ? { observer: options.observer } : {}) };
  addService(server, InferenceService, inferenceHandlers(state), serviceOptions);
  addService(server, AdapterService, adapterHandlers(state), serviceOptions);
  addService(server, TrainService, trainHandlers(state), serviceOptions);
  const health = createHealth();
  health.addTo(server);
  addReflection(server);
  return {
    server,
    health,
    state,
    setApp(a) {
      app = a;
    },
    setDraining() {
      draining = true;
    },
  };
}
