/**
 * `loraplex serve` as a child process for the bench: spawned with the bench's quantization, followed through its
 * JSON log lines until "serving", and stopped with SIGTERM. Peak RSS is read from /proc (VmHWM) while it lives.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import type { QuantOptions } from '../../kernels/quant/index.js';

const CLI = join(process.cwd(), 'dist', 'src', 'cli', 'main.js');

export interface LogLine {
  msg?: string;
  /** pino's epoch milliseconds at the log call. */
  time?: number;
  port?: number;
  cached?: boolean;
  startSeconds?: number;
}

export interface ServeProcess {
  child: ChildProcess;
  port: number;
  spawnedAt: number;
  /** Log messages seen until "serving", with seconds since spawn (from pino's own stamps). */
  at: Map<string, { seconds: number; line: LogLine }>;
  /** VmHWM of the serve process, MiB. */
  peakRssMiB(): number;
  stop(): Promise<void>;
}

export async function launchServe(modelDir: string, cacheDir: string, quant: QuantOptions, threads: number, extraArgs: string[] = []): Promise<ServeProcess> {
  const scratch = mkdtempSync(join(tmpdir(), 'loraplex-bench-serve-'));
  const args = [
    CLI, 'serve', '--model', modelDir, '--cache-dir', cacheDir, '--threads', String(threads), '--host', '127.0.0.1', '--port', '0',
    '--auth', 'disabled', '--metrics-port', '0', '--http-port', '0', '--quant', quant.kind, '--block-size', String(quant.blockSize ?? 32),
    '--accuracy-level', String(quant.accuracyLevel ?? 4), '--adapter-root', join(scratch, 'adapters'), '--data-root', join(scratch, 'data'),
    '--job-root', join(scratch, 'jobs'), '--export-root', join(scratch, 'exports'), ...extraArgs,
  ];
  const spawnedAt = Date.now();
  const child = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'inherit'] });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
    await exited;
  };
  // Times come from pino's own stamps: pino writes asynchronously, so a line can reach the pipe only after the
  // synchronous work that follows it.
  const at = new Map<string, { seconds: number; line: LogLine }>();
  try {
    const lines = createInterface({ input: child.stdout! });
    for await (const text of lines) {
      let line: LogLine;
      try {
        line = JSON.parse(text) as LogLine;
      } catch {
        continue;
      }
      if (line.msg && line.time) at.set(line.msg, { seconds: (line.time - spawnedAt) / 1000, line });
      if (line.msg === 'serving') break;
    }
    const listening = at.get('listening; loading the model');
    if (!listening || !at.has('serving')) throw new Error(`loraplex serve exited (code ${child.exitCode}) before "serving"`);
    // Keep draining stdout so the child never blocks on a full pipe.
    child.stdout!.resume();
    const peakRssMiB = () => {
      const status = readFileSync(`/proc/${child.pid}/status`, 'utf8');
      return Math.round(Number(/^VmHWM:\s+(\d+) kB/m.exec(status)?.[1] ?? 0) / 1024);
    };
    return { child, port: listening.line.port!, spawnedAt, at, peakRssMiB, stop };
  } catch (e) {
    await stop();
    throw e;
  }
}
