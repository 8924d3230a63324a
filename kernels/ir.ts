import type { OnnxAttributeValue, OnnxDataType, OnnxGraphDef, OnnxNode, OnnxTensor, OnnxTensorData } from './onnx.js';

/**
 * A small graph IR: typed values with (possibly symbolic) dims, lowered 1:1 to ONNX nodes.
 * Ops in kernels/ops build on `Graph.op`; a model family describes one forward pass with those ops.
 */
export type Dim = number | string;

export interface Value {
  readonly name: string;
  readonly dtype: OnnxDataType;
  /** Informational shape: numbers for fixed dims, names for symbolic ones ('batch', 'seq', 'past'), '?' unknown. */
  readonly shape: readonly Dim[];
}

export interface OpSpec {
  domain?: string;
  attrs?: Record<string, OnnxAttributeValue>;
  /** One entry per output. */
  outputs: { dtype: OnnxDataType; shape: readonly Dim[] }[];
  /** Kept on the tape only (never lowered), e.g. what a gradient rule needs to know beyond the ONNX node. */
  meta?: Readonly<Record<string, unknown>>;
}

/**
 * One node as recorded for kernels/autodiff.ts. Nodes made with `op`/`op1` carry their typed Values; nodes
 * appended with `emit` are recorded by name only (`raw`), so autodiff can tell when one lies on a gradient path.
 */
export interface TapeNode {
  readonly opType: string;
  /** '' for the default ONNX domain. */
  readonly domain: string;
  /** The ONNX node's name. */
  readonly name: string;
  readonly inputs: readonly (Value | null)[];
  readonly outputs: readonly Value[];
  readonly attrs: Readonly<Record<string, OnnxAttributeValue>>;
  readonly meta?: Readonly<Record<string, unknown>>;
  /** Set for `emit`ted nodes: their value names ('' = absent input); inputs/outputs are then empty. */
  readonly raw?: { readonly inputs: readonly string[]; readonly outputs: readonly string[] };
}

export const OPSET = 21;

export class Graph {
  private readonly nodes: OnnxNode[] = [];
  private readonly inputs: Value[] = [];
  private readonly outputs: Value[] = [];
  private readonly initializers: OnnxTensor[] = [];
  private readonly initializerByName = new Map<string, OnnxTensor>();
  private readonly recorded: TapeNode[] = [];
  private readonly producers = new Map<string, TapeNode>();
  private readonly memo = new Map<unknown, unknown>();
  private readonly used = new Set<string>();
  private readonly scalars = new Map<string, Value>();
  private counter = 0;
  /** Name prefix for values made while building one module (e.g. 'l3.attn.'), for readable graphs. */
  scope = '';

  constructor(readonly name: string) {}

  /** A fresh value name under the current scope. */
  fresh(hint: string): string {
    let n = `${this.scope}${hint}`;
    while (this.used.has(n)) n = `${this.scope}${hint}_${++this.counter}`;
    this.used.add(n);
    return n;
  }

  input(name: string, dtype: OnnxDataType, shape: Dim[]): Value {
    if (this.used.has(name)) throw new Error(`graph ${this.name}: duplicate value name ${name}`);
    this.used.add(name);
    const v: Value = { name, dtype, shape };
    this.inputs.push(v);
    return v;
  }

  /** A constant tensor (an ONNX initializer, so ORT can prepack it). */
  constant(hint: string, dtype: OnnxDataType, dims: number[], data: OnnxTensorData): Value {
    const name = this.fresh(hint);
    const t: OnnxTensor = { name, dataType: dtype, dims, data };
    this.initializers.push(t);
    this.initializerByName.set(name, t);
    return { name, dtype, shape: dims };
  }

  /** Adds an initializer made elsewhere (e.g. a quantized weight) under its own name. */
  addInitializer(t: OnnxTensor): Value {
    if (this.used.has(t.name)) throw new Error(`graph ${this.name}: duplicate value name ${t.name}`);
    this.used.add(t.name);
    this.initializers.push(t);
    this.initializerByName.set(t.name, t);
    return { name: t.name, dtype: t.dataType, shape: t.dims };
  }

  /** The initializer behind a value, if it is one (how gradient rules read constant axes, exponents ...). */
  initializer(name: string): OnnxTensor | undefined {
    return this.initializerByName.get(name);
  }

  /** The values of a constant int64 tensor (e.g. from `ints`), or undefined when v is not a constant. */
  constInts(v: Value | null | undefined): number[] | undefined {
    const t = v ? this.initializerByName.get(v.name) : undefined;
    return t && t.data instanceof BigInt64Array ? Array.from(t.data, Number) : undefined;
  }

  /** The values of a constant float32 tensor (e.g. from `scalar`), or undefined. */
  constFloats(v: Value | null | undefined): number[] | undefined {
    const t = v ? this.initializerByName.get(v.name) : undefined;
    return t && t.dataType === 'float32' && t.data instanceof Float32Array ? Array.from(t.data) : undefined;
  }

  /** Builds something once per graph under `key` (e.g. a dequantized weight shared by several backward uses). */
  once<T>(key: unknown, make: () => T): T {
    if (this.memo.has(key)) return this.memo.get(key) as T;
    const v = make();
    this.memo.set(key, v);
    return v;
  }

