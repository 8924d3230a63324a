/**
 * grpc.health.v1.Health (Check, Watch, List) via grpc-health-check, for Kubernetes gRPC probes and load
 * balancers. Reports the overall status ('') and one per loraplex service; all start NOT_SERVING, so nothing
 * is routed here until the model is loaded and the composition root calls setServing(true).
 */
import type { Server } from '@grpc/grpc-js';
import { HealthImplementation, type ServingStatus } from 'grpc-health-check';
import { AdapterService } from '../gen/loraplex/v1/adapters_pb.js';
import { InferenceService } from '../gen/loraplex/v1/inference_pb.js';
import { TrainService } from '../gen/loraplex/v1/train_pb.js';

export const HEALTH_SERVICE = 'grpc.health.v1.Health';

export interface Health {
  /** The names reported: '' (the whole server) and each service's full name. */
  readonly services: readonly string[];
  /** SERVING or NOT_SERVING for every name at once (e.g. false while draining); Watch streams see the change. */
  setServing(serving: boolean): void;
  addTo(server: Server): void;
}

export function createHealth(services: readonly { readonly typeName: string }[] = [InferenceService, AdapterService, TrainService]): Health {
  const names = ['', ...services.map((s) => s.typeName)];
  const status = (serving: boolean): ServingStatus => (serving ? 'SERVING' : 'NOT_SERVING');
  const impl = new HealthImplementation(Object.fromEntries(names.map((name) => [name, status(false)])));
  return {
    services: names,
    setServing(serving) {
      for (const name of names) impl.setStatus(name, status(serving));
    },
    addTo(server) {
      impl.addToServer(server);
    },
  };
}
