import { linearModules, loraScaling, type PeftAdapter } from '../adapters/peft.js';
import type { LoraLayerWeights } from '../models/lora.js';
import type { ModelSpec } from '../models/spec.js';
import { Rng } from '../sampling/rng.js';
import type { LoraSettings } from './config.js';
import type { NamedParam } from './optimizer.js';

/**
 * A fresh trainable adapter as PEFT's LoraLayer.reset_lora_parameters(init_lora_weights=True) makes it:
 * lora_A ~ kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(in_features), 1/sqrt(in_features)) (gain
 * sqrt(2 / (1 + 5)) times sqrt(3 / fan_in)); lora_B = 0, so training starts from the base model exactly.
 * One seeded stream is drawn in linearModules' order (layer, then forward order), like PEFT's single
 * torch generator in module-creation order: the same seed and settings give the same tensors.
 */
export function initLora(
  spec: ModelSpec,
  lora: Pick<LoraSettings, 'r' | 'loraAlpha' | 'targetModules' | 'useRslora'>,
  seed: number,
  opts: { baseModelNameOrPath?: string | null } = {},
): PeftAdapter {
  const { r } = lora;
  const targets = new Set(lora.targetModules);
  const rng = new Rng(seed);
  const modules: LoraLayerWeights[] = [];
  for (const lin of linearModules(spec)) {
    if (!targets.has(lin.peftName) && !targets.has('all-linear')) continue;
    const bound = 1 / Math.sqrt(lin.inFeatures);
    const a = new Float32Array(r * lin.inFeatures); // [r, in]
    for (let i = 0; i < a.length; i++) a[i] = (2 * rng.nextFloat() - 1) * bound;
    const b = new Float32Array(lin.outFeatures * r); // [out, r]
    modules.push({ module: lin.module, a, b, r, inFeatures: lin.inFeatures, outFeatures: lin.outFeatures });
  }
  if (modules.length === 0) throw new Error(`initLora: target_modules ${JSON.stringify(lora.targetModules)} select no linear of this model`);
  return {
    config: {
      r,
      loraAlpha: lora.loraAlpha,
      targetModules: [...lora.targetModules],
      useRslora: lora.useRslora,
      baseModelNameOrPath: opts.baseModelNameOrPath ?? null,
      raw: {},
    },
    r,
    alpha: lora.loraAlpha,
    scaling: loraScaling(r, lora.loraAlpha, lora.useRslora),
    modules,
  };
}

/**
 * The adapter's tensors as optimizer parameters (views, updated in place), named
 * `<module>.lora_A` / `<module>.lora_B`, in module order, A before B.
 */
export function loraParams(adapter: PeftAdapter): NamedParam[] {
  return adapter.modules.flatMap((m) => [
    { name: `${m.module}.lora_A`, value: m.a },
    { name: `${m.module}.lora_B`, value: m.b },
  ]);
}
