import type { LoraAdapterWeights } from '../models/lora.js';
import type { PrefixOps } from './prefix-cache.js';
import type { RuntimeOptions, StepRow } from './runtime.js';

/** Messages between the engine client (main thread) and the engine worker. */
export type EngineRequest =
  | { id: number; type: 'init'; opts: RuntimeOptions }
  | { id: number; type: 'step'; rows: StepRow[]; prefix?: PrefixOps; freeRows?: number[] }
  | { id: number; type: 'setSlot'; slot: number; adapter: LoraAdapterWeights }
  | { id: number; type: 'clearSlot'; slot: number }
  | { id: number; type: 'close' };

export type EngineReply =
  | { id: number; ok: true; result: unknown }
  | { id: number; ok: false; error: { message: string; code: string } };

export interface InitResult {
  /** Address space of the KV block pool (pages are committed as blocks are first used). */
  kvCacheBytes: number;
  /** Blocks of KV_BLOCK positions rows can take (the zero block excluded). */
  kvBlocks: number;
  loraPoolBytes: number;
  /** One-token steps of one row run as a pair (this CPU's kernels treat a lone row differently). */
  pairsSingleRows: boolean;
}
