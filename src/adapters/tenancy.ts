import { relative, resolve, sep } from 'node:path';
import type { AdapterKey } from '../adapter-key.js';
import { LoraplexError, invalidArgument } from '../errors.js';
import { MAX_ADAPTER_ID_LENGTH, validateAdapterId } from './ids.js';

/**
 * Tenants: each API key belongs to a tenant, and adapter ids live in their tenant's namespace. Inside the
 * server an adapter is named by its KEY: `${tenant}~${id}`, or just `id` for the empty tenant (auth
 * disabled: the flat store of before). '~' is allowed in neither tenants nor ids, so keys never collide.
 * On disk: `<root>/<tenant>/<id>/`, or `<root>/<id>/` for the empty tenant.
 *
 * The client only ever sees ids: scope on the way in, unscope (and filter) on the way out. A tenant asking for
 * another tenant's adapter builds a key in its own namespace, so it gets the same NOT_FOUND as for any
 * missing adapter: nothing says the other one exists.
 */

export interface Principal {
  /** '' = no tenant: the flat, un-namespaced store (auth disabled). */
  readonly tenant: string;
  /** admin: may also run model-wide operations (still inside its own namespace for adapters). */
  readonly role: 'user' | 'admin';
}

/** Every call when auth is disabled: today's behaviour, one flat store, everything allowed. */
export const LOCAL_PRINCIPAL: Principal = Object.freeze({ tenant: '', role: 'admin' });

export const TENANT_SEPARATOR = '~';

const TENANT_RULE = `must be 1-${MAX_ADAPTER_ID_LENGTH} characters of letters, digits, ".", "_", "-" and not start with "."`;

function isSafeName(name: string): boolean {
  try {
    validateAdapterId(name);
    return true;
  } catch {
    return false;
  }
}

/** A tenant name follows the adapter-id rules (it becomes a directory name); '' is not a tenant name. */
export function isTenantName(name: unknown): name is string {
  return typeof name === 'string' && isSafeName(name);
}

/** The tenant name unchanged, or an error naming `field` and the rule (for key files). */
export function validateTenant(name: unknown, field = 'tenant'): string {
  if (!isTenantName(name)) {
    const shown = typeof name === 'string' ? ` ${JSON.stringify(name.length > 40 ? `${name.slice(0, 40)}...` : name)}` : '';
    throw invalidArgument(`${field}${shown}: ${TENANT_RULE}`);
  }
  return name;
}

/**
 * The client's `adapter_id` -> the key in the caller's namespace: THE validation of a client's id (INVALID_ARGUMENT
 * for a bad one). The principal's tenant was validated when its API key was read (auth.ts).
 */
export function scopeAdapterId(principal: Principal, adapterId: unknown): AdapterKey {
  const id = validateAdapterId(adapterId);
  return (principal.tenant === '' ? id : `${principal.tenant}${TENANT_SEPARATOR}${id}`) as AdapterKey;
}

/**
 * The key of an adapter the server itself recorded: a directory of the store, a job record's (tenant, id).
 * Both parts are validated: the files may have been edited by hand.
 */
export function storedAdapterKey(tenant: string, id: string): AdapterKey {
  validateAdapterId(id);
  if (tenant === '') return id as AdapterKey;
  return `${validateTenant(tenant)}${TENANT_SEPARATOR}${id}` as AdapterKey;
}

/** Splits a key. Keys are valid by construction (scopeAdapterId, storedAdapterKey), so nothing is checked here. */
export function parseAdapterKey(key: AdapterKey): { tenant: string; id: string } {
  const i = key.indexOf(TENANT_SEPARATOR);
  return i < 0 ? { tenant: '', id: key } : { tenant: key.slice(0, i), id: key.slice(i + 1) };
}

/** The id part of a key: what messages show, so they read the same in every namespace. */
export function displayId(key: AdapterKey): string {
  return key.slice(key.indexOf(TENANT_SEPARATOR) + 1);
}

/** The tenant part of a key ('' for the flat store), e.g. for a metrics label. */
export function tenantOf(key: AdapterKey): string {
  const i = key.indexOf(TENANT_SEPARATOR);
  return i < 0 ? '' : key.slice(0, i);
}

/** True when the key is in the principal's namespace. */
export function visibleTo(principal: Principal, key: AdapterKey): boolean {
  return tenantOf(key) === principal.tenant;
}

/** The client's id for a key in its namespace; null for another tenant's key (treat it as missing). */
export function unscopeAdapterId(principal: Principal, key: AdapterKey): string | null {
  return visibleTo(principal, key) ? displayId(key) : null;
}

/** An item as a client sees it: the key replaced by the client's id. */
export type SeenByClient<T extends { adapterKey: AdapterKey }> = Omit<T, 'adapterKey'> & { adapterId: string };

/** An adapter record or info as the principal sees it (its key unscoped); null when not in its namespace. */
export function asSeenBy<T extends { adapterKey: AdapterKey }>(principal: Principal, item: T): SeenByClient<T> | null {
  const adapterId = unscopeAdapterId(principal, item.adapterKey);
  if (adapterId === null) return null;
  const { adapterKey: _key, ...rest } = item;
  return { ...rest, adapterId };
}

/** The items in the principal's namespace, keys unscoped (for listings). */
export function visibleAdapters<T extends { adapterKey: AdapterKey }>(principal: Principal, items: readonly T[]): SeenByClient<T>[] {
  const out: SeenByClient<T>[] = [];
  for (const item of items) {
    const seen = asSeenBy(principal, item);
    if (seen) out.push(seen);
  }
  return out;
}

/** PERMISSION_DENIED unless the principal is an admin; `what` names the operation. */
export function requireAdmin(principal: Principal, what: string): void {
  if (principal.role !== 'admin') throw new LoraplexError('PERMISSION_DENIED', `${what}: needs an admin API key`);
}

/**
 * The directory of a key under `root`: `<root>/<tenant>/<id>` or `<root>/<id>`. Keys are valid names by
 * construction; belt and braces, each part must still be one plain path component and the result lie exactly
 * there, so no key can name anything outside the root.
 */
export function adapterKeyPath(root: string, key: AdapterKey): string {
  const { tenant, id } = parseAdapterKey(key);
  const parts = tenant === '' ? [id] : [tenant, id];
  const base = resolve(root);
  const full = resolve(base, ...parts);
  const plain = parts.every((p) => p !== '' && p !== '.' && p !== '..' && !p.includes('/') && !p.includes(sep) && !p.includes('\0'));
  if (!plain || relative(base, full) !== parts.join(sep)) {
    throw invalidArgument(`adapter_id ${JSON.stringify(id)}: must be a plain name`);
  }
  return full;
}
