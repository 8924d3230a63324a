export {
  Tokenizer,
  TokenizerError,
  ChatTemplateError,
  loadTokenizer,
  type ChatMessage,
  type EncodeOptions,
  type DecodeOptions,
  type ChatTemplateOptions,
} from './tokenizer.js';
export { IncrementalDecoder, type IncrementalDecoderOptions } from './incremental.js';
export { StopStringMatcher, type StopResult } from './stop.js';
