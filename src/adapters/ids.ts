import { invalidArgument } from '../errors.js';

/**
 * Adapter ids are names, never paths: they become one directory name under the adapter root, so anything
 * that could climb out of it ('..', separators, absolute paths) or confuse a log line (control characters)
 * is refused. A leading '.' is refused too: the store's own temp and tombstone directories start with one,
 * so no valid id can ever collide with them.
 */

export const MAX_ADAPTER_ID_LENGTH = 128;

const ID_RE = /^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$/;

const RULE = `must be 1-${MAX_ADAPTER_ID_LENGTH} characters of letters, digits, ".", "_", "-" and not start with "."`;

/** Shows a rejected id without echoing control characters or megabytes back to the client. */
function quoted(id: string): string {
  const shown = id.length > 40 ? `${id.slice(0, 40)}...` : id;
  return JSON.stringify(shown);
}

/** Returns the id unchanged when it is a safe adapter name; INVALID_ARGUMENT naming adapter_id otherwise. */
export function validateAdapterId(id: unknown): string {
  if (typeof id !== 'string') throw invalidArgument(`adapter_id: ${RULE}`);
  // The regex alone already excludes '/', '\\', NUL and control characters; '..' is checked separately
  // because dots are allowed inside a name ('v1.2').
  if (!ID_RE.test(id) || id.includes('..')) throw invalidArgument(`adapter_id ${quoted(id)}: ${RULE}`);
  return id;
}
