import { createHash } from 'node:crypto';
import { closeSync, existsSync, openSync, readdirSync, readSync, statSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { ModelFormatError, readModelSpecWithNotes } from './config.js';
import { SafetensorsError, SafetensorsSource } from './safetensors.js';
import type { HostTensor, ModelSpec, WeightSource } from './spec.js';
import { familyOf, type ExpectedWeight } from './families/index.js';

export type { ExpectedWeight };

/**
 * Every tensor the engine reads for this spec, with its Hugging Face name and shape. Linear weights are
 * nn.Linear [out, in] for llama and Conv1D [in, out] for gpt2.
 */
export function expectedWeights(spec: ModelSpec): ExpectedWeight[] {
  return familyOf(spec).expectedWeights(spec);
}

/**
 * Presents `transformer.h.0...` as `h.0...`: GPT2LMHeadModel.save_pretrained writes the prefix, the
 * original openai-community checkpoints do not, and the engine should see one naming.
 */
export class StrippedPrefixSource implements WeightSource {
  private readonly map = new Map<string, string>();

  constructor(
    readonly inner: WeightSource,
    prefix: string,
  ) {
    for (const n of inner.names()) {
      const short = n.startsWith(prefix) ? n.slice(prefix.length) : n;
      if (this.map.has(short)) throw new SafetensorsError(`both ${this.map.get(short)} and ${n} are present`);
      this.map.set(short, n);
    }
  }
  /** The name in the file, for tools that read raw bytes. */
  original(name: string): string {
    return this.map.get(name) ?? name;
  }
  names(): string[] {
    return [...this.map.keys()];
  }
  has(name: string): boolean {
    return this.map.has(name);
  }
  shape(name: string): number[] {
    return this.inner.shape(this.original(name));
  }
  get(name: string): HostTensor {
    return this.inner.get(this.original(name));
  }
}

export interface LoadedModel {
  dir: string;
  spec: ModelSpec;
  /** Tensors by their normalized names (see expectedWeights). */
  weights: WeightSource;
  /** config adaptations an operator should see (e.g. a clamped context). */
  notes: string[];
  /** The safetensors files (absolute paths), single or shards. */
  weightFiles: string[];
  tokenizerFile: string;
}

function openWeights(dir: string): SafetensorsSource {
  const hasSafetensors = existsSync(join(dir, 'model.safetensors')) || existsSync(join(dir, 'model.safetensors.index.json'));
  if (!hasSafetensors) {
    const other = readdirSync(dir).filter((f) => /\.(bin|pt|pth|gguf|ckpt|h5|msgpack)$/.test(f));
    throw new ModelFormatError(
      dir,
      null,
      'model.safetensors (or model.safetensors.index.json) is missing' +
        (other.length ? `; found ${other.slice(0, 3).join(', ')}, but only safetensors weights are supported` : ''),
    );
  }
  try {
    return SafetensorsSource.fromModelDir(dir);
  } catch (err) {
    if (err instanceof SafetensorsError) throw new ModelFormatError(dir, null, err.message);
    throw err;
  }
}

/**
 * Reads and validates a Hugging Face model directory: config, tokenizer presence, and that every weight
 * the family needs is present with the right shape, so that problems surface at startup as one error
 * rather than mid-quantization.
 */
export function loadModelDir(dir: string): LoadedModel {
  if (!existsSync(dir) || !statSync(dir).isDirectory()) throw new ModelFormatError(dir, null, 'is not a directory');
  const { spec, notes } = readModelSpecWithNotes(dir);
  const tokenizerFile = join(dir, 'tokenizer.json');
  if (!existsSync(tokenizerFile)) {
    throw new ModelFormatError(dir, null, 'tokenizer.json is missing (a fast-tokenizer file is required; slow tokenizer.model files are not read)');
  }
  const source = openWeights(dir);
  let weights: WeightSource = source;
  const family = familyOf(spec);
  if (family.checkpointPrefix) {
    try {
      weights = new StrippedPrefixSource(source, family.checkpointPrefix);
    } catch (err) {
      throw new ModelFormatError(dir, null, (err as Error).message);
    }
  }

  const missing: string[] = [];
  const wrong: string[] = [];
  for (const { name, shape } of expectedWeights(spec)) {
    if (!weights.has(name)) missing.push(name);
    else {
      const actual = weights.shape(name);
      if (actual.length !== shape.length || actual.some((d, i) => d !== shape[i])) {
        wrong.push(`${name} is ${JSON.stringify(actual)}, expected ${JSON.stringify(shape)}`);
      }
    }
  }
  const list = (xs: string[]) => xs.slice(0, 5).join('; ') + (xs.length > 5 ? `; and ${xs.length - 5} more` : '');
  if (missing.length) {
    throw new ModelFormatError(dir, null, `weights do not match config.json (model_type ${spec.modelType}): missing ${missing.length} tensor(s): ${list(missing)}`);
  }
  if (wrong.length) {
    throw new ModelFormatError(dir, null, `weights do not match config.json (model_type ${spec.modelType}): wrong shapes: ${list(wrong)}`);
  }

  // Tensors the config says should not exist mean the engine would silently drop part of the model.
  const unexpected: string[] = [];
  for (const name of weights.names()) {
    const layer = family.layerPattern.exec(name);
    if (layer && Number(layer[1]) >= spec.numLayers) unexpected.push(name);
    if (family.isUnaccountedWeight(spec, name)) unexpected.push(name);
  }
  if (unexpected.length) {
    throw new ModelFormatError(
      dir,
      null,
      `weights hold tensors config.json does not account for (num_hidden_layers ${spec.numLayers}, attention_bias ${spec.attentionBias}, mlp_bias ${spec.mlpBias}): ${list(unexpected)}`,
    );
  }
  return { dir, spec, weights, notes, weightFiles: source.files().sort(), tokenizerFile };
}

/** The files that define a model's weights (names relative to dir), in a fixed order: what contentKey hashes. */
export function keyFiles(dir: string): string[] {
  const files = ['config.json'];
  if (existsSync(join(dir, 'generation_config.json'))) files.push('generation_config.json');
  const index = join(dir, 'model.safetensors.index.json');
  if (existsSync(index)) {
    files.push('model.safetensors.index.json');
    files.push(...openWeights(dir).files().map((f) => basename(f)).sort());
  } else {
    files.push('model.safetensors');
  }
  for (const f of files) if (!existsSync(join(dir, f))) throw new ModelFormatError(dir, null, `${f} is missing`);
  return files;
}

/** 16 MB reads: large enough that hashing, not syscalls, bounds the speed. */
const HASH_CHUNK = 16 << 20;

/**
 * Hex sha256 over config.json, generation_config.json and every weights file (names and lengths framed
 * in, so that moving bytes between files changes the key): the quantization cache key.
 */
export function contentKey(dir: string): string {
  const hash = createHash('sha256');
  const buf = Buffer.allocUnsafe(HASH_CHUNK);
  for (const f of keyFiles(dir)) {
    const fd = openSync(join(dir, f), 'r');
    try {
      const size = statSync(join(dir, f)).size;
      hash.update(`${f}\0${size}\0`);
      let pos = 0;
      for (;;) {
        const n = readSync(fd, buf, 0, HASH_CHUNK, pos);
        if (n === 0) break;
        hash.update(buf.subarray(0, n));
        pos += n;
      }
      if (pos !== size) throw new ModelFormatError(dir, f, `changed size while hashing (${size} -> ${pos} bytes)`);
    } finally {
      closeSync(fd);
    }
  }
  return hash.digest('hex');
}

/** contentKey without blocking the event loop (same result). */
export async function contentKeyAsync(dir: string): Promise<string> {
  const hash = createHash('sha256');
  const buf = Buffer.allocUnsafe(HASH_CHUNK);
  for (const f of keyFiles(dir)) {
    const fh = await open(join(dir, f), 'r');
    try {
      const size = (await fh.stat()).size;
      hash.update(`${f}\0${size}\0`);
      let pos = 0;
      for (;;) {
        const { bytesRead } = await fh.read(buf, 0, HASH_CHUNK, pos);
        if (bytesRead === 0) break;
        hash.update(buf.subarray(0, bytesRead));
        pos += bytesRead;
      }
      if (pos !== size) throw new ModelFormatError(dir, f, `changed size while hashing (${size} -> ${pos} bytes)`);
    } finally {
      await fh.close();
    }
  }
  return hash.digest('hex');
}
