/**
 * Domain errors carry a code; only src/rpc maps codes to gRPC statuses. Messages name the field and the
 * limit; they go to the client verbatim, so they never contain internal paths or stack traces.
 */
export type ErrorCode =
  | 'INVALID_ARGUMENT'
  | 'NOT_FOUND'
  | 'ALREADY_EXISTS'
  | 'FAILED_PRECONDITION'
  | 'RESOURCE_EXHAUSTED'
  | 'PERMISSION_DENIED'
  | 'UNAUTHENTICATED'
  | 'UNAVAILABLE'
  | 'CANCELLED'
  | 'DEADLINE_EXCEEDED'
  | 'INTERNAL';

export class LoraplexError extends Error {
  constructor(
    readonly code: ErrorCode,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
    this.name = 'LoraplexError';
  }
}

export const invalidArgument = (message: string, cause?: unknown) => new LoraplexError('INVALID_ARGUMENT', message, { cause });
export const notFound = (message: string) => new LoraplexError('NOT_FOUND', message);
export const failedPrecondition = (message: string) => new LoraplexError('FAILED_PRECONDITION', message);
export const resourceExhausted = (message: string) => new LoraplexError('RESOURCE_EXHAUSTED', message);
