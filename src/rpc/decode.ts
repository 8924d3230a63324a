/**
 * Request decoding that never fails the call inside grpc-js. grpc-js answers a throwing deserializer with
 * INTERNAL "Error deserializing request" before any handler, interceptor or log sees the call; instead the
 * deserializer returns a MalformedRequest, and the bridge turns it into INVALID_ARGUMENT after authentication,
 * so the call is authenticated, logged and counted like any other.
 */
import { fromBinary, ScalarType, type DescField, type DescMessage, type Message } from '@bufbuild/protobuf';
import { BinaryReader, WireType } from '@bufbuild/protobuf/wire';
import { invalidArgument, type LoraplexError } from '../errors.js';

const MALFORMED = Symbol('malformed request');

/** Stands in for a request message whose bytes did not decode. */
export interface MalformedRequest {
  readonly [MALFORMED]: LoraplexError;
}

export function decodeRequest(schema: DescMessage, bytes: Uint8Array): Message | MalformedRequest {
  try {
    return fromBinary(schema, bytes);
  } catch (err) {
    const field = invalidUtf8Field(schema, bytes);
    const why = field !== null ? `${field}: not valid UTF-8` : `not a valid ${schema.typeName} message (${err instanceof Error ? err.message : 'undecodable'})`;
    return { [MALFORMED]: invalidArgument(`request: ${why}`) };
  }
}

/** The error a MalformedRequest stands for, or null for a real message. */
export function malformed(request: unknown): LoraplexError | null {
  return typeof request === 'object' && request !== null && MALFORMED in request ? (request as MalformedRequest)[MALFORMED] : null;
}

const utf8 = new TextDecoder('utf-8', { fatal: true });
/** Nested messages deeper than this are not searched (the message already failed to decode). */
const MAX_DEPTH = 32;

/**
 * The proto path (`chat.messages[2].content`) of the first string field holding invalid UTF-8, or null (also
 * when the bytes are malformed some other way). Walks the wire format with the schema, without building messages.
 */
function invalidUtf8Field(schema: DescMessage, bytes: Uint8Array, depth = 0): string | null {
  if (depth > MAX_DEPTH) return null;
  const counts = new Map<number, number>();
  try {
    const reader = new BinaryReader(bytes);
    while (reader.pos < reader.len) {
      const [number, wireType] = reader.tag();
      if (wireType !== WireType.LengthDelimited) {
        reader.skip(wireType, number);
        continue;
      }
      const payload = reader.bytes();
      const field = schema.fields.find((f) => f.number === number);
      if (!field) continue;
      const index = counts.get(number) ?? 0;
      counts.set(number, index + 1);
      const name = field.fieldKind === 'list' ? `${field.name}[${index}]` : field.name;
      if (isString(field)) {
        try {
          utf8.decode(payload);
        } catch {
          return name;
        }
      } else if (messageOf(field)) {
        const inner = invalidUtf8Field(messageOf(field)!, payload, depth + 1);
        if (inner !== null) return `${name}.${inner}`;
      }
    }
  } catch {
    return null;
  }
  return null;
}

function isString(field: DescField): boolean {
  if (field.fieldKind === 'scalar') return field.scalar === ScalarType.STRING;
  return field.fieldKind === 'list' && field.listKind === 'scalar' && field.scalar === ScalarType.STRING;
}

function messageOf(field: DescField): DescMessage | undefined {
  if (field.fieldKind === 'message') return field.message;
  return field.fieldKind === 'list' && field.listKind === 'message' ? field.message : undefined;
}