  /** The recorded (Graph.op) node that made a value, if any. */
  producer(v: Value): TapeNode | undefined {
    return this.producers.get(v.name);
  }

  /** Every node so far, in order (a topological order), for reverse-mode autodiff. */
  get tape(): readonly TapeNode[] {
    return this.recorded;
  }

  /** Shared int64 constants (shapes, axes, indices), deduplicated. */
  ints(values: number[]): Value {
    const key = `i64:${values.join(',')}`;
    let v = this.scalars.get(key);
    if (!v) {
      const saved = this.scope;
      this.scope = '';
      v = this.constant(`const_i64_${values.join('_').replace(/-/g, 'm')}`, 'int64', [values.length], BigInt64Array.from(values.map(BigInt)));
      this.scope = saved;
      this.scalars.set(key, v);
    }
    return v;
  }

  /** Shared float32 constants of shape [values.length], deduplicated. */
  floats(values: number[]): Value {
    const key = `f32v:${values.join(',')}`;
    let v = this.scalars.get(key);
    if (!v) {
      const saved = this.scope;
      this.scope = '';
      v = this.constant('const_f32v', 'float32', [values.length], Float32Array.from(values));
      this.scope = saved;
      this.scalars.set(key, v);
    }
    return v;
  }

  /** A float32 scalar constant (rank 0), deduplicated. */
  scalar(value: number): Value {
    const key = `f32:${value}`;
    let v = this.scalars.get(key);
    if (!v) {
      const saved = this.scope;
      this.scope = '';
      v = this.constant('const_f32', 'float32', [], new Float32Array([value]));
      this.scope = saved;
      this.scalars.set(key, v);
    }
    return v;
  }

  /** Emits one node; returns its outputs. */
  op(opType: string, inputs: (Value | null)[], spec: OpSpec, hint = opType.toLowerCase()): Value[] {
    const outs = spec.outputs.map((o, i) => ({ name: this.fresh(spec.outputs.length > 1 ? `${hint}_${i}` : hint), dtype: o.dtype, shape: o.shape }));
    const node: OnnxNode = {
      opType,
      name: this.fresh(`node_${hint}`),
      inputs: inputs.map((v) => (v ? v.name : '')),
      outputs: outs.map((o) => o.name),
    };
    if (spec.domain) node.domain = spec.domain;
    if (spec.attrs) node.attributes = spec.attrs;
    this.nodes.push(node);
    const t: TapeNode = {
      opType, domain: spec.domain ?? '', name: node.name!, inputs: [...inputs], outputs: outs, attrs: spec.attrs ?? {},
      ...(spec.meta ? { meta: spec.meta } : {}),
    };
    this.recorded.push(t);
    for (const o of outs) this.producers.set(o.name, t);
    return outs;
  }

  /** Single-output convenience. */
  op1(opType: string, inputs: (Value | null)[], out: { dtype: OnnxDataType; shape: readonly Dim[] }, attrs?: Record<string, OnnxAttributeValue>, domain?: string, hint?: string): Value {
    const spec: OpSpec = { outputs: [out] };
    if (attrs) spec.attrs = attrs;
    if (domain) spec.domain = domain;
    return this.op(opType, inputs, spec, hint)[0]!;
  }

  /**
   * Appends nodes built elsewhere (e.g. a codec's emitLinear); their output names must be fresh(). They are not
   * differentiable (autodiff reports one on a gradient path); see quantizedLinearOp in kernels/autodiff.ts.
   */
  emit(nodes: OnnxNode[]): void {
    for (const n of nodes) {
      this.nodes.push(n);
      for (const o of n.outputs) this.used.add(o);
      this.recorded.push({
        opType: n.opType, domain: n.domain ?? '', name: n.name ?? '', inputs: [], outputs: [], attrs: n.attributes ?? {},
        raw: { inputs: n.inputs, outputs: n.outputs },
      });
    }
  }

  /** Marks a value as a graph output under a public name (inserting an Identity when renaming). */
  output(v: Value, name: string, shape?: Dim[]): Value {
    // Informational shapes are not trusted for outputs: ORT warns on a wrong fixed dim, so unnamed dims stay symbolic.
    const declared = shape ?? v.shape.map((_, i) => `${name}_dim${i}`);
    let out: Value = { name: v.name, dtype: v.dtype, shape: declared };
    if (v.name !== name) {
      if (this.used.has(name)) throw new Error(`graph ${this.name}: duplicate value name ${name}`);
      this.used.add(name);
      this.nodes.push({ opType: 'Identity', name: this.fresh('node_out'), inputs: [v.name], outputs: [name] });
      out = { name, dtype: v.dtype, shape: declared };
    }
    this.outputs.push(out);
    return out;
  }

  toOnnx(): OnnxGraphDef {
    const info = (v: Value) => ({ name: v.name, dataType: v.dtype, dims: [...v.shape] });
    return {
      name: this.name,
      inputs: this.inputs.map(info),
      outputs: this.outputs.map(info),
      nodes: this.nodes,
      initializers: this.initializers,
      opsets: [
        { domain: '', version: OPSET },
        { domain: 'com.microsoft', version: 1 },
      ],
    };
  }

  get initializerBytes(): number {
    return this.initializers.reduce((s, t) => s + t.data.byteLength, 0);
  }
}
