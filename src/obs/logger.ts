import { pino, type Logger } from 'pino';

export type { Logger };

/** JSON lines on stdout (or fd 2 when stdout carries command output); camelCase fields, short messages. */
export function createLogger(opts: { level?: string; destination?: 1 | 2 } = {}): Logger {
  return pino({ level: opts.level ?? process.env['LORAPLEX_LOG_LEVEL'] ?? 'info', base: { service: 'loraplex' } }, pino.destination({ fd: opts.destination ?? 1, sync: false }));
}
