import { create, ScalarType, type DescField } from '@bufbuild/protobuf';
import { TrainRequestSchema, type TrainRequest } from '../gen/loraplex/v1/train_pb.js';
import { TRAIN_DEFAULTS } from '../train/config.js';
import { UsageError } from '../config/usage-error.js';

/**
 * `loraplex train`'s training flags are the Train RPC's request fields, read from the TrainRequest descriptor:
 * `--kebab-case` of each field name, typed by the field, so a field added to proto/loraplex/v1/train.proto is a
 * flag at once. The flags build a TrainRequest that goes through the RPC's own conversion (rpc/train-handlers.ts)
 * and validation (train/config.ts), so the CLI and the RPC cannot disagree on a default or a limit.
 */

/** Fields the CLI takes another way: the adapter is --out, examples come from files (--data, --eval-data). */
const NOT_FLAGS: ReadonlySet<string> = new Set(['adapter_id', 'examples', 'eval_examples', 'path', 'eval_path']);

/** What the RPC's messages call a field the CLI takes as another flag. */
const RENAMED: Readonly<Record<string, string>> = { path: '--data', eval_path: '--eval-data', adapter_id: '--out' };

/**
 * One line of help per field: protobuf-es keeps no comments at run time. Defaults come from TRAIN_DEFAULTS where it
 * has the field; the others state theirs. test/cli/cli.test.ts checks that every flag field has a line.
 */
export const TRAIN_FIELD_HELP: Readonly<Record<string, string>> = {
  r: 'LoRA rank',
  lora_alpha: 'LoRA alpha; the scaling is lora_alpha / r (lora_alpha / sqrt(r) with --use-rslora)',
  lora_dropout: 'dropout on the LoRA input during training steps, in [0, 1)',
  target_modules: 'comma-separated PEFT module names (q_proj,v_proj,...) or all-linear [the family\'s: q_proj,v_proj for llama, c_attn for gpt2]',
  use_rslora: 'rank-stabilized scaling lora_alpha / sqrt(r)',
  learning_rate: 'peak learning rate, in (0, 1]',
  adam_beta1: 'AdamW beta1, in [0, 1)',
  adam_beta2: 'AdamW beta2, in [0, 1)',
  adam_epsilon: 'AdamW epsilon, in (0, 1]',
  weight_decay: 'decoupled weight decay, in [0, 1]',
  lr_scheduler_type: 'constant, linear or cosine',
  warmup_steps: 'linear warm-up from 0 over N steps [0]; not with --warmup-ratio',
  warmup_ratio: 'linear warm-up over this fraction of the steps [0], in [0, 1)',
  max_grad_norm: 'gradient clipping by global norm; 0 turns it off',
  micro_batch_size: 'sequences per forward pass; times --max-seq-length at most 65536',
  gradient_accumulation_steps: 'micro-batches per optimizer step, in [1, 1024]',
  num_epochs: 'passes over the data, in [1, 1000]',
  max_steps: 'optimizer steps; > 0 overrides --num-epochs [0]',
  max_seq_length: "tokens per packed row, at most the model's positions",
  seed: 'seed of the LoRA initialization and the data order',
  eval_fraction: 'fraction of the packed rows held out for eval, in [0, 0.5]; not with --eval-data',
  eval_every: 'evaluate every N optimizer steps (0: only at the end)',
  checkpoint_every: 'checkpoint every N optimizer steps into --job-dir (0: never); a rerun with the same --job-dir resumes',
  keep_checkpoints: 'checkpoints kept on disk, in [1, 100]',
  gradient_checkpointing: 'turn off recomputing each decoder layer in backward (faster steps, much more memory)',
  prepacked_forward: "the 4-bit base's forward through onnxruntime's prepacked MatMulNBits kernel (about 1.3x faster steps, +0.55 GB on a 1.1B model; exact gradients)",
  text_split:
    "how a .txt file is read [stream]: stream = the whole text as one token stream, newlines kept, BOS once, packed into --max-seq-length rows (as datasets' text loader + group_texts); paragraph = one BOS...EOS document per blank-line-separated paragraph; document = the whole file as one BOS...EOS document; line = one document per line",
};

const kebab = (snake: string) => snake.replace(/_/g, '-');

export const TRAIN_FLAG_FIELDS: readonly DescField[] = TrainRequestSchema.fields.filter((f) => !NOT_FLAGS.has(f.name));

const isBool = (f: DescField) => f.fieldKind === 'scalar' && f.scalar === ScalarType.BOOL;

/** A boolean that defaults to true can only be turned off: its flag is `--no-...`. */
const negated = (f: DescField) => isBool(f) && (TRAIN_DEFAULTS as Record<string, unknown>)[f.localName] === true;

