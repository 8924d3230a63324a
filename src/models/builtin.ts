import { fileURLToPath } from 'node:url';

/**
 * The model `loraplex serve` runs without --model: stories260K, a real 260K-parameter llama trained on TinyStories
 * (llama2.c's tinyllamas, MIT), shipped in the repository so a first Generate answers with a real story. It is
 * read from the source tree (this file compiles to dist/src/models/), not copied into dist.
 */
export const BUILTIN_MODEL_DIR = fileURLToPath(new URL('../../../src/models/builtin/stories260K', import.meta.url));
