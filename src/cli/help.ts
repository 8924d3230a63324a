import { defaultText, placeholder } from '../config/parse.js';
import { SETTINGS_BY_NAME, type Setting } from '../config/schema.js';

/**
 * Each command's options are declared once, with their help: parseArgs reads the same declaration that
 * `--help` prints, and options that are serve settings come from the serve schema (src/config/schema.ts).
 */

export interface CliOption {
  type: 'string' | 'boolean';
  multiple?: boolean;
  /** What follows the flag in help (` DIR`); none for booleans. */
  arg?: string;
  help: string;
}

export type CliOptions = Readonly<Record<string, CliOption>>;
export type HelpRow = readonly [string, string];

export const schemaSetting = (name: string): Setting => {
  const s = SETTINGS_BY_NAME.get(name);
  if (!s) throw new Error(`no serve setting ${name}`);
  return s;
};

/** Serve settings as another command's options: the schema's flag, placeholder, description and default. */
export function settingOptions(names: readonly string[], describe: (s: Setting) => string = (s) => s.description): Record<string, CliOption> {
  return Object.fromEntries(
    names.map(schemaSetting).map((s) => [s.flag.slice(2), { type: s.type === 'bool' ? 'boolean' : 'string', arg: placeholder(s), help: `${describe(s)} [${defaultText(s)}]` } as const]),
  );
}

/** The parseArgs declaration of options. */
export function parseArgsOptions(options: CliOptions): Record<string, { type: 'string' | 'boolean'; multiple?: boolean }> {
  return Object.fromEntries(Object.entries(options).map(([flag, o]) => [flag, { type: o.type, ...(o.multiple ? { multiple: true } : {}) }]));
}

export function optionRows(options: CliOptions): HelpRow[] {
  return Object.entries(options).map(([flag, o]) => [`--${flag}${o.arg ?? ''}${o.multiple ? ' (repeatable)' : ''}`, o.help]);
}

/** Rows as two aligned columns. */
export function helpTable(rows: readonly HelpRow[]): string[] {
  const width = Math.max(...rows.map((r) => r[0].length));
  return rows.map(([flag, text]) => `  ${flag.padEnd(width)}  ${text}`);
}

/** A usage text: the usage line, an optional paragraph, then titled option tables. */
export function usageText(usage: string, about: readonly string[], sections: readonly (readonly [string, readonly HelpRow[]])[]): string {
  const lines = [`Usage: ${usage}`, ''];
  if (about.length > 0) lines.push(...about, '');
  for (const [title, rows] of sections) lines.push(`${title}:`, ...helpTable(rows), '');
  return lines.join('\n');
}

export const HELP_OPTION: CliOptions = { help: { type: 'boolean', help: 'this help' } };
