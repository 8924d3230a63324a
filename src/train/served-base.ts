import { copyFileSync, linkSync, readFileSync, renameSync, rmSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { readInitializers, storedBytes } from '../../kernels/onnx.js';
import type { StoredLinears } from '../../kernels/quant/index.js';
import { sameStoredWeights, type ModelQuant } from '../models/linear.js';

/**
 * A training graph on the served base: the serving graph's cache entry (compile.ts) already holds every quantized
 * weight, so a job refers to those bytes instead of quantizing the model again and writing a second copy.
 * onnxruntime reads external data only from the model's own directory (a symbolic link out of it is refused), so the
 * entry's data file is hard-linked into the run's graph directory: one file on disk, whatever the job count.
 * Where a hard link cannot be made (another file system), the file is copied once (a reflink where the file
 * system has them).
 */

/** How the job's graph came by its frozen weights. */
export type BaseSource = 'linked' | 'copied' | 'quantized';

/** The served data file's name in the job's graph directory. */
export const BASE_DATA_FILE = 'base.onnx.data';

export interface ServedBase {
  stored: StoredLinears;
  source: Exclude<BaseSource, 'quantized'>;
}

interface EntryMeta {
  quant: ModelQuant;
}

/**
 * The served graph at `servedModelPath` (a cache entry's model.onnx) as the training graph's weights, with its data
 * file placed in `graphDir`; null when it was quantized differently from `quant`, or with a codec whose packed
 * q/k/v and gate/up rows cannot be referred to one module at a time (nf4's blocks run across rows; a float W^T
 * holds a module's rows in columns): the job then quantizes its own.
 */
export function servedBase(servedModelPath: string, graphDir: string, quant: ModelQuant): ServedBase | null {
  const meta = JSON.parse(readFileSync(join(dirname(servedModelPath), 'meta.json'), 'utf8')) as EntryMeta;
  if ((quant.kind !== 'int4' && quant.kind !== 'int8') || !sameStoredWeights(meta.quant, quant)) {
    // A link left by an earlier run would keep a replaced entry's file alive for nothing.
    rmSync(join(graphDir, BASE_DATA_FILE), { force: true });
    return null;
  }
  const tensors = readInitializers(servedModelPath);
  const dataName = `${servedModelPath.split('/').pop()}.data`;
  let end = 0;
  for (const t of tensors.values()) {
    if (!t.external) continue;
    if (t.external.location !== dataName) throw new Error(`${servedModelPath}: tensor ${t.name} refers to ${t.external.location}, not ${dataName}`);
    end = Math.max(end, t.external.offset + t.external.length);
  }
  const path = join(graphDir, BASE_DATA_FILE);
  const source = placeDataFile(join(dirname(servedModelPath), dataName), path);
  // The entry is replaced only as a whole; a file shorter than its description names would be a torn copy.
  const size = statSync(path).size;
  if (size < end) throw new Error(`${path}: ${size} bytes, but the served graph's tensors reach byte ${end}`);
  return {
    source,
    stored: { tensor: (name) => tensors.get(name), bytes: (t, start, length) => storedBytes(t, start, length, path), location: BASE_DATA_FILE },
  };
}

function placeDataFile(from: string, to: string): ServedBase['source'] {
  rmSync(to, { force: true });
  try {
    linkSync(from, to);
    return 'linked';
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code !== 'EXDEV' && code !== 'EPERM' && code !== 'EMLINK' && code !== 'ENOTSUP' && code !== 'EOPNOTSUPP') throw e;
  }
  const tmp = `${to}.tmp-${process.pid}`;
  // COPYFILE_FICLONE: a reflink where the file system can, else a plain copy.
  copyFileSync(from, tmp, 2);
  renameSync(tmp, to);
  return 'copied';
}
