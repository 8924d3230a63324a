import { readFile, access } from 'node:fs/promises';
import { join } from 'node:path';
import { Tokenizer as HfTokenizer } from '@huggingface/tokenizers';
import { Template } from '@huggingface/jinja';

// The package's .d.ts re-exports use extensionless paths that NodeNext cannot resolve, so
// its types arrive as `any`; this is the slice of its API we use, typed by hand.
interface HfTokenizerApi {
  encode(text: string, opts?: { add_special_tokens?: boolean }): { ids: number[] };
  decode(ids: number[], opts?: { skip_special_tokens?: boolean; clean_up_tokenization_spaces?: boolean }): string;
  token_to_id(token: string): number | undefined;
  id_to_token(id: number): string | undefined;
  get_vocab(withAddedTokens?: boolean): Map<string, number>;
  get_added_tokens_decoder(): Map<number, { content: string; special: boolean }>;
}
const HfTokenizerCtor = HfTokenizer as unknown as new (tokenizerJson: object, config: object) => HfTokenizerApi;

/** Any failure to load or use a tokenizer (missing files, bad JSON, bad ids). */
export class TokenizerError extends Error {
  override name = 'TokenizerError';
}

/** The model has no chat template, or its template failed (raise_exception, syntax). */
export class ChatTemplateError extends Error {
  override name = 'ChatTemplateError';
}

export interface ChatMessage {
  role: string;
  content: string;
}

export interface EncodeOptions {
  /** Add BOS/EOS as the tokenizer is configured to (default true, like HF). */
  addSpecialTokens?: boolean;
}

export interface DecodeOptions {
  /** Drop special tokens (BOS/EOS/...) from the text (default false, like HF). */
  skipSpecialTokens?: boolean;
  /**
   * HF's English-centric " ." -> "." clean-up. Default false: it depends on the
   * surrounding text, so it would make streamed text differ from a full decode.
   */
  cleanUpTokenizationSpaces?: boolean;
}

export interface ChatTemplateOptions {
  /** Append the assistant turn header (default true). */
  addGenerationPrompt?: boolean;
  /** Extra template variables (tools, date_string, ...). */
  extra?: Record<string, unknown>;
}

type JsonObject = Record<string, unknown>;

/** tokenizer_config.json writes special tokens as a string or as a serialized AddedToken. */
function tokenContent(v: unknown): string | null {
  if (typeof v === 'string') return v;
  if (v && typeof v === 'object' && typeof (v as JsonObject).content === 'string') {
    return (v as JsonObject).content as string;
  }
  return null;
}

/** Chat templates may be a string or a list of named templates; pick "default". */
function pickTemplate(v: unknown): string | null {
  if (typeof v === 'string') return v;
  if (Array.isArray(v)) {
    const named = v as { name?: string; template?: string }[];
    const def = named.find((t) => t.name === 'default') ?? named[0];
    return typeof def?.template === 'string' ? def.template : null;
  }
  return null;
}

/**
 * A token's string is never shorter in UTF-8 than the text it decodes to (byte-level and metaspace symbols,
 * <0xNN> byte tokens, added tokens as written), and a character is at least one byte of a token. A
 * normalizer may shrink the input first (NFKC: a 3-byte full-width letter becomes 1 byte), by at most
 * 4 bytes to 1 for one character; only the sentencepiece pair (Prepend, Replace ' ' -> '▁') surely never does.
 * Infinity (no bound) when one unknown token may stand for a whole run of characters (fuse_unk without
 * byte_fallback).
 */
function maxInputBytesPerToken(tokens: Iterable<string>, tokenizerJson: JsonObject): number {
  const model = tokenizerJson['model'] as { fuse_unk?: unknown; byte_fallback?: unknown } | undefined;
  if (model?.fuse_unk === true && model.byte_fallback !== true) return Infinity;
  let longest = 4; // one character, even for an unknown-character token
  for (const t of tokens) longest = Math.max(longest, Buffer.byteLength(t, 'utf8'));
  return neverShrinks(tokenizerJson['normalizer']) ? longest : 4 * longest;
}

function neverShrinks(n: unknown): boolean {
  if (n === null || n === undefined) return true;
  const o = n as { type?: unknown; normalizers?: unknown; pattern?: { String?: unknown }; content?: unknown };
  if (o.type === 'Sequence') return Array.isArray(o.normalizers) && o.normalizers.every(neverShrinks);
  if (o.type === 'Prepend') return true;
  if (o.type === 'Replace') {
    const from = o.pattern?.String;
    return typeof from === 'string' && typeof o.content === 'string' && Buffer.byteLength(o.content) >= Buffer.byteLength(from);
  }
  return false;
}

