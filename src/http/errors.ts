/**
 * The HTTP API's one error map: a LoraplexError's code -> an HTTP status and OpenAI's error JSON
 * `{error: {message, type, param, code}}`. Like src/rpc/status.ts, anything that is not a LoraplexError is a bug:
 * the client gets a generic 500 and the detail goes to the log.
 */
import { LoraplexError, type ErrorCode } from '../errors.js';
import { INTERNAL_MESSAGE } from '../rpc/status.js';

const HTTP_STATUS: Readonly<Record<ErrorCode, number>> = {
  INVALID_ARGUMENT: 400,
  FAILED_PRECONDITION: 400,
  UNAUTHENTICATED: 401,
  PERMISSION_DENIED: 403,
  NOT_FOUND: 404,
  ALREADY_EXISTS: 409,
  // nginx's "client closed request": only ever logged, the client has gone.
  CANCELLED: 499,
  RESOURCE_EXHAUSTED: 429,
  INTERNAL: 500,
  UNAVAILABLE: 503,
  DEADLINE_EXCEEDED: 504,
};

/** OpenAI's `type` for each status (its SDKs pick the exception class from the status itself). */
const ERROR_TYPE: Readonly<Record<number, string>> = {
  400: 'invalid_request_error',
  401: 'authentication_error',
  403: 'permission_error',
  404: 'not_found_error',
  409: 'invalid_request_error',
  413: 'invalid_request_error',
  429: 'rate_limit_error',
  503: 'service_unavailable_error',
};

export interface HttpError {
  status: number;
  headers: Record<string, string>;
  body: { error: { message: string; type: string; param: string | null; code: string | null } };
}

/** A message starts with the field it names (`max_tokens 5000: ...`, `messages[1].role: ...`). */
const LEADING_FIELD = /^([a-z_][a-z0-9_]*(?:\[\d+\])?(?:\.[a-z_][a-z0-9_]*(?:\[\d+\])?)*)[ :]/;

export function httpError(err: unknown): HttpError {
  if (!(err instanceof LoraplexError)) return shape(500, INTERNAL_MESSAGE, 'internal', null);
  const status = HTTP_STATUS[err.code];
  const headers: Record<string, string> = {};
  if (err.code === 'RESOURCE_EXHAUSTED' && typeof err.retryAfterMs === 'number' && Number.isFinite(err.retryAfterMs)) {
    headers['retry-after'] = String(Math.max(1, Math.ceil(err.retryAfterMs / 1000)));
  }
  const param = status === 400 || status === 404 ? (LEADING_FIELD.exec(err.message)?.[1] ?? null) : null;
  return { ...shape(status, err.message, err.code.toLowerCase(), param), headers };
}

export function shape(status: number, message: string, code: string | null, param: string | null): HttpError {
  return { status, headers: {}, body: { error: { message, type: ERROR_TYPE[status] ?? 'server_error', param, code } } };
}
