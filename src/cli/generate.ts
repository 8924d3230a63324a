import { readPeftAdapter } from '../adapters/peft.js';
import { validateSamplingParams, type SamplingParams } from '../sampling/index.js';
import { Sequence } from '../scheduler/sequence.js';
import { runBatch } from '../scheduler/batch.js';
import { UsageError } from '../config/usage-error.js';
import { startEngine } from '../engine/start.js';
import { num, parse, str } from './args.js';
import { engineFlags, engineSettings } from './common.js';

export const GENERATE_USAGE = `loraplex generate --model DIR [--adapter DIR] [--quant none|int4|nf4|int8] [--prompt TEXT]
    [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--repetition-penalty R] [--seed S]
    [--stop TEXT]... [--json] [--threads N] [--cache-dir DIR] [--block-size B] [--accuracy-level 0|4] [--asymmetric]`;

export async function generateCommand(argv: string[]): Promise<void> {
  const v = parse(argv, {
    ...engineFlags,
    adapter: { type: 'string' },
    prompt: { type: 'string' },
    'max-new-tokens': { type: 'string' },
    temperature: { type: 'string' },
    'top-k': { type: 'string' },
    'top-p': { type: 'string' },
    'repetition-penalty': { type: 'string' },
    seed: { type: 'string' },
    stop: { type: 'string', multiple: true },
    json: { type: 'boolean' },
  });
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
