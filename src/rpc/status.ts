/**
 * The ONE place where errors become gRPC statuses. Domain code throws LoraplexError with a string code and a
 * client-safe message; everything else is a bug, so the client gets a generic INTERNAL and the detail goes to
 * the log (never to the client: stack traces and paths stay on the server).
 */
import { Metadata, status as Status, type ServerErrorResponse } from '@grpc/grpc-js';
import { LoraplexError, type ErrorCode } from '../errors.js';

/** Receives the detail of every error the client only sees as INTERNAL. `method` is the gRPC path. */
export type ErrorLogger = (err: unknown, method: string) => void;

export const STATUS_BY_CODE: Readonly<Record<ErrorCode, Status>> = {
  INVALID_ARGUMENT: Status.INVALID_ARGUMENT,
  NOT_FOUND: Status.NOT_FOUND,
  ALREADY_EXISTS: Status.ALREADY_EXISTS,
  FAILED_PRECONDITION: Status.FAILED_PRECONDITION,
  RESOURCE_EXHAUSTED: Status.RESOURCE_EXHAUSTED,
  PERMISSION_DENIED: Status.PERMISSION_DENIED,
  UNAUTHENTICATED: Status.UNAUTHENTICATED,
  UNAVAILABLE: Status.UNAVAILABLE,
  CANCELLED: Status.CANCELLED,
  DEADLINE_EXCEEDED: Status.DEADLINE_EXCEEDED,
  INTERNAL: Status.INTERNAL,
};

export const INTERNAL_MESSAGE = 'internal error';

/** Trailer carrying a RESOURCE_EXHAUSTED error's retry hint (milliseconds, integer). */
export const RETRY_AFTER_HEADER = 'retry-after-ms';

/** A status for grpc-js: pass it to a unary callback or emit it as a stream's 'error'. */
export function toStatus(err: unknown, method: string, log?: ErrorLogger): ServerErrorResponse {
  const code = err instanceof LoraplexError ? STATUS_BY_CODE[err.code] : undefined;
  if (err instanceof LoraplexError && code !== undefined) {
    // INTERNAL thrown on purpose still means something is broken: log it, but its message was written for the client.
    if (code === Status.INTERNAL) log?.(err, method);
    const metadata = new Metadata();
    const { retryAfterMs } = err;
    if (code === Status.RESOURCE_EXHAUSTED && typeof retryAfterMs === 'number' && Number.isFinite(retryAfterMs) && retryAfterMs >= 0) {
      metadata.set(RETRY_AFTER_HEADER, String(Math.ceil(retryAfterMs)));
    }
    return statusError(code, err.message, metadata);
  }
  log?.(err, method);
  return statusError(Status.INTERNAL, INTERNAL_MESSAGE, new Metadata());
}

function statusError(code: Status, details: string, metadata: Metadata): ServerErrorResponse {
  // grpc-js reads code/details/metadata; an Error subclass keeps it usable as a stream 'error' event payload.
  return Object.assign(new Error(details), { code, details, metadata });
}
