#!/usr/bin/env node
import { UsageError } from '../config/usage-error.js';
import { serveUsage, wantsHelp } from '../config/parse.js';
import { GENERATE_USAGE, generateCommand, generateUsage } from './generate.js';
import { MAKE_MODEL_USAGE, makeModelCommand, makeModelUsage } from './make-model.js';
import { SERVE_USAGE, serveCommand } from './serve.js';
import { TRAIN_USAGE, trainCommand, trainUsage } from './train.js';

const USAGE = `loraplex: serve and fine-tune many LoRA adapters on one 4-bit base model

Commands (loraplex COMMAND --help lists a command's options):
  ${SERVE_USAGE}
  ${GENERATE_USAGE}
  ${TRAIN_USAGE}
  ${MAKE_MODEL_USAGE}
`;

/** Each command's `--help` (or -h): its usage on stdout, exit 0. */
const HELP: Readonly<Record<string, () => string>> = {
  serve: serveUsage,
  generate: generateUsage,
  train: trainUsage,
  'make-model': makeModelUsage,
};

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  const help = command !== undefined && Object.hasOwn(HELP, command) ? HELP[command] : undefined;
  if (help && wantsHelp(rest)) {
    process.stdout.write(help());
    return 0;
  }
  switch (command) {
    case 'serve':
      await serveCommand(rest);
      return new Promise<number>(() => undefined); // runs until a signal drains it
    case 'generate':
      await generateCommand(rest);
      return 0;
    case 'train':
      await trainCommand(rest);
      return 0;
    case 'make-model':
      await makeModelCommand(rest);
      return 0;
    case 'help': {
      // `loraplex help train` = `loraplex train --help`
      const topic = rest[0] !== undefined && Object.hasOwn(HELP, rest[0]) ? HELP[rest[0]] : undefined;
      process.stdout.write(topic ? topic() : USAGE);
      return 0;
    }
    case undefined:
    case '--help':
    case '-h':
      process.stdout.write(USAGE);
      return command === undefined ? 2 : 0;
    default:
      process.stderr.write(`unknown command ${JSON.stringify(command)}\n\n${USAGE}`);
      return 2;
  }
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (e: unknown) => {
    // Usage and model-format errors are the user's to fix: one line, no stack.
    const err = e instanceof Error ? e : new Error(String(e));
    process.stderr.write(`loraplex: ${err.message}\n`);
    if (!(e instanceof UsageError) && process.env['LORAPLEX_DEBUG']) process.stderr.write(`${err.stack}\n`);
    process.exit(e instanceof UsageError ? 2 : 1);
  },
);