// Names tried for EOS when tokenizer_config.json does not name one (bare GPT-2 style dirs).
const EOS_FALLBACKS = ['<|endoftext|>', '</s>', '<|im_end|>', '<|end_of_text|>', '<eos>'];

export class Tokenizer {
  readonly bosTokenId: number | null;
  readonly eosTokenId: number | null;
  /** Largest token id + 1 (base vocab and added tokens). */
  readonly vocabSize: number;
  /** Raw template source, or null when the model has none. */
  readonly chatTemplate: string | null;
  /**
   * At most this many UTF-8 bytes of input text make one token, so a text of B bytes needs at least
   * B / maxInputBytesPerToken tokens: a cheap size limit before tokenizing.
   */
  readonly maxInputBytesPerToken: number;
  readonly specialTokenIds: ReadonlySet<number>;

  private readonly hf: HfTokenizerApi;
  private readonly idToTokenTable: (string | undefined)[];
  private readonly bosToken: string | null;
  private readonly eosToken: string | null;
  private readonly prefixIds: number[] | null;
  private readonly suffixIds: number[] | null;
  private compiledTemplate: Template | null = null;
  private readonly source: string;

  /**
   * @param tokenizerJson parsed tokenizer.json
   * @param config parsed tokenizer_config.json ({} when absent)
   * @param opts.chatTemplate overrides config.chat_template (e.g. from chat_template.jinja)
   */
  constructor(
    tokenizerJson: JsonObject,
    config: JsonObject = {},
    opts: { chatTemplate?: string | null; source?: string } = {},
  ) {
    this.source = opts.source ?? 'tokenizer';
    try {
      this.hf = new HfTokenizerCtor(tokenizerJson, config);
    } catch (e) {
      throw new TokenizerError(`${this.source}: cannot build tokenizer: ${(e as Error).message}`);
    }

    const vocab = this.hf.get_vocab(true);
    let maxId = -1;
    for (const id of vocab.values()) if (id > maxId) maxId = id;
    this.vocabSize = maxId + 1;
    this.idToTokenTable = new Array<string | undefined>(this.vocabSize);
    for (const [tok, id] of vocab) this.idToTokenTable[id] = tok;
    this.maxInputBytesPerToken = maxInputBytesPerToken(vocab.keys(), tokenizerJson);

    const special = new Set<number>();
    for (const [id, t] of this.hf.get_added_tokens_decoder()) if (t.special) special.add(id);
    this.specialTokenIds = special;

    // What the tokenizer.json post-processor wraps around a text (e.g. TemplateProcessing's <s>).
    const probe = 'a';
    const raw = this.hf.encode(probe, { add_special_tokens: false }).ids;
    const full = this.hf.encode(probe, { add_special_tokens: true }).ids;
    const at = indexOfSeq(full, raw);
    const libPrefix = at >= 0 ? full.slice(0, at) : null;
    const libSuffix = at >= 0 ? full.slice(at + raw.length) : null;

    const idOf = (tok: string | null): number | null =>
      tok === null ? null : (this.hf.token_to_id(tok) ?? null);
    let bos = tokenContent(config.bos_token);
    let eos = tokenContent(config.eos_token);
    // Without a configured BOS, the token the post-processor prepends is the BOS.
    if (bos === null && libPrefix && libPrefix.length === 1) bos = this.hf.id_to_token(libPrefix[0]!) ?? null;
    if (eos === null) eos = EOS_FALLBACKS.find((t) => this.hf.token_to_id(t) !== undefined) ?? null;
    this.bosToken = bos;
    this.eosToken = eos;
    this.bosTokenId = idOf(bos);
    this.eosTokenId = idOf(eos);

    // HF's Llama/Gemma fast tokenizers rebuild the post-processor from add_bos_token /
    // add_eos_token, so an explicit flag wins; otherwise trust tokenizer.json's post-processor.
    // Building prefix/suffix ourselves from raw ids means BOS is never added twice.
    const flag = (k: string): boolean | undefined =>
      typeof config[k] === 'boolean' ? (config[k] as boolean) : undefined;
    const addBos = flag('add_bos_token');
    const addEos = flag('add_eos_token');
    this.prefixIds =
      addBos === undefined ? libPrefix : addBos && this.bosTokenId !== null ? [this.bosTokenId] : [];
    this.suffixIds =
      addEos === undefined ? libSuffix : addEos && this.eosTokenId !== null ? [this.eosTokenId] : [];

    this.chatTemplate =
      opts.chatTemplate !== undefined ? opts.chatTemplate : pickTemplate(config.chat_template);
  }

  encode(text: string, opts: EncodeOptions = {}): number[] {
    const addSpecial = opts.addSpecialTokens ?? true;
    const raw = this.hf.encode(text, { add_special_tokens: false }).ids;
    if (!addSpecial) return raw;
    if (this.prefixIds === null || this.suffixIds === null) {
      // Post-processor output did not contain the raw ids; let the library decide.
      return this.hf.encode(text, { add_special_tokens: true }).ids;
    }
    return [...this.prefixIds, ...raw, ...this.suffixIds];
  }

