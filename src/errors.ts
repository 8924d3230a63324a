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

export interface LoraplexErrorOptions {
  /** For the log only: never shown to the client. */
  cause?: unknown;
  /** RESOURCE_EXHAUSTED: when a retry may succeed; src/rpc sends it as a trailer (connect-es keeps such metadata on the error). */
  retryAfterMs?: number;
}

export class LoraplexError extends Error {
  /** Set only when given, so errors without a hint keep their shape (`declare`: no own property otherwise). */
  declare readonly retryAfterMs?: number;

  constructor(
    readonly code: ErrorCode,
    message: string,
    options?: LoraplexErrorOptions,
  ) {
    super(message, options && 'cause' in options ? { cause: options.cause } : undefined);
    this.name = 'LoraplexError';
    if (options?.retryAfterMs !== undefined) Object.assign(this, { retryAfterMs: options.retryAfterMs });
  }
}

export const invalidArgument = (message: string, cause?: unknown) => new LoraplexError('INVALID_ARGUMENT', message, { cause });
export const notFound = (message: string) => new LoraplexError('NOT_FOUND', message);
export const failedPrecondition = (message: string) => new LoraplexError('FAILED_PRECONDITION', message);
export const resourceExhausted = (message: string, options?: LoraplexErrorOptions) => new LoraplexError('RESOURCE_EXHAUSTED', message, options);

/** errno codes of a full disk or an exhausted quota. */
const DISK_FULL = new Set(['ENOSPC', 'EDQUOT']);

/**
 * A write that failed for lack of space, as RESOURCE_EXHAUSTED naming the root it went to (`adapter root`,
 * `export root`, `job root`); any other error is returned unchanged. Looks through `cause` chains.
 */
export function diskFullAs(err: unknown, root: string): unknown {
  for (let e: unknown = err, depth = 0; e instanceof Error && depth < 8; e = e.cause, depth++) {
    if (DISK_FULL.has((e as NodeJS.ErrnoException).code ?? '')) {
      return new LoraplexError('RESOURCE_EXHAUSTED', `${root}: no space left on the device; free space and retry`, { cause: err });
    }
  }
  return err;
}
