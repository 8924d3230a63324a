import { createLogger } from '../obs/logger.js';
import type { ServerConfig } from '../config/server-config.js';
import { startServer } from '../main.js';
import { ConfigError, resolveConfig, serveUsage, wantsHelp } from '../config/parse.js';
import { ApiKeysError } from '../rpc/auth.js';
import { TlsConfigError } from '../rpc/tls.js';

export const SERVE_USAGE = `loraplex serve [--config FILE] [--model DIR] [--port P] [--auth required|disabled] [--api-keys-file PATH] ...
    (loraplex serve --help lists every setting, its flag, environment variable and default)`;

export async function serveCommand(argv: string[]): Promise<void> {
  if (wantsHelp(argv)) {
    // cli/main.ts keeps a started server running forever; help must end the process itself, once written.
    process.stdout.write(serveUsage(), () => process.exit(0));
    return;
  }
  const { config: cfg, configFile, settings } = resolveConfig({ argv }); // ConfigError (a UsageError): exit 2, one message
  const log = createLogger({ level: cfg.logLevel });
  const from = Object.fromEntries([...settings].filter(([, r]) => r.source !== 'default').map(([name, r]) => [name, r.source]));
  log.info({ configFile, setFrom: from }, 'configuration');
  let server;
  try {
    server = await startServer(cfg satisfies ServerConfig, log);
  } catch (err) {
    // A keys file or certificate that cannot be used is a configuration error like any other: exit 2.
    if (err instanceof ApiKeysError || err instanceof TlsConfigError) throw new ConfigError([err.message]);
    throw err;
  }
  let draining = false;
  const onSignal = (signal: string) => {
    if (draining) return;
    draining = true;
    log.info({ signal }, 'shutting down');
    server.drain().then(
      () => process.exit(0),
      (err) => {
        log.error({ err }, 'drain failed');
        process.exit(1);
      },
    );
  };
  process.on('SIGTERM', () => onSignal('SIGTERM'));
  process.on('SIGINT', () => onSignal('SIGINT'));
  // Rotated keys (a Secret update) take effect without a restart; a broken file keeps the old keys.
  process.on('SIGHUP', () => {
    try {
      log.info({ keys: server.reloadApiKeys() }, 'API keys reloaded');
    } catch (err) {
      log.error({ err: err instanceof Error ? err.message : String(err) }, 'API keys reload failed; keeping the old keys');
    }
  });
}
