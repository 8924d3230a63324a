import ort from 'onnxruntime-node';
import { EngineError } from './runtime.js';
import type { LoraLayerWeights } from '../models/lora.js';

export interface TrainBatch {
  batch: number;
  seqLength: number;
  /** [batch, seq] */
  inputIds: BigInt64Array;
  /** [batch, seq], -100 = ignored */
  labels: BigInt64Array;
}

/**
 * Runs the training graph (forward + LoRA gradients) on onnxruntime. The trainer keeps the LoRA parameters as
 * Float32Arrays and feeds them every step (inputs from JS typed arrays are not copied); the gradients come back
 * as new arrays. Lives in the engine layer: the one place that talks to onnxruntime.
 */
export class TrainRuntime {
  private constructor(private readonly session: ort.InferenceSession) {}

  static async create(modelPath: string, threads: number): Promise<TrainRuntime> {
    const session = await ort.InferenceSession.create(modelPath, {
      intraOpNumThreads: threads,
      interOpNumThreads: 1,
      graphOptimizationLevel: 'all',
      // With a memory pattern, the second run with the same shapes allocates one block for the whole planned
      // layout while the arena still holds the first run's memory (+1.1 GB peak on the 1.1B shape at seq 128).
      enableMemPattern: false,
      // No QDQ transformers: one of them gives every consumer of a DequantizeLinear its own copy, so the output
      // head, dequantized once per step for all its chunks, was dequantized once per chunk and use (1.6 s of a
      // 1.1B step instead of 0.3 s).
      extra: { session: { intra_op: { allow_spinning: '0' }, disable_quant_qdq: '1' } },
    });
    return new TrainRuntime(session);
  }

  private feeds(batch: TrainBatch, params: LoraLayerWeights[], training: boolean): Record<string, ort.Tensor> {
    if (batch.inputIds.length !== batch.batch * batch.seqLength || batch.labels.length !== batch.batch * batch.seqLength) {
      throw new EngineError('training batch: input_ids and labels must both be [batch, seq]', 'INVALID_ARGUMENT');
    }
    const feeds: Record<string, ort.Tensor> = {
      input_ids: new ort.Tensor('int64', batch.inputIds, [batch.batch, batch.seqLength]),
      labels: new ort.Tensor('int64', batch.labels, [batch.batch, batch.seqLength]),
    };
    // Graphs with LoRA dropout take train_mode: on for steps, off for eval.
    if (this.session.inputNames.includes('train_mode')) feeds['train_mode'] = new ort.Tensor('bool', new Uint8Array([training ? 1 : 0]), []);
    for (const p of params) {
      feeds[`lora_a.${p.module}`] = new ort.Tensor('float32', p.a, [p.r, p.inFeatures]);
      feeds[`lora_b.${p.module}`] = new ort.Tensor('float32', p.b, [p.outFeatures, p.r]);
    }
    return feeds;
  }

  /** Loss and the gradient of every LoRA tensor for one micro-batch. */
  async step(batch: TrainBatch, params: LoraLayerWeights[]): Promise<{ loss: number; grads: { a: Float32Array; b: Float32Array }[] }> {
    const out = await this.session.run(this.feeds(batch, params, true));
    return {
      loss: (out['loss']!.data as Float32Array)[0]!,
      grads: params.map((p) => ({ a: out[`grad_a.${p.module}`]!.data as Float32Array, b: out[`grad_b.${p.module}`]!.data as Float32Array })),
    };
  }

  /** Loss only (eval); onnxruntime runs just the nodes the fetched output needs. */
  async loss(batch: TrainBatch, params: LoraLayerWeights[]): Promise<number> {
    const out = await this.session.run(this.feeds(batch, params, false), ['loss']);
    return (out['loss']!.data as Float32Array)[0]!;
  }

  async release(): Promise<void> {
    await this.session.release();
  }
}
