/** Writing JSON and Server-Sent Events with backpressure. */
import type { ServerResponse } from 'node:http';
import { httpError, type HttpError } from './errors.js';

export function sendJson(res: ServerResponse, status: number, body: object, headers: Record<string, string> = {}): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { ...headers, 'content-type': 'application/json', 'content-length': Buffer.byteLength(text), 'cache-control': 'no-store' });
  res.end(text);
}

export function sendError(res: ServerResponse, e: HttpError): void {
  sendJson(res, e.status, e.body, e.headers);
}

/** `data: <json>` events, ended by OpenAI's `data: [DONE]`. */
export class SseStream {
  constructor(
    private readonly res: ServerResponse,
    private readonly signal: AbortSignal,
  ) {
    res.writeHead(200, { 'content-type': 'text/event-stream; charset=utf-8', 'cache-control': 'no-cache', connection: 'keep-alive', 'x-accel-buffering': 'no' });
  }

  /** Resolves once the socket can take more (or the client has gone). */
  async send(body: object): Promise<void> {
    if (this.res.writableEnded || this.signal.aborted) return;
    if (this.res.write(`data: ${JSON.stringify(body)}\n\n`)) return;
    await new Promise<void>((resolve) => {
      const done = () => {
        this.res.off('drain', done);
        this.res.off('close', done);
        this.signal.removeEventListener('abort', done);
        resolve();
      };
      this.res.on('drain', done);
      this.res.on('close', done);
      this.signal.addEventListener('abort', done);
    });
  }

  done(): void {
    if (!this.res.writableEnded) this.res.end('data: [DONE]\n\n');
  }

  /** An error after the first event: one `data: {error}` event, then [DONE]. */
  fail(err: unknown): void {
    if (this.res.writableEnded) return;
    this.res.write(`data: ${JSON.stringify(httpError(err).body)}\n\n`);
    this.done();
  }
}
