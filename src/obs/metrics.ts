/**
 * The one prom-client Registry with every loraplex metric. Names: prefix `loraplex_`, unit in the name; labels
 * are bounded (method and status names, step kind, adapter state, at most `maxTenantLabels` tenants) and never
 * carry an adapter id. The scheduler, the RPC observer and the adapter manager feed it through the methods
 * below; nothing here imports them (obs sits below every layer it measures).
 */
import { status as GrpcStatus } from '@grpc/grpc-js';
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from 'prom-client';

/**
 * The adapter figures metrics read at scrape time (the server hands it AdapterManager.stats()): adapters by
 * state, bytes held in memory, and counters since start; each metric's help says what it counts.
 */
export type AdapterCounts = Record<
  'stored' | 'loaded' | 'active' | 'memoryBytes' | 'loads' | 'evictions' | 'slotEvictions' | 'hits' | 'misses' | 'loadSecondsTotal',
  number
>;

export type StepKind = 'prefill' | 'decode';

/** One request leaving the scheduler after it was admitted (it held a KV row). */
export interface RequestDone {
  /** The internal adapter key, for observers that need it; never a metrics label. */
  adapterKey: string | null;
  tenant?: string | undefined;
  /** 'stop' / 'length' when it finished; 'aborted' when cancelled, timed out, drained or failed. */
  outcome: 'stop' | 'length' | 'aborted';
  promptTokens: number;
  generatedTokens: number;
  /** Submit to admission (a KV row and an adapter slot). */
  queueSeconds: number;
  /** Submit to first token; null when no token was produced. */
  timeToFirstTokenSeconds: number | null;
  /** Submit to the end. */
  totalSeconds: number;
}

export interface QueueState {
  running: number;
  waiting: number;
  rowsUsed: number;
  rowsFree: number;
}

export interface Metrics {
  readonly registry: Registry;
  /** One finished RPC: `method` as a short name (`Generate`) or a gRPC path; `code` a grpc status. */
  observeCall(method: string, code: GrpcStatus | string, seconds: number): void;
  /** One engine step; `batch` = rows in it. */
  observeStep(kind: StepKind, seconds: number, batch: number): void;
  setQueue(state: QueueState): void;
  observeRequest(done: RequestDone): void;
  /** The gap between two consecutive tokens of one sequence. */
  observeInterToken(seconds: number): void;
  /** A prompt looked up in the prefix cache: `hitTokens` restored from it (0 = miss); `bytes` it holds now. */
  observePrefixLookup(hitTokens: number, bytes: number): void;
  /** KV cache blocks: held by rows, reserved for running requests (their prompt + max_new_tokens), in the pool. */
  setKvBlocks(state: { used: number; reserved: number; total: number }): void;
  /** Reads adapter figures at every scrape (one call per scrape). */
  attachAdapters(stats: () => AdapterCounts | Promise<AdapterCounts>): void;
  /** One optimizer step of a training job. */
  observeTrainStep(loss: number, tokensPerSecond: number): void;
  /** No job is training any more (its throughput goes to 0). */
  observeTrainIdle(): void;
  /** Reads training jobs by state at every scrape. */
  attachTrainJobs(counts: () => TrainJobCounts): void;
}

/** Training jobs by state; JobManager.counts() has this shape. */
export type TrainJobCounts = Record<(typeof TRAIN_JOB_STATES)[number], number>;
export const TRAIN_JOB_STATES = ['queued', 'running', 'succeeded', 'failed', 'cancelled'] as const;

export interface MetricsOptions {
  /** 0 = no tenant label on the token counters; else at most this many tenants, the rest as "other". */
  maxTenantLabels: number;
  /** Process and Node metrics (default true; off for unit tests that count series). */
  defaultMetrics?: boolean;
}

/** CPU LLM serving spans milliseconds (a decode step) to minutes (a long request behind a queue). */
const LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300];
const TOKEN_GAP_BUCKETS = [0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5];
const STEP_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10];
const REQUEST_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600];
const BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512];

export const OTHER_TENANT = 'other';
/** Requests without a tenant, when tenant labels are on. */
export const NO_TENANT = 'none';
const MAX_LABEL_CHARS = 64;
const METHOD_NAME = /^[A-Za-z][A-Za-z0-9_]{0,63}$/;

/** `/loraplex.v1.InferenceService/Generate` -> `Generate`; anything odd -> `other` (labels stay bounded). */
export function shortMethod(method: string): string {
  const name = method.slice(method.lastIndexOf('/') + 1);
  return METHOD_NAME.test(name) ? name : 'other';
}

/** grpc status number -> its name (`NOT_FOUND`); a name passes through if it is one. */
export function statusName(code: GrpcStatus | string): string {
  if (typeof code === 'number') return GrpcStatus[code] ?? 'UNKNOWN';
  return code in GrpcStatus && Number.isNaN(Number(code)) ? code : 'UNKNOWN';
}

