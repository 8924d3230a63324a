import type { AdapterKey } from '../../src/adapter-key.js';
import { storedAdapterKey, TENANT_SEPARATOR, validateTenant } from '../../src/adapters/tenancy.js';

/** The key written 'tenant~id' or 'id', made (and validated) as the server makes keys it reads back. */
export function key(text: string): AdapterKey {
  const i = text.indexOf(TENANT_SEPARATOR);
  // validateTenant refuses '' too: '~id' is no key.
  return i < 0 ? storedAdapterKey('', text) : storedAdapterKey(validateTenant(text.slice(0, i)), text.slice(i + 1));
}
