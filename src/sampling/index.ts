export { Sampler } from './sampler.js';
export { Rng, randomSeed } from './rng.js';
export { logprobsOf, type TokenLogprob } from './logprobs.js';
export {
  MAX_LOGPROBS,
  validateSamplingParams,
  SamplingParamsError,
  type SamplingParams,
  type SamplingLimits,
} from './params.js';
