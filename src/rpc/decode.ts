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
  let message: Message;
  try {
    message = fromBinary(schema, bytes);
  } catch (err) {
    const field = invalidUtf8Field(schema, bytes);
    const why = field !== null ? `${field}: not valid UTF-8` : `not a valid ${schema.typeName} message (${err instanceof Error ? err.message : 'undecodable'})`;
    return { [MALFORMED]: invalidArgument(`request: ${why}`) };
  }
  // proto3 enums are open: an unknown number decodes fine and would silently act as some default downstream.
  const unknown = unknownEnumValue(schema, message as unknown as Record<string, unknown>);
  return unknown === null ? message : { [MALFORMED]: invalidArgument(unknown) };
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

/** `method 99: not a value of MergeMethod` for the first enum field (at any depth) holding an undeclared number. */
function unknownEnumValue(schema: DescMessage, message: Record<string, unknown>, prefix = '', depth = 0): string | null {
  if (depth > MAX_DEPTH) return null;
  for (const field of schema.fields) {
    let value: unknown = message[field.localName];
    if (field.oneof) {
      const chosen = message[field.oneof.localName] as { case?: string; value?: unknown } | undefined;
      if (chosen?.case !== field.localName) continue;
      value = chosen.value;
    }
    const path = `${prefix}${field.name}`;
    const items = field.fieldKind === 'list' ? (value as unknown[]).map((v, i) => [`${path}[${i}]`, v] as const) : [[path, value] as const];
    const enumDesc = field.fieldKind === 'enum' || (field.fieldKind === 'list' && field.listKind === 'enum') ? field.enum : undefined;
    const inner = messageOf(field);
    for (const [name, v] of items) {
      if (enumDesc && !enumDesc.values.some((e) => e.number === v)) return `${name} ${String(v)}: not a value of ${enumDesc.name}`;
      if (inner && v !== undefined) {
        const found = unknownEnumValue(inner, v as Record<string, unknown>, `${name}.`, depth + 1);
        if (found !== null) return found;
      }
    }
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
