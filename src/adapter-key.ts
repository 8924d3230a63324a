/**
 * The internal key of an adapter: `tenant~id` in a tenant's namespace, the plain id without auth, or a
 * per-request mix's `!mix-<hash>`. A branded string, so that a raw client string cannot be passed where a key is
 * expected: keys are made only by src/adapters/tenancy.ts (scopeAdapterId from a client's id, storedAdapterKey for
 * keys read back from the store and job records) and AdapterManager.defineMix. Clients never see one. A
 * dependency-free leaf, so every layer may name the type.
 */
declare const adapterKeyBrand: unique symbol;
export type AdapterKey = string & { readonly [adapterKeyBrand]: 'AdapterKey' };
