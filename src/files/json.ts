/**
 * JSON from files others can write. JSON.parse alone is unsafe for them: its message quotes the input (a
 * symlinked secret would be echoed to the client), it takes any size, and a value nested thousands deep
 * overflows the stack of whatever later walks or stringifies it. Messages here give a position only.
 */

export interface JsonCaps {
  /** Largest input in UTF-8 bytes. */
  maxBytes: number;
  /** Most nested arrays/objects (a flat object is depth 1). */
  maxDepth: number;
  /** Names the input in messages, e.g. 'adapter_config.json'. */
  what: string;
}

export class UntrustedJsonError extends Error {
  constructor(
    readonly what: string,
    /** What is wrong, without `what` and never quoting the input. */
    readonly detail: string,
  ) {
    super(`${what}: ${detail}`);
    this.name = 'UntrustedJsonError';
  }
}

const QUOTE = 0x22;
const BACKSLASH = 0x5c;
const OPENERS = new Set([0x5b, 0x7b]); // [ {
const CLOSERS = new Set([0x5d, 0x7d]); // ] }

/** Index of the first bracket past maxDepth, or -1. Skips strings, so brackets inside them do not count. */
function tooDeepAt(text: string, maxDepth: number): number {
  let depth = 0;
  let inString = false;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (inString) {
      if (c === BACKSLASH) i++;
      else if (c === QUOTE) inString = false;
    } else if (c === QUOTE) inString = true;
    else if (OPENERS.has(c)) {
      if (++depth > maxDepth) return i;
    } else if (CLOSERS.has(c)) depth--;
  }
  return -1;
}

/** JSON.parse's position when its message has one; the message itself is never passed on. */
function parsePosition(err: unknown): string {
  const m = /position (\d+)/.exec(err instanceof Error ? err.message : '');
  return m ? ` (at position ${m[1]})` : '';
}

/** Parses text (or UTF-8 bytes) within the caps; UntrustedJsonError otherwise. */
export function parseJsonCapped(input: string | Uint8Array, caps: JsonCaps): unknown {
  const bytes = typeof input === 'string' ? Buffer.byteLength(input, 'utf8') : input.length;
  if (bytes > caps.maxBytes) throw new UntrustedJsonError(caps.what, `${bytes} bytes exceed the limit of ${caps.maxBytes}`);
  const text = typeof input === 'string' ? input : Buffer.from(input.buffer, input.byteOffset, input.length).toString('utf8');
  const deep = tooDeepAt(text, caps.maxDepth);
  if (deep >= 0) throw new UntrustedJsonError(caps.what, `nests deeper than ${caps.maxDepth} levels (at position ${deep})`);
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new UntrustedJsonError(caps.what, `is not valid JSON${parsePosition(err)}`);
  }
}

/** A value for a message: JSON, cut to `max` characters (safe on capped input, whose depth is bounded). */
export function clipJson(value: unknown, max = 80): string {
  const s = JSON.stringify(value) ?? String(value);
  return s.length > max ? `${s.slice(0, max)}...` : s;
}
