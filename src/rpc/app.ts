import type { AdapterManager } from '../adapters/manager.js';
import type { CompiledModel } from '../engine/compile.js';
import type { JobManager } from '../train/jobs.js';
import type { Scheduler } from '../scheduler/scheduler.js';
import type { ServerConfig } from '../config/server-config.js';
import type { TaskPool } from '../workers/tasks.js';
import type { Tokenizer } from '../tokenizer/index.js';

/** Everything the handlers use, available once the model is loaded. */
export interface App {
  cfg: ServerConfig;
  compiled: CompiledModel;
  tokenizer: Tokenizer;
  maxModelLen: number;
  adapters: AdapterManager;
  scheduler: Scheduler;
  jobs: JobManager;
  /** Heavy work (tokenizing large prompts, merges, exports, training data) runs here, off the event loop. */
  pool: TaskPool;
}
