import { readFileSync, realpathSync } from 'node:fs';
import { basename, join, resolve } from 'node:path';

/** A hub id as transformers takes it: `name` or `org/name`, never a filesystem path. */
const HUB_ID_RE = /^[A-Za-z0-9][\w.-]*(\/[A-Za-z0-9][\w.-]*)?$/;
/** The Hugging Face hub cache's layout: .../models--org--name/snapshots/<revision>. */
const HUB_CACHE_RE = /(?:^|\/)models--([^/]+?)--([^/]+)\/snapshots\/[^/]+$/;

/**
 * A model directory's name, as PEFT writes it in base_model_name_or_path and as the server calls its base model
 * (servedModelName's default): its hub id, never the path the server or CLI happened to be given. Taken from config.json's `_name_or_path` when that is a
 * hub id (transformers writes it on save_pretrained), else from the hub cache's directory layout, else the
 * directory's own name.
 */
export function modelName(modelDir: string): string {
  let real = resolve(modelDir);
  try {
    real = realpathSync(real);
  } catch {
    /* keep the resolved path: the name is a label, not a lookup */
  }
  try {
    const cfg = JSON.parse(readFileSync(join(real, 'config.json'), 'utf8')) as Record<string, unknown>;
    const name = cfg['_name_or_path'];
    if (typeof name === 'string' && HUB_ID_RE.test(name) && !name.includes('..')) return name;
  } catch {
    /* no readable config.json: fall back to the path */
  }
  const cached = HUB_CACHE_RE.exec(real.split('\\').join('/'));
  if (cached) return `${cached[1]}/${cached[2]}`;
  return basename(real);
}