export const flagOfField = (f: DescField) => `${negated(f) ? 'no-' : ''}${kebab(f.name)}`;

/** The enum's value names as flags take them: TEXT_SPLIT_STREAM -> stream (the unspecified value is the default). */
function enumChoices(f: DescField & { fieldKind: 'enum' }): { name: string; number: number }[] {
  return f.enum.values.filter((v) => v.number !== 0).map((v) => ({ name: v.localName.toLowerCase(), number: v.number }));
}

function placeholderOf(f: DescField): string {
  switch (f.fieldKind) {
    case 'enum':
      return ` ${enumChoices(f).map((c) => c.name).join('|')}`;
    case 'list':
      return ' A,B,...';
    case 'scalar':
      if (f.scalar === ScalarType.BOOL) return '';
      if (f.scalar === ScalarType.STRING) return ` ${f.name === 'lr_scheduler_type' ? 'constant|linear|cosine' : 'TEXT'}`;
      return ' N';
    default:
      return ' VALUE';
  }
}

function defaultNote(f: DescField): string {
  const d = (TRAIN_DEFAULTS as Record<string, unknown>)[f.localName];
  return d === undefined || negated(f) ? '' : ` [${String(d)}]`;
}

/** parseArgs options for the field flags. */
export function trainFieldFlags(): Record<string, { type: 'string' | 'boolean' }> {
  return Object.fromEntries(TRAIN_FLAG_FIELDS.map((f) => [flagOfField(f), { type: isBool(f) ? 'boolean' : 'string' }]));
}

/** Help rows `[--flag PLACEHOLDER, description [default]]` for the field flags, in the proto's order. */
export function trainFieldHelpRows(): [string, string][] {
  return TRAIN_FLAG_FIELDS.map((f) => [`--${flagOfField(f)}${placeholderOf(f)}`, `${TRAIN_FIELD_HELP[f.name] ?? `TrainRequest.${f.name}`}${defaultNote(f)}`]);
}

const INTEGER_RE = /^[+-]?\d+$/;

function fieldValue(f: DescField, raw: string | boolean): unknown {
  const flag = `--${flagOfField(f)}`;
  if (f.fieldKind === 'list') return String(raw).split(',').map((x) => x.trim()).filter((x) => x.length > 0);
  if (f.fieldKind === 'enum') {
    const choices = enumChoices(f);
    const hit = choices.find((c) => c.name === String(raw).toLowerCase());
    if (!hit) throw new UsageError(`${flag} ${String(raw)}: must be one of ${choices.map((c) => c.name).join(', ')}`);
    return hit.number;
  }
  if (f.fieldKind !== 'scalar') throw new Error(`TrainRequest.${f.name}: no flag form for a ${f.fieldKind} field`);
  switch (f.scalar) {
    case ScalarType.BOOL:
      return negated(f) ? raw !== true : raw === true;
    case ScalarType.STRING:
      return String(raw);
    case ScalarType.UINT64:
    case ScalarType.INT64:
    case ScalarType.FIXED64:
    case ScalarType.SFIXED64:
    case ScalarType.SINT64: {
      const text = String(raw).trim();
      if (!INTEGER_RE.test(text)) throw new UsageError(`${flag} ${String(raw)}: must be an integer`);
      return BigInt(text);
    }
    default: {
      // Ranges and integrality are the RPC validator's to check (its messages are turned into flag names).
      const v = typeof raw === 'string' && raw.trim() !== '' ? Number(raw) : NaN;
      if (!Number.isFinite(v)) throw new UsageError(`${flag} ${String(raw)}: must be a number`);
      return v;
    }
  }
}

/** The TrainRequest the flags describe (unset flags stay unset: the RPC's defaults apply). */
export function trainRequestFromFlags(values: Record<string, string | boolean | undefined>): TrainRequest {
  const init: Record<string, unknown> = {};
  for (const f of TRAIN_FLAG_FIELDS) {
    const raw = values[flagOfField(f)];
    if (raw !== undefined) init[f.localName] = fieldValue(f, raw);
  }
  return create(TrainRequestSchema, init);
}

/** An RPC validation message (`learning_rate 0: must be in (0, 1]`) as the CLI user wrote it (`--learning-rate 0: ...`). */
export function asFlagMessage(message: string): string {
  const m = /^([a-z][a-z0-9_]*)(?=[ :])/.exec(message);
  if (!m || !TrainRequestSchema.fields.some((f) => f.name === m[1])) return message;
  const name = m[1]!;
  return `${RENAMED[name] ?? `--${kebab(name)}`}${message.slice(name.length)}`;
}
