import type { ModelFamily, ModelSpec } from '../spec.js';
import { linearModulesOf, parseLinearModule, peftNamesOf, type FamilyDefinition, type LinearModule } from './family.js';
import { gpt2 } from './gpt2.js';
import { llama } from './llama.js';

/** The model families by name: adding one is one file beside these and a line here. */
export const FAMILIES: Readonly<Record<ModelFamily, FamilyDefinition>> = { llama, gpt2 };

export function familyOf(spec: Pick<ModelSpec, 'family'>): FamilyDefinition {
  return FAMILIES[spec.family];
}

/** Every LoRA-able linear of the model, in layer order, with PEFT's in/out features. */
export function linearModules(spec: ModelSpec): LinearModule[] {
  return linearModulesOf(familyOf(spec), spec);
}

/** PEFT's target_modules names of the spec's family, in forward order. */
export function loraModuleNames(family: ModelFamily): string[] {
  return peftNamesOf(FAMILIES[family]);
}

/** The family whose LoRA-able linears include this module path (any layer), or null. */
export function familyOfModule(module: string): ModelFamily | null {
  for (const f of Object.values(FAMILIES)) if (parseLinearModule(f, module)) return f.name;
  return null;
}

/** Sort key of a LoRA-able module path: by layer, then in forward order (linearModules' order). */
export function moduleOrder(module: string): number {
  for (const f of Object.values(FAMILIES)) {
    const at = parseLinearModule(f, module);
    if (at) return at.layer * 100 + at.index;
  }
  return Number.NaN;
}

export { constantOf, transposed } from './family.js';
export type { AttentionHeads, BodyContext, ExpectedWeight, FamilyDefinition, LayerLinear, LinearModule, LinearWeight } from './family.js';
