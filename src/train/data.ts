import { realpathSync, statSync } from 'node:fs';
import { extname, isAbsolute, relative, resolve } from 'node:path';
import { isUnder, readUnderRoot, realRoot, UnderRootError } from '../files/under-root.js';
import { parseJsonCapped, UntrustedJsonError } from '../files/json.js';
import { invalidArgument, notFound } from '../errors.js';
import type { ChatMessage } from '../tokenizer/tokenizer.js';

/**
 * Training data as text-level examples: inline in the request, or a .txt / .jsonl file under the data
 * root. Nothing here tokenizes (collate.ts does). Every problem is INVALID_ARGUMENT naming the field,
 * example index or file line; messages echo the user's relative path, never the server's.
 */

export type Example =
  /**
   * Plain text: the loss is on every token. `stream`: a run of a corpus rather than a document, tokenized
   * exactly as the tokenizer encodes it (its BOS) with no EOS appended (a .txt file read as one stream).
   */
  | { kind: 'text'; text: string; stream?: true }
  /** The loss is on the completion only; the two are concatenated as given (add any separator yourself). */
  | { kind: 'completion'; prompt: string; completion: string }
  /** Rendered with the model's chat template; the loss is on the assistant turns (collate.ts). */
  | { kind: 'chat'; messages: ChatMessage[] };

/** One example as a request or a .jsonl line writes it. */
export interface ExampleInput {
  text?: string | null;
  prompt?: string | null;
  completion?: string | null;
  messages?: readonly { role?: unknown; content?: unknown }[] | null;
}

/**
 * How a .txt file becomes examples: 'stream' (default: the whole text verbatim, separators kept, as one token
 * stream with the tokenizer's BOS once at its start and no EOS, packed into max_seq_length rows: what HF
 * `datasets`' text loader plus run_clm's group_texts trains on), 'paragraph' (split on blank lines, as
 * datasets' sample_by="paragraph", each paragraph a document with BOS...EOS; suits independent passages),
 * 'document' (the whole file, trimmed, is one BOS...EOS document), 'line' (one document per non-empty line).
 */
export type TextSplit = 'stream' | 'paragraph' | 'document' | 'line';
export const TEXT_SPLITS: readonly TextSplit[] = ['stream', 'paragraph', 'document', 'line'];
export const DEFAULT_TEXT_SPLIT: TextSplit = 'stream';

export interface DataSourceInput {
  /** Inline examples (exactly one of examples / path). */
  examples?: readonly ExampleInput[] | null;
  /** A .txt or .jsonl file, relative to the data root. */
  path?: string | null;
  /** An optional separate eval set, inline or as a file. */
  evalExamples?: readonly ExampleInput[] | null;
  evalPath?: string | null;
  textSplit?: TextSplit | '' | null;
}

export interface DataLimits {
  /** Files are read from here only. Unset: file sources are refused. */
  dataRoot?: string | null;
  /** Largest data file in bytes. Default 64 MiB. */
  maxFileBytes?: number;
  /** Most examples (or .txt documents) in one set. Default 1,000,000. */
  maxExamples?: number;
}

export interface TrainData {
  train: Example[];
  /** A separate eval set, or null (collate may still hold out eval_fraction of the training data). */
  eval: Example[] | null;
}

const DEFAULT_MAX_FILE_BYTES = 64 * 1024 * 1024;
const DEFAULT_MAX_EXAMPLES = 1_000_000;
/** A chat example is 3 levels deep (line, messages, message); the rest is slack. */
const MAX_LINE_DEPTH = 32;

const isSet = <T>(v: T | null | undefined | ''): v is T => v !== undefined && v !== null && v !== '';

