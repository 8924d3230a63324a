import { isAbsolute, relative, resolve, sep } from 'node:path';
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

/** The internal key of (tenant, id). Both are validated. */
export function adapterKey(tenant: string, id: string): string {
  validateAdapterId(id);
  if (tenant === '') return id;
  return `${validateTenant(tenant)}${TENANT_SEPARATOR}${id}`;
}

/** The client's `adapter_id` -> the internal key in the caller's namespace; INVALID_ARGUMENT for a bad id. */
export function scopeAdapterId(principal: Principal, adapterId: unknown): string {
  return adapterKey(principal.tenant, validateAdapterId(adapterId));
}

/** Splits a key (validating both parts). Keys come from scopeAdapterId or the store, so a bad one is a bug. */
export function parseAdapterKey(key: string): { tenant: string; id: string } {
  const i = key.indexOf(TENANT_SEPARATOR);
  if (i < 0) return { tenant: '', id: validateAdapterId(key) };
  const tenant = key.slice(0, i);
  const id = key.slice(i + 1);
  validateAdapterId(id); // also refuses a second '~'
  if (!isTenantName(tenant)) throw invalidArgument(`adapter_id ${JSON.stringify(displayId(key))}: bad tenant in adapter key`);
  return { tenant, id };
}

/** The id part of a key: what messages show, so they read the same in every namespace. */
export function displayId(key: string): string {
  return key.slice(key.indexOf(TENANT_SEPARATOR) + 1);
}

/** The tenant part of a key ('' for the flat store), e.g. for a metrics label. */
export function tenantOf(key: string): string {
  const i = key.indexOf(TENANT_SEPARATOR);
  return i < 0 ? '' : key.slice(0, i);
}

/** True when the key is in the principal's namespace. */
export function visibleTo(principal: Principal, key: string): boolean {
  return tenantOf(key) === principal.tenant;
}

/** The client's id for a key in its namespace; null for another tenant's key (treat it as missing). */
export function unscopeAdapterId(principal: Principal, key: string): string | null {
  return visibleTo(principal, key) ? displayId(key) : null;
}

/** An adapter record or info as the principal sees it (its id unscoped); null when not in its namespace. */
export function asSeenBy<T extends { adapterId: string }>(principal: Principal, item: T): T | null {
  const adapterId = unscopeAdapterId(principal, item.adapterId);
  return adapterId === null ? null : { ...item, adapterId };
}

/** The items in the principal's namespace, ids unscoped (for listings). */
export function visibleAdapters<T extends { adapterId: string }>(principal: Principal, items: readonly T[]): T[] {
  const out: T[] = [];
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
 * The directory of a key under `root`: `<root>/<tenant>/<id>` or `<root>/<id>`, checked (belt and braces)
 * to lie exactly there, so no key can name anything outside the root.
 */
export function adapterKeyPath(root: string, key: string): string {
  const { tenant, id } = parseAdapterKey(key);
  const parts = tenant === '' ? [id] : [tenant, id];
  const base = resolve(root);
  const full = resolve(base, ...parts);
  const rel = relative(base, full);
  if (rel !== parts.join(sep) || isAbsolute(rel) || rel.startsWith('..')) {
    throw invalidArgument(`adapter_id ${JSON.stringify(id)}: must be a plain name`);
  }
  return full;
}
