import * as grpc from '@grpc/grpc-js';
import { create, createFileRegistry, fromBinary, toBinary, type DescMessage, type Message } from '@bufbuild/protobuf';
import { FieldDescriptorProto_Label as Label, FieldDescriptorProto_Type as Type, FileDescriptorProtoSchema, type FileDescriptorProto } from '@bufbuild/protobuf/wkt';
import { service as healthServiceDefinition } from 'grpc-health-check';

/** grpc.health.v1.Health/Check against `address`: 'SERVING', 'NOT_SERVING', ... */
export async function healthCheck(address: string, service = ''): Promise<string> {
  const Health = grpc.makeGenericClientConstructor(healthServiceDefinition as unknown as grpc.ServiceDefinition, 'grpc.health.v1.Health');
  const client = new Health(address, grpc.credentials.createInsecure());
  try {
    return await new Promise<string>((resolve, reject) =>
      client['Check']!({ service }, (err: grpc.ServiceError | null, res: { status: string }) => (err ? reject(err) : resolve(res.status))),
    );
  } finally {
    client.close();
  }
}

// A grpc-js client for the reflection protocol, its messages described by hand (the same for v1 and v1alpha).
function reflectionProto(pkg: string): FileDescriptorProto {
  const field = (name: string, number: number, type: Type, extra: { label?: Label; typeName?: string; oneofIndex?: number } = {}) => ({
    name,
    number,
    type,
    label: Label.OPTIONAL,
    ...extra,
  });
  const oneof = { oneofIndex: 0 };
  return create(FileDescriptorProtoSchema, {
    name: `${pkg.replaceAll('.', '/')}/reflection.proto`,
    package: pkg,
    syntax: 'proto3',
    messageType: [
      {
        name: 'ServerReflectionRequest',
        field: [
          field('host', 1, Type.STRING),
          field('file_by_filename', 3, Type.STRING, oneof),
          field('file_containing_symbol', 4, Type.STRING, oneof),
          field('list_services', 7, Type.STRING, oneof),
        ],
        oneofDecl: [{ name: 'message_request' }],
      },
      {
        name: 'ServerReflectionResponse',
        field: [
          field('valid_host', 1, Type.STRING),
          field('file_descriptor_response', 4, Type.MESSAGE, { typeName: `.${pkg}.FileDescriptorResponse` }),
          field('list_services_response', 6, Type.MESSAGE, { typeName: `.${pkg}.ListServiceResponse` }),
          field('error_response', 7, Type.MESSAGE, { typeName: `.${pkg}.ErrorResponse` }),
        ],
      },
      { name: 'FileDescriptorResponse', field: [field('file_descriptor_proto', 1, Type.BYTES, { label: Label.REPEATED })] },
      { name: 'ListServiceResponse', field: [field('service', 1, Type.MESSAGE, { label: Label.REPEATED, typeName: `.${pkg}.ServiceResponse` })] },
      { name: 'ServiceResponse', field: [field('name', 1, Type.STRING)] },
      { name: 'ErrorResponse', field: [field('error_code', 1, Type.INT32), field('error_message', 2, Type.STRING)] },
    ],
  } as never);
}

export interface ReflectionResponse {
  fileDescriptorResponse?: { fileDescriptorProto: Uint8Array[] };
  listServicesResponse?: { service: { name: string }[] };
  errorResponse?: { errorCode: number; errorMessage: string };
}

export async function reflect(address: string, pkg: string, request: Record<string, unknown>): Promise<ReflectionResponse> {
  const registry = createFileRegistry(reflectionProto(pkg), () => undefined);
  const req = registry.getMessage(`${pkg}.ServerReflectionRequest`)!;
  const res = registry.getMessage(`${pkg}.ServerReflectionResponse`)!;
  const client = new grpc.Client(address, grpc.credentials.createInsecure());
  try {
    const call = client.makeBidiStreamRequest(
      `/${pkg}.ServerReflection/ServerReflectionInfo`,
      (m: Message) => Buffer.from(toBinary(req, m)),
      (b: Buffer) => fromBinary(res as DescMessage, b),
    );
    const first = new Promise<Message>((resolve, reject) => {
      call.once('data', resolve);
      call.once('error', reject);
    });
    call.write(create(req, request as never));
    call.end();
    return (await first) as unknown as ReflectionResponse;
  } finally {
    client.close();
  }
}