  /**
   * Ids the tokenizer does not know (a model's padded vocab rows) decode to nothing
   * rather than throwing: a sampled padding id must not kill a stream.
   */
  decode(ids: readonly number[], opts: DecodeOptions = {}): string {
    const known = ids.filter((id) => this.idToTokenTable[id] !== undefined);
    if (known.length === 0) return ''; // the library throws on []
    return this.hf.decode(known, {
      skip_special_tokens: opts.skipSpecialTokens ?? false,
      clean_up_tokenization_spaces: opts.cleanUpTokenizationSpaces ?? false,
    });
  }

  idToToken(id: number): string | undefined {
    return this.idToTokenTable[id];
  }

  tokenToId(token: string): number | undefined {
    return this.hf.token_to_id(token);
  }

  isSpecial(id: number): boolean {
    return this.specialTokenIds.has(id);
  }

  /** Renders the chat template to a prompt string (tokenize with addSpecialTokens: false). */
  applyChatTemplate(messages: readonly ChatMessage[], opts: ChatTemplateOptions = {}): string {
    if (this.chatTemplate === null) {
      throw new ChatTemplateError(
        `${this.source} has no chat template (no chat_template in tokenizer_config.json and no chat_template.jinja); send a raw prompt instead`,
      );
    }
    if (this.compiledTemplate === null) {
      try {
        this.compiledTemplate = new Template(this.chatTemplate);
      } catch (e) {
        throw new ChatTemplateError(`${this.source}: chat template does not parse: ${(e as Error).message}`);
      }
    }
    try {
      return this.compiledTemplate.render({
        ...opts.extra,
        messages: messages.map((m) => ({ role: m.role, content: m.content })),
        add_generation_prompt: opts.addGenerationPrompt ?? true,
        bos_token: this.bosToken ?? '',
        eos_token: this.eosToken ?? '',
        // raise_exception is a jinja-library global (it throws with the template's message).
      });
    } catch (e) {
      throw new ChatTemplateError(`chat template failed: ${(e as Error).message}`);
    }
  }

  /** Chat template + encode; the template already writes any BOS, as HF's apply_chat_template assumes. */
  encodeChat(messages: readonly ChatMessage[], opts: ChatTemplateOptions = {}): number[] {
    return this.encode(this.applyChatTemplate(messages, opts), { addSpecialTokens: false });
  }
}

function indexOfSeq(hay: readonly number[], needle: readonly number[]): number {
  outer: for (let i = 0; i + needle.length <= hay.length; i++) {
    for (let j = 0; j < needle.length; j++) if (hay[i + j] !== needle[j]) continue outer;
    return i;
  }
  return -1;
}

async function exists(p: string): Promise<boolean> {
  try {
    await access(p);
    return true;
  } catch {
    return false;
  }
}

async function readJson(path: string): Promise<JsonObject> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (e) {
    throw new TokenizerError(`cannot read ${path}: ${(e as Error).message}`);
  }
  try {
    const v: unknown = JSON.parse(text);
    if (!v || typeof v !== 'object' || Array.isArray(v)) throw new Error('not a JSON object');
    return v as JsonObject;
  } catch (e) {
    throw new TokenizerError(`${path} is not valid JSON: ${(e as Error).message}`);
  }
}

/**
 * Loads tokenizer.json (required) and tokenizer_config.json (optional) from a model dir.
 * The chat template comes from tokenizer_config.json, else chat_template.jinja, else
 * chat_template.json (newer transformers write it to separate files).
 */
export async function loadTokenizer(modelDir: string): Promise<Tokenizer> {
  const tokPath = join(modelDir, 'tokenizer.json');
  if (!(await exists(tokPath))) {
    throw new TokenizerError(`tokenizer.json not found in ${modelDir} (expected ${tokPath})`);
  }
  const tokenizerJson = await readJson(tokPath);
  const cfgPath = join(modelDir, 'tokenizer_config.json');
  const config = (await exists(cfgPath)) ? await readJson(cfgPath) : {};

  let chatTemplate: string | null | undefined;
  if (pickTemplate(config.chat_template) === null) {
    const jinjaPath = join(modelDir, 'chat_template.jinja');
    const jsonPath = join(modelDir, 'chat_template.json');
    if (await exists(jinjaPath)) chatTemplate = await readFile(jinjaPath, 'utf8');
    else if (await exists(jsonPath)) chatTemplate = pickTemplate((await readJson(jsonPath)).chat_template);
  }
  return new Tokenizer(tokenizerJson, config, { chatTemplate, source: modelDir });
}