/** Validates one example; `where` names it in messages (`examples[3]`, `data.jsonl line 7`). */
export function parseExample(input: unknown, where: string): Example {
  if (typeof input !== 'object' || input === null || Array.isArray(input)) {
    throw invalidArgument(`${where}: must be an object with text, prompt + completion, or messages`);
  }
  const o = input as Record<string, unknown>;
  const has = (k: string) => o[k] !== undefined && o[k] !== null;
  const forms = [has('text'), has('prompt') || has('completion'), has('messages')].filter(Boolean).length;
  if (forms !== 1) throw invalidArgument(`${where}: must have exactly one of text, prompt + completion, or messages`);
  const str = (k: string, nonEmpty: boolean): string => {
    const v = o[k];
    if (typeof v !== 'string') throw invalidArgument(`${where}.${k}: must be a string`);
    if (nonEmpty && v.length === 0) throw invalidArgument(`${where}.${k}: must not be empty`);
    return v;
  };
  if (has('text')) return { kind: 'text', text: str('text', true) };
  if (has('prompt') || has('completion')) {
    if (!has('completion')) throw invalidArgument(`${where}.completion: is missing (prompt needs a completion)`);
    return { kind: 'completion', prompt: has('prompt') ? str('prompt', false) : '', completion: str('completion', true) };
  }
  const msgs = o['messages'];
  if (!Array.isArray(msgs) || msgs.length === 0) throw invalidArgument(`${where}.messages: must be a non-empty list`);
  const messages: ChatMessage[] = msgs.map((m: unknown, i) => {
    const at = `${where}.messages[${i}]`;
    if (typeof m !== 'object' || m === null) throw invalidArgument(`${at}: must be an object with role and content`);
    const { role, content } = m as Record<string, unknown>;
    if (typeof role !== 'string' || role.length === 0) throw invalidArgument(`${at}.role: must be a non-empty string`);
    if (typeof content !== 'string') throw invalidArgument(`${at}.content: must be a string`);
    return { role, content };
  });
  if (!messages.some((m) => m.role === 'assistant')) {
    throw invalidArgument(`${where}.messages: needs at least one assistant message (the loss is on assistant turns)`);
  }
  return { kind: 'chat', messages };
}

function parseInline(field: string, inputs: readonly ExampleInput[], maxExamples: number): Example[] {
  if (inputs.length > maxExamples) throw invalidArgument(`${field}: ${inputs.length} examples exceed the limit of ${maxExamples}`);
  return inputs.map((e, i) => parseExample(e, `${field}[${i}]`));
}

/**
 * Resolves a user's relative path inside the data root, or throws. Refused: absolute paths, any `..`
 * segment, anything whose real path (symlinks resolved) is outside the root's real path, non-files,
 * files over maxFileBytes, and extensions other than .txt / .jsonl.
 */
export function resolveDataPath(dataRoot: string, userPath: string, field = 'path', maxFileBytes = DEFAULT_MAX_FILE_BYTES): string {
  const show = JSON.stringify(userPath);
  if (userPath.length === 0) throw invalidArgument(`${field}: must not be empty`);
  if (userPath.includes('\0')) throw invalidArgument(`${field} ${show}: must not contain NUL`);
  if (isAbsolute(userPath) || /^[a-zA-Z]:/.test(userPath) || userPath.startsWith('\\')) {
    throw invalidArgument(`${field} ${show}: must be relative to the data root`);
  }
  if (userPath.split(/[\\/]/).includes('..')) throw invalidArgument(`${field} ${show}: must not contain '..'`);
  const ext = extname(userPath).toLowerCase();
  if (ext !== '.txt' && ext !== '.jsonl') throw invalidArgument(`${field} ${show}: must be a .txt or .jsonl file`);
  let rootReal: string;
  try {
    rootReal = realpathSync(dataRoot);
  } catch {
    throw invalidArgument(`${field}: the server's data root is not available`);
  }
  let real: string;
  try {
    real = realpathSync(resolve(rootReal, userPath));
  } catch {
    throw notFound(`${field} ${show}: no such file under the data root`);
  }
  if (!isUnder(rootReal, real) || real === rootReal) throw invalidArgument(`${field} ${show}: resolves outside the data root`);
  const st = statSync(real);
  if (!st.isFile()) throw invalidArgument(`${field} ${show}: is not a regular file`);
  if (st.size > maxFileBytes) throw invalidArgument(`${field} ${show}: ${st.size} bytes exceed the limit of ${maxFileBytes}`);
  return real;
}

/**
 * Reads a resolved data file by the under-root rule (files/under-root.ts), so a file swapped after
 * resolveDataPath cannot be a symlink out, a FIFO or a larger file: size and type come from the open descriptor.
 */
