export { Sampler } from './sampler.js';
export { Rng, randomSeed } from './rng.js';
export {
  validateSamplingParams,
  SamplingParamsError,
  type SamplingParams,
  type SamplingLimits,
} from './params.js';
