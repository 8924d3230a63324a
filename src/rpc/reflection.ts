/**
 * gRPC server reflection (v1 and v1alpha, via @grpc/reflection) so grpcurl, grpcui and Postman can list and
 * describe the API without the .proto files. @grpc/reflection reads proto-loader style package definitions and
 * only uses their `fileDescriptorProtos`; we hand it the serialized descriptors embedded in the protobuf-es
 * generated code (plus their imports), and the health service's descriptor from grpc-health-check.
 */
import type { Server } from '@grpc/grpc-js';
import { ReflectionService } from '@grpc/reflection';
import { toBinary, type DescFile } from '@bufbuild/protobuf';
import { FileDescriptorProtoSchema } from '@bufbuild/protobuf/wkt';
import { service as healthService } from 'grpc-health-check';
import { file_loraplex_v1_adapters } from '../gen/loraplex/v1/adapters_pb.js';
import { file_loraplex_v1_inference } from '../gen/loraplex/v1/inference_pb.js';
import { file_loraplex_v1_train } from '../gen/loraplex/v1/train_pb.js';

export const LORAPLEX_FILES: readonly DescFile[] = [file_loraplex_v1_inference, file_loraplex_v1_adapters, file_loraplex_v1_train];

type PackageDefinition = ConstructorParameters<typeof ReflectionService>[0];

/** Serialized FileDescriptorProtos of `files` and everything they import, each file once, imports first. */
export function fileDescriptorProtos(files: readonly DescFile[]): Buffer[] {
  const seen = new Set<string>();
  const out: Buffer[] = [];
  const visit = (file: DescFile) => {
    if (seen.has(file.name)) return;
    seen.add(file.name);
    file.dependencies.forEach(visit);
    out.push(Buffer.from(toBinary(FileDescriptorProtoSchema, file.proto)));
  };
  files.forEach(visit);
  return out;
}

/** grpc.health.v1's descriptor, as grpc-health-check's proto-loader definition carries it. */
export function healthFileDescriptorProtos(): Buffer[] {
  return healthService['Check']?.requestType.fileDescriptorProtos ?? [];
}

export interface ReflectionOptions {
  /** Files to describe; default: loraplex.v1. */
  files?: readonly DescFile[];
  /** Also describe grpc.health.v1.Health (default true; register the health service too). */
  health?: boolean;
}

export function addReflection(server: Pick<Server, 'addService'>, options: ReflectionOptions = {}): void {
  const protos = [...fileDescriptorProtos(options.files ?? LORAPLEX_FILES), ...(options.health === false ? [] : healthFileDescriptorProtos())];
  // One entry is enough: the reflection implementation decodes every buffer of every entry and indexes by file name.
  const pkg = { descriptors: { fileDescriptorProtos: protos } } as unknown as PackageDefinition;
  new ReflectionService(pkg).addToServer(server);
}
