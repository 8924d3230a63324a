import { copyFileSync, existsSync, lstatSync, readdirSync, readFileSync, rmSync, writeFileSync, type Stats } from 'node:fs';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { LoraplexError, invalidArgument } from '../errors.js';
import { dequantizeLinear, quantizeLinear, type QuantOptions } from '../../kernels/quant/index.js';
import { DEFAULT_LM_HEAD_QUANT, lmHeadQuantOptions, type ModelQuant } from '../models/linear.js';
import { loadModelDir } from '../models/load.js';
import { familyOf, familyOfModule } from '../models/families/index.js';
import { f16ToF32, f32ToF16Bits, writeShardedSafetensors, writeSafetensors, type TensorToWrite } from '../models/safetensors.js';
import type { HostTensor, ModelSpec } from '../models/spec.js';
import type { PeftAdapter } from './peft.js';
import { writeDirAtomic } from '../files/atomic-dir.js';
import { parseJsonCapped } from '../files/json.js';

/** Files of a Hugging Face model directory besides the weights that an export carries over when present. */
const CARRIED = ['tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'generation_config.json', 'chat_template.jinja', 'chat_template.json', 'tokenizer.model'];
const NAME_RE = /^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$/;
const MAX_SHARD_BYTES = 2 * 1024 ** 3;
// Our scratch names in the export root; output names cannot start with '.', so none is a finished export.
const TMP_PREFIX = '.tmp-';
const MAX_MODEL_CONFIG_BYTES = 16 * 1024 * 1024;

/** Removes temporary folders left in the export root by a process killed mid-export (call at startup). */
export function sweepExportTemps(exportRoot: string): void {
  if (!existsSync(exportRoot)) return;
  for (const name of readdirSync(exportRoot)) {
    if (name.startsWith(TMP_PREFIX)) rmSync(join(exportRoot, name), { recursive: true, force: true });
  }
}

export interface ExportSource {
  adapterId: string;
  adapter: PeftAdapter;
  weight: number;
}

export interface ExportResult {
  dir: string;
  bytes: number;
  seconds: number;
}

/** lstat, or null when nothing is there: a dangling symlink named like the output still counts as taken. */
function lstatOrNull(path: string): Stats | null {
  try {
    return lstatSync(path);
  } catch {
    return null;
  }
}

export function validateOutputName(name: string): string {
  if (!NAME_RE.test(name) || name.includes('..')) {
    throw invalidArgument(`output_name ${JSON.stringify(name.slice(0, 40))}: must be 1-128 characters of letters, digits, ".", "_", "-" and not start with "."`);
  }
  return name;
}

/** The module of a linear layer's weight as the serving graph quantizes it (gpt2 Conv1D weights are [in, out]). */
function linearModuleOf(spec: ModelSpec, name: string): string | null {
  const module = name.endsWith('.weight') ? name.slice(0, -'.weight'.length) : null;
  return module !== null && familyOfModule(module) === spec.family ? module : null;
}

const outputExists = (outputName: string) => new LoraplexError('ALREADY_EXISTS', `output_name ${JSON.stringify(outputName)} already exists in the export root`);

/** W as the server computes with it: quantized and dequantized with the codec (a copy; W itself when float). */
function asServed(w: Float32Array, N: number, K: number, q: QuantOptions, name: string): Float32Array {
  return q.kind === 'none' ? w : dequantizeLinear(quantizeLinear(w, N, K, q, name));
}

/** The embedding table as served: float16 under a quantized base (ServingGraphOptions.embeddingFp16). */
function fp16Rounded(data: Float32Array): Float32Array {
  const out = new Float32Array(data.length);
  f16ToF32(Uint16Array.from(data, (v) => f32ToF16Bits(v)), out);
  return out;
}

/**
 * Writes base + weighted adapter deltas as a plain Hugging Face model directory: the served base, i.e. every
 * linear weight quantized and dequantized with the served codec (exactly what the server computes with; the
 * original weights when quant is none), plus Σ weight * scaling * B A. The output head is written with its own
 * codec (lmHeadQuant) and the embedding rounded to float16 as served; a quantized base's tied head is therefore
 * untied (lm_head.weight written, tie_word_embeddings false), as the two no longer hold the same values. Other
 * tensors are copied. Written into a temporary folder under exportRoot and renamed into place, so a crash never
 * leaves a half model.
 */
export function exportMergedModel(modelDir: string, quant: ModelQuant, sources: ExportSource[], exportRoot: string, outputName: string, dtype: 'F16' | 'F32'): ExportResult {
  const t0 = performance.now();
  validateOutputName(outputName);
  const dest = join(exportRoot, outputName);
  if (lstatOrNull(dest)) throw outputExists(outputName);
  const { spec, weights } = loadModelDir(modelDir);
  const deltas = new Map<string, { adapter: PeftAdapter; weight: number; index: number }[]>();
  for (const s of sources) {
    s.adapter.modules.forEach((m, index) => {
      const list = deltas.get(m.module) ?? [];
      list.push({ adapter: s.adapter, weight: s.weight, index });
      deltas.set(m.module, list);
    });
  }
  const served = (name: string): HostTensor => {
    const t = weights.get(name);
    const module = linearModuleOf(spec, name);
    if (!module) return t;
    const conv = spec.family === 'gpt2'; // stored [in, out]; deltas are [out, in]
    const [rows, cols] = t.shape as [number, number];
    const [N, K] = conv ? [cols, rows] : [rows, cols];
    let w = t.data; // [N, K] after the transpose below for Conv1D
    if (conv) {
      w = new Float32Array(N * K);
      for (let i = 0; i < rows; i++) for (let j = 0; j < cols; j++) w[j * K + i] = t.data[i * cols + j]!;
    }
    w = asServed(w, N, K, quant, name);
    if (w === t.data) w = w.slice();
    for (const d of deltas.get(module) ?? []) {
      const m = d.adapter.modules[d.index]!;
      const f = d.weight * d.adapter.scaling;
      for (let o = 0; o < N; o++) {
        for (let j = 0; j < m.r; j++) {
          const bv = m.b[o * m.r + j]! * f;
          if (bv === 0) continue;
          const ao = j * K;
          const wo = o * K;
          for (let k = 0; k < K; k++) w[wo + k]! += bv * m.a[ao + k]!;
        }
      }
    }
    if (!conv) return { shape: t.shape, data: w };
    const back = new Float32Array(rows * cols);
    for (let i = 0; i < rows; i++) for (let j = 0; j < cols; j++) back[i * cols + j] = w[j * K + i]!;
    return { shape: t.shape, data: back };
  };
  // Under a quantized base the head and the embedding are served differently even when the checkpoint ties them.
  const headName = familyOf(spec).lmHeadWeight(spec, weights);
  const untie = quant.kind !== 'none' && headName !== 'lm_head.weight';
  const embeddingName = spec.family === 'gpt2' ? 'wte.weight' : 'model.embed_tokens.weight';
  const head = (): Float32Array => {
    const t = weights.get(headName);
    const [N, K] = t.shape as [number, number];
    return asServed(t.data, N, K, lmHeadQuantOptions(quant), 'lm_head');
  };
  const tensor = (name: string): Float32Array => {
    // A tied checkpoint may still carry an lm_head.weight (a copy of the embedding): the untied head replaces it.
    if (name === (untie ? 'lm_head.weight' : headName)) return head();
    if (name === embeddingName && quant.kind !== 'none') return fp16Rounded(weights.get(name).data);
    return served(name).data;
  };
  const tensors: TensorToWrite[] = weights.names().map((name) => ({ name, shape: weights.shape(name), data: () => tensor(name) }));
  if (untie && !weights.has('lm_head.weight')) tensors.push({ name: 'lm_head.weight', shape: weights.shape(headName), data: head });
  const totalBytes = tensors.reduce((n, t) => n + t.shape.reduce((a, b) => a * b, 1) * (dtype === 'F16' ? 2 : 4), 0);

  const temp = join(exportRoot, `${TMP_PREFIX}${outputName}-${randomBytes(4).toString('hex')}`);
  const fill = (tmp: string) => {
    if (totalBytes > MAX_SHARD_BYTES) writeShardedSafetensors(tmp, tensors, dtype, MAX_SHARD_BYTES);
    else writeSafetensors(join(tmp, 'model.safetensors'), tensors, dtype);
    // The model directory is the operator's (a Hugging Face cache links its files), so symlinks are fine here.
    const config = parseJsonCapped(readFileSync(join(modelDir, 'config.json')), { maxBytes: MAX_MODEL_CONFIG_BYTES, maxDepth: 32, what: 'config.json' }) as Record<string, unknown>;
    config['torch_dtype'] = dtype === 'F16' ? 'float16' : 'float32';
    if (untie) config['tie_word_embeddings'] = false;
    writeFileSync(join(tmp, 'config.json'), `${JSON.stringify(config, null, 2)}\n`);
    for (const f of CARRIED) if (existsSync(join(modelDir, f))) copyFileSync(join(modelDir, f), join(tmp, f));
    const provenance = {
      exportedBy: 'loraplex',
      baseQuantization: { ...quant, lmHead: quant.kind === 'none' ? 'none' : (quant.lmHead ?? DEFAULT_LM_HEAD_QUANT) },
      adapters: sources.map((s) => ({ adapterId: s.adapterId, weight: s.weight, r: s.adapter.r, loraAlpha: s.adapter.alpha })),
      specModelType: spec.modelType,
    };
    writeFileSync(join(tmp, 'loraplex_export.json'), `${JSON.stringify(provenance, null, 2)}\n`);
  };
  if (!writeDirAtomic(dest, fill, { temp, syncTemp: true, syncDirs: [exportRoot] })) throw outputExists(outputName);
  let bytes = 0;
  for (const f of ['model.safetensors']) bytes += lstatOrNull(join(dest, f))?.size ?? 0;
  return { dir: dest, bytes: bytes || totalBytes, seconds: (performance.now() - t0) / 1000 };
}
