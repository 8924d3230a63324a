export interface StopResult {
  /** Text safe to show the client now (never contains any part of a matched stop string). */
  text: string;
  /** A stop string was found; generation should end and `text` is the last chunk. */
  stopped: boolean;
  /** The stop string that matched (when stopped). */
  stopString?: string;
}

/**
 * Finds stop strings in streamed text. A stop string may span several deltas, so text
 * that could be the start of one is held back until it either completes (stop, the stop
 * string itself is not emitted, as in OpenAI/HF) or diverges (released).
 */
export class StopStringMatcher {
  private readonly stops: string[];
  private readonly maxLen: number;
  private held = '';
  private done = false;

  constructor(stopStrings: readonly string[]) {
    this.stops = stopStrings.filter((s) => s.length > 0);
    this.maxLen = this.stops.reduce((m, s) => Math.max(m, s.length), 0);
  }

  push(delta: string): StopResult {
    if (this.done) return { text: '', stopped: true };
    if (this.stops.length === 0) return { text: delta, stopped: false };
    const buf = this.held + delta;

    // Earliest match wins; held text never contains a whole stop string, so a match
    // must involve the new delta, but searching the whole (short) buffer is simplest.
    let at = -1;
    let which = '';
    for (const s of this.stops) {
      const i = buf.indexOf(s);
      if (i >= 0 && (at < 0 || i < at)) {
        at = i;
        which = s;
      }
    }
    if (at >= 0) {
      this.done = true;
      this.held = '';
      return { text: buf.slice(0, at), stopped: true, stopString: which };
    }

    // Hold the longest suffix that is a proper prefix of some stop string.
    const keep = this.partialSuffixLength(buf);
    this.held = buf.slice(buf.length - keep);
    return { text: buf.slice(0, buf.length - keep), stopped: false };
  }

  /** End of generation without a stop: release what was held. */
  flush(): string {
    const t = this.done ? '' : this.held;
    this.held = '';
    this.done = true;
    return t;
  }

  private partialSuffixLength(buf: string): number {
    for (let n = Math.min(buf.length, this.maxLen - 1); n > 0; n--) {
      const tail = buf.slice(buf.length - n);
      if (this.stops.some((s) => s.startsWith(tail))) return n;
    }
    return 0;
  }
}