function readBounded(dataRoot: string, real: string, show: string, field: string, maxFileBytes: number): string {
  let bytes: Uint8Array;
  try {
    const rootReal = realRoot(dataRoot);
    bytes = readUnderRoot(rootReal, relative(rootReal, real), maxFileBytes);
  } catch (err) {
    if (!(err instanceof UnderRootError)) throw err;
    throw invalidArgument(`${field} ${show}: ${err.problem === 'unreadable' ? 'cannot be opened' : err.detail}`);
  }
  try {
    return new TextDecoder('utf-8', { fatal: true }).decode(bytes);
  } catch {
    throw invalidArgument(`${field} ${show}: is not valid UTF-8`);
  }
}

/** .txt -> text examples per `split`. */
export function parseTxt(content: string, split: TextSplit): Example[] {
  // Line ends as Python's text mode reads them (datasets opens files so): \r\n and \r become \n.
  const text = content.replace(/\r\n?/g, '\n');
  if (split === 'stream') return /\S/.test(text) ? [{ kind: 'text', text, stream: true }] : [];
  let docs: string[];
  if (split === 'document') docs = [text];
  else if (split === 'line') docs = text.split('\n');
  else docs = text.split(/\n[ \t]*\n/);
  // Trailing newlines carry no content; the EOS marks the end instead.
  return docs.map((d) => d.replace(/^\n+|\s+$/g, '')).filter((d) => d.length > 0).map((text) => ({ kind: 'text', text }));
}

/** .jsonl -> examples; blank lines are skipped; errors name the 1-based line. */
export function parseJsonl(content: string, show: string): Example[] {
  const out: Example[] = [];
  const lines = content.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i]!.replace(/\r$/, '');
    if (line.trim().length === 0) continue;
    const where = `${show} line ${i + 1}`;
    let v: unknown;
    try {
      // A line is bounded by the file's size cap already; the depth cap keeps deep values off the stack.
      v = parseJsonCapped(line, { maxBytes: Number.MAX_SAFE_INTEGER, maxDepth: MAX_LINE_DEPTH, what: where });
    } catch (e) {
      if (!(e instanceof UntrustedJsonError)) throw e;
      throw invalidArgument(`${where}: ${e.detail.replace(/^is /, '')}`);
    }
    out.push(parseExample(v, where));
  }
  return out;
}

function loadFile(field: string, userPath: string, split: TextSplit, limits: DataLimits): Example[] {
  if (!isSet(limits.dataRoot)) throw invalidArgument(`${field}: this server has no data root configured; send the examples inline`);
  const maxBytes = limits.maxFileBytes ?? DEFAULT_MAX_FILE_BYTES;
  const real = resolveDataPath(limits.dataRoot, userPath, field, maxBytes);
  const show = JSON.stringify(userPath);
  const content = readBounded(limits.dataRoot, real, show, field, maxBytes);
  const examples = extname(real).toLowerCase() === '.jsonl' ? parseJsonl(content, `${field} ${show}`) : parseTxt(content, split);
  const max = limits.maxExamples ?? DEFAULT_MAX_EXAMPLES;
  if (examples.length > max) throw invalidArgument(`${field} ${show}: ${examples.length} examples exceed the limit of ${max}`);
  if (examples.length === 0) throw invalidArgument(`${field} ${show}: holds no examples`);
  return examples;
}

function loadSet(exField: string, pathField: string, examples: DataSourceInput['examples'], path: DataSourceInput['path'], split: TextSplit, limits: DataLimits): Example[] | null {
  const inline = examples !== undefined && examples !== null && examples.length > 0;
  if (inline && isSet(path)) throw invalidArgument(`${exField} and ${pathField}: set one, not both`);
  if (isSet(path)) return loadFile(pathField, path, split, limits);
  if (inline) return parseInline(exField, examples, limits.maxExamples ?? DEFAULT_MAX_EXAMPLES);
  return null;
}

/** Validates the request's data fields and reads the files: the training examples and an optional eval set. */
export function loadTrainData(input: DataSourceInput, limits: DataLimits): TrainData {
  const split = isSet(input.textSplit) ? input.textSplit : DEFAULT_TEXT_SPLIT;
  if (!TEXT_SPLITS.includes(split)) throw invalidArgument(`text_split ${JSON.stringify(split)}: must be one of ${TEXT_SPLITS.join(', ')}`);
  const train = loadSet('examples', 'path', input.examples, input.path, split, limits);
  if (train === null) throw invalidArgument('examples: no training data; send examples or a path under the data root');
  const evalSet = loadSet('eval_examples', 'eval_path', input.evalExamples, input.evalPath, split, limits);
  return { train, eval: evalSet };
}
