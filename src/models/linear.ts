import { emitLinear, quantizeLinear, type QuantOptions } from '../../kernels/quant/index.js';
import { add } from '../../kernels/ops/basic.js';
import type { LinearEmitter } from './graph.js';

/** The serving graph's linear layers, quantized with one codec (int4 / nf4 / int8 / none). */
export function quantizedLinear(opts: QuantOptions): LinearEmitter {
  return (g, x, name, w, bias) => {
    const [N, K] = w.shape as [number, number];
    const q = quantizeLinear(w.data, N, K, opts, name);
    for (const t of q.tensors) g.addInitializer(t);
    const y = g.fresh(`${name}.y`);
    g.emit(emitLinear(q, x.name, y));
    const out = { name: y, dtype: 'float32' as const, shape: [...x.shape.slice(0, -1), N] };
    return bias ? add(g, out, g.constant(`${name}.bias`, 'float32', [N], bias.data), `${name}.biased`) : out;
  };
}
