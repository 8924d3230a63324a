import { readPeftAdapter } from '../adapters/peft.js';
import { validateSamplingParams, type SamplingParams } from '../sampling/index.js';
import { Sequence } from '../scheduler/sequence.js';
import { runBatch } from '../scheduler/batch.js';
import { UsageError } from '../config/usage-error.js';
import { startEngine } from '../engine/start.js';
import { num, parse, str } from './args.js';
import { engineOptions, engineSettings, ENGINE_ABOUT } from './common.js';
import { optionRows, parseArgsOptions, usageText, type CliOptions } from './help.js';

export const GENERATE_USAGE = `loraplex generate --model DIR [--adapter DIR] [--prompt TEXT] [--OPTION VALUE]...
    (loraplex generate --help lists every option)`;

/** What generate adds to the engine options; sampling as the Generate RPC's SamplingParams. */
const GENERATE_OPTIONS: CliOptions = {
  adapter: { type: 'string', arg: ' DIR', help: 'a PEFT adapter directory to apply [none: the base model]' },
  prompt: { type: 'string', arg: ' TEXT', help: "the prompt, tokenized with the model's BOS rule [empty]" },
  'max-new-tokens': { type: 'string', arg: ' N', help: 'tokens to generate at most, capped by the context left [64]' },
  temperature: { type: 'string', arg: ' T', help: '0 = greedy [0]' },
  'top-k': { type: 'string', arg: ' K', help: '0 = off [0]' },
  'top-p': { type: 'string', arg: ' P', help: 'nucleus sampling, in (0, 1] [1]' },
  'repetition-penalty': { type: 'string', arg: ' R', help: 'HF semantics over prompt and generated ids, > 0 [1]' },
  seed: { type: 'string', arg: ' S', help: 'same seed, same tokens [random]' },
  stop: { type: 'string', multiple: true, arg: ' TEXT', help: 'a string that ends generation (not printed)' },
  json: { type: 'boolean', help: 'print {promptIds, tokenIds, text, finishReason} as one JSON line instead of streaming text' },
};

/** `loraplex generate --help`. */
export function generateUsage(): string {
  return usageText('loraplex generate --model DIR [--OPTION VALUE]...', ['Generates from one prompt without a server, on the engine loraplex serve runs. Boolean options take no value.'], [
    ['Generation', optionRows(GENERATE_OPTIONS)],
    [ENGINE_ABOUT, optionRows(engineOptions)],
  ]);
}

export async function generateCommand(argv: string[]): Promise<void> {
  const v = parse(argv, parseArgsOptions({ ...engineOptions, ...GENERATE_OPTIONS }));
  if (typeof v['model'] !== 'string') throw new UsageError(`--model DIR is required\n${GENERATE_USAGE}`);
  const settings = engineSettings(v, v['model']);
  settings.maxNumSeqs = 1;
  const loaded = await startEngine(settings);
  const { engine, tokenizer, compiled, maxModelLen } = loaded;
  try {
    let slot = 0;
    if (typeof v['adapter'] === 'string') {
      const adapter = readPeftAdapter(v['adapter'], compiled.spec);
      await engine.setSlot(1, adapter);
      slot = 1;
    }
    const prompt = str(v, 'prompt', '');
    const promptIds = tokenizer.encode(prompt);
    if (promptIds.length === 0) throw new UsageError('--prompt: encodes to no tokens (give some text, or use a model whose tokenizer adds BOS)');
    const seedRaw = v['seed'];
    const params: SamplingParams = {
      temperature: num(v, 'temperature', 0, { min: 0 }),
      topK: num(v, 'top-k', 0, { integer: true, min: 0 }),
      topP: num(v, 'top-p', 1),
      repetitionPenalty: num(v, 'repetition-penalty', 1),
      maxNewTokens: num(v, 'max-new-tokens', 64, { integer: true, min: 1 }),
      stopTokenIds: [],
      stopStrings: (v['stop'] as unknown as string[] | undefined) ?? [],
      ...(seedRaw !== undefined ? { seed: num(v, 'seed', 0, { integer: true, min: 0 }) } : {}),
    };
    try {
      validateSamplingParams(params, { maxNewTokensLimit: maxModelLen - promptIds.length });
    } catch (e) {
      throw new UsageError(e instanceof Error ? e.message : String(e));
    }
    const seq = new Sequence(promptIds, params, tokenizer, slot, compiled.spec.eosTokenIds, maxModelLen);
    const json = Boolean(v['json']);
    await runBatch(engine, [seq], {
      prefillChunk: settings.prefillChunk,
      onToken: json ? undefined : (_s, ev) => process.stdout.write(ev.text),
    });
    if (json) {
      process.stdout.write(`${JSON.stringify({ promptIds, tokenIds: seq.tokenIds, text: seq.text, finishReason: seq.finishReason })}\n`);
    } else {
      process.stdout.write('\n');
    }
  } finally {
    await engine.close();
  }
}
