/** Helpers shared by the training tests (not a test file itself). */
import { existsSync } from 'node:fs';
import { readModelSpec } from '../../src/models/config.js';
import type { ModelSpec } from '../../src/models/spec.js';
import { LoraplexError } from '../../src/errors.js';
import { STORIES260K } from '../models/fixtures.js';

export { STORIES260K };

export const llamaSpec: ModelSpec = readModelSpec(STORIES260K);

/** A small gpt2-shaped spec (only shapes matter to these tests). */
export const gpt2Spec: ModelSpec = {
  family: 'gpt2',
  modelType: 'gpt2',
  hiddenSize: 32,
  intermediateSize: 128,
  numLayers: 2,
  numHeads: 4,
  numKvHeads: 4,
  headDim: 8,
  vocabSize: 300,
  maxPositions: 128,
  normEps: 1e-5,
  ropeTheta: 10000,
  attentionBias: true,
  outputBias: true,
  mlpBias: true,
  hiddenAct: 'gelu_new',
  tieWordEmbeddings: true,
  bosTokenId: null,
  eosTokenIds: [299],
};

/** The tiny Shakespeare text, read in place (never copied). */
export const SHAKESPEARE = [
  process.env['LORAPLEX_TINYSHAKESPEARE'],
  '/work/shared/datasets/tinyshakespeare.txt',
  new URL('../../../shared/datasets/tinyshakespeare.txt', import.meta.url).pathname,
  new URL('../../../../shared/datasets/tinyshakespeare.txt', import.meta.url).pathname,
].find((p): p is string => !!p && existsSync(p)) ?? '/work/shared/datasets/tinyshakespeare.txt';

/** assert.throws matcher: a LoraplexError with this code whose message equals (string) or matches (RegExp). */
export function loraplexError(code: string, message: string | RegExp): (e: unknown) => boolean {
  return (e: unknown) => {
    if (!(e instanceof LoraplexError)) throw new Error(`expected a LoraplexError, got ${String(e)}`);
    if (e.code !== code) throw new Error(`expected code ${code}, got ${e.code}: ${e.message}`);
    const ok = typeof message === 'string' ? e.message === message : message.test(e.message);
    if (!ok) throw new Error(`unexpected message: ${e.message}`);
    return true;
  };
}