export function createMetrics(opts: MetricsOptions): Metrics {
  const registry = new Registry();
  const registers = [registry];
  if (opts.defaultMetrics ?? true) {
    collectDefaultMetrics({ register: registry, prefix: 'loraplex_' });
    // Gauges named like counters (promtool rejects them); the same figures exist by type without `_total`.
    for (const n of ['nodejs_active_handles_total', 'nodejs_active_requests_total', 'nodejs_active_resources_total']) registry.removeSingleMetric(`loraplex_${n}`);
  }

  const rpcRequests = new Counter({ name: 'loraplex_rpc_requests_total', help: 'Finished RPCs by method and gRPC status.', labelNames: ['method', 'code'] as const, registers });
  const rpcDuration = new Histogram({ name: 'loraplex_rpc_duration_seconds', help: 'RPC handling time, arrival to status.', labelNames: ['method'] as const, buckets: REQUEST_BUCKETS, registers });

  const queueSeconds = new Histogram({ name: 'loraplex_request_queue_seconds', help: 'Generate requests: submit to admission (KV row and adapter slot).', buckets: LATENCY_BUCKETS, registers });
  const ttft = new Histogram({ name: 'loraplex_time_to_first_token_seconds', help: 'Generate requests: submit to first token.', buckets: LATENCY_BUCKETS, registers });
  const interToken = new Histogram({ name: 'loraplex_inter_token_latency_seconds', help: 'Gap between consecutive tokens of one sequence.', buckets: TOKEN_GAP_BUCKETS, registers });
  const requestSeconds = new Histogram({ name: 'loraplex_request_duration_seconds', help: 'Generate requests that finished (stop or length): submit to last token.', buckets: REQUEST_BUCKETS, registers });

  const tenants = opts.maxTenantLabels > 0;
  const tokenLabels = tenants ? (['tenant'] as const) : ([] as const);
  const promptTokens = new Counter({ name: 'loraplex_prompt_tokens_total', help: 'Prompt tokens of admitted Generate requests.', labelNames: tokenLabels, registers });
  const generatedTokens = new Counter({ name: 'loraplex_generated_tokens_total', help: 'Tokens sampled for Generate requests.', labelNames: tokenLabels, registers });

  const running = new Gauge({ name: 'loraplex_sequences_running', help: 'Sequences holding a KV cache row (prefilling or decoding).', registers });
  const waiting = new Gauge({ name: 'loraplex_sequences_waiting', help: 'Requests waiting for a KV row or an adapter slot.', registers });
  const rowsUsed = new Gauge({ name: 'loraplex_kv_cache_rows_used', help: 'KV cache rows in use.', registers });
  const rowsFree = new Gauge({ name: 'loraplex_kv_cache_rows_free', help: 'KV cache rows free.', registers });
  const kvBlocks = new Gauge({ name: 'loraplex_kv_cache_blocks', help: 'KV cache blocks of 64 tokens: used (held by rows), reserved (the worst case of running requests, which admission counts), total (the pool, kvCacheBytes).', labelNames: ['state'] as const, registers });
  const batchSize = new Histogram({ name: 'loraplex_decode_batch_size', help: 'Rows per decode step.', buckets: BATCH_BUCKETS, registers });
  const stepSeconds = new Histogram({ name: 'loraplex_engine_step_seconds', help: 'Engine forward step time by kind.', labelNames: ['kind'] as const, buckets: STEP_BUCKETS, registers });
  // Both kinds exist from the start, so rate() has a series before the first request.
  stepSeconds.zero({ kind: 'prefill' });
  stepSeconds.zero({ kind: 'decode' });

  const prefixQueries = new Counter({ name: 'loraplex_prefix_cache_queries_total', help: 'Prompts looked up in the prefix cache when their prefill started.', registers });
  const prefixHits = new Counter({ name: 'loraplex_prefix_cache_hits_total', help: 'Prompts that reused a cached prefix.', registers });
  const prefixHitTokens = new Counter({ name: 'loraplex_prefix_cache_hit_tokens_total', help: 'Prompt tokens restored from the prefix cache instead of prefilled.', registers });
  const prefixBytes = new Gauge({ name: 'loraplex_prefix_cache_bytes', help: 'Bytes of prompt-prefix K/V held for reuse.', registers });

  // Adapter figures: read once per scrape from the getter, cached briefly because each metric collects alone.
  // The getter may be async (the server lists the store in its worker pool); prom-client awaits collect().
  let adapterStats: (() => AdapterCounts | Promise<AdapterCounts>) | null = null;
  let cached: { at: number; value: Promise<AdapterCounts> } | null = null;
  const read = async (): Promise<AdapterCounts | null> => {
    if (!adapterStats) return null;
    const now = performance.now();
    if (!cached || now - cached.at > 500) cached = { at: now, value: Promise.resolve(adapterStats()) };
    return cached.value;
  };
  const total = (name: string, help: string, pick: (s: AdapterCounts) => number) =>
    new Counter({
      name,
      help,
      registers,
      async collect() {
        const s = await read();
        if (!s) return;
        // The manager keeps the running total; a counter cannot be set, so reset and add it.
        this.reset();
        this.inc(pick(s));
      },
    });
  new Gauge({
    name: 'loraplex_adapters',
    help: 'Adapters by state: stored (on disk only), loaded (in memory, no slot), active (in a slot).',
    labelNames: ['state'] as const,
    registers,
    async collect() {
      const s = await read();
      if (!s) return;
      this.set({ state: 'stored' }, s.stored);
      this.set({ state: 'loaded' }, s.loaded);
      this.set({ state: 'active' }, s.active);
    },
  });
  new Gauge({
    name: 'loraplex_adapter_memory_bytes',
    help: 'Bytes of adapter tensors held in memory.',
    registers,
    async collect() {
      const s = await read();
      if (s) this.set(s.memoryBytes);
    },
  });
  total('loraplex_adapter_loads_total', 'Adapter reads from the store.', (s) => s.loads);
  total('loraplex_adapter_evictions_total', 'Adapters dropped from memory by the LRU.', (s) => s.evictions);
  total('loraplex_adapter_slot_evictions_total', 'Slots taken from an idle adapter for another one.', (s) => s.slotEvictions);
  total('loraplex_adapter_cache_hits_total', 'Acquisitions that found the adapter already in a slot.', (s) => s.hits);
  total('loraplex_adapter_cache_misses_total', 'Acquisitions that had to load the adapter or copy it into a slot.', (s) => s.misses);
  total('loraplex_adapter_load_seconds_total', 'Time spent loading adapters from the store.', (s) => s.loadSecondsTotal);

  // Training: a job's figures, not per job (a job id is no label); state is one of five.
  let trainCounts: (() => TrainJobCounts) | null = null;
  new Gauge({
    name: 'loraplex_train_jobs',
    help: 'Training jobs known to the server, by state.',
    labelNames: ['state'] as const,
    registers,
    collect() {
      const c = trainCounts?.();
      for (const state of TRAIN_JOB_STATES) this.set({ state }, c?.[state] ?? 0);
    },
  });
  const trainSteps = new Counter({ name: 'loraplex_train_steps_total', help: 'Optimizer steps done by training jobs.', registers });
  const trainLoss = new Gauge({ name: 'loraplex_train_last_loss', help: 'Training loss of the latest optimizer step.', registers });
  const trainTps = new Gauge({ name: 'loraplex_train_tokens_per_second', help: 'Training throughput of the running job, tokens per second.', registers });

  // First come, first labelled: a bounded set of tenants, the rest share one series.
  const seenTenants = new Set<string>();
  const tenantLabel = (tenant: string | undefined): string => {
    if (!tenant) return NO_TENANT;
    const t = tenant.slice(0, MAX_LABEL_CHARS);
    if (seenTenants.has(t)) return t;
    if (seenTenants.size < opts.maxTenantLabels) {
      seenTenants.add(t);
      return t;
    }
    return OTHER_TENANT;
  };

  return {
    registry,
    observeCall(method, code, seconds) {
      const m = shortMethod(method);
      rpcRequests.inc({ method: m, code: statusName(code) });
      rpcDuration.observe({ method: m }, seconds);
    },
    observeStep(kind, seconds, batch) {
      stepSeconds.observe({ kind }, seconds);
      if (kind === 'decode') batchSize.observe(batch);
    },
    setQueue(s) {
      running.set(s.running);
      waiting.set(s.waiting);
      rowsUsed.set(s.rowsUsed);
      rowsFree.set(s.rowsFree);
    },
    observeRequest(d) {
      if (tenants) {
        const tenant = tenantLabel(d.tenant);
        promptTokens.inc({ tenant }, d.promptTokens);
        generatedTokens.inc({ tenant }, d.generatedTokens);
      } else {
        promptTokens.inc(d.promptTokens);
        generatedTokens.inc(d.generatedTokens);
      }
      queueSeconds.observe(d.queueSeconds);
      if (d.timeToFirstTokenSeconds !== null) ttft.observe(d.timeToFirstTokenSeconds);
      // Aborted requests would drag the end-to-end figure down by however early they left.
      if (d.outcome !== 'aborted') requestSeconds.observe(d.totalSeconds);
    },
    observeInterToken(seconds) {
      interToken.observe(seconds);
    },
    observePrefixLookup(hitTokens, bytes) {
      prefixQueries.inc();
      if (hitTokens > 0) {
        prefixHits.inc();
        prefixHitTokens.inc(hitTokens);
      }
      prefixBytes.set(bytes);
    },
    setKvBlocks({ used, reserved, total }) {
      kvBlocks.set({ state: 'used' }, used);
      kvBlocks.set({ state: 'reserved' }, reserved);
      kvBlocks.set({ state: 'total' }, total);
    },
    attachAdapters(stats) {
      adapterStats = stats;
      cached = null;
    },
    observeTrainStep(loss, tokensPerSecond) {
      trainSteps.inc();
      if (Number.isFinite(loss)) trainLoss.set(loss);
      if (Number.isFinite(tokensPerSecond)) trainTps.set(tokensPerSecond);
    },
    observeTrainIdle() {
      trainTps.set(0);
    },
    attachTrainJobs(counts) {
      trainCounts = counts;
    },
  };
}
