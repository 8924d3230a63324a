/**
 * Imports point down: no cycles, and none of the upward edges below. Reads the TypeScript sources (not dist/),
 * so type-only imports count too: a type import still ties a lower layer to the one above it.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import ts from 'typescript';

const root = fileURLToPath(new URL('../../../', import.meta.url));

interface Rule {
  readonly why: string;
  /** Both take repository-relative paths with forward slashes. */
  readonly from: (file: string) => boolean;
  readonly to: (file: string) => boolean;
}

const under = (dir: string) => (file: string) => file.startsWith(`${dir}/`);
const anyOf = (...tests: ((file: string) => boolean)[]) => (file: string) => tests.some((t) => t(file));
const is = (path: string) => (file: string) => file === path;

const RULES: readonly Rule[] = [
  { why: 'kernels/ is the math, independent of the server', from: under('kernels'), to: under('src') },
  {
    why: 'obs is a leaf: it is handed what it reports',
    from: under('src/obs'),
    to: anyOf(...['rpc', 'adapters', 'scheduler', 'engine', 'train', 'models'].map((d) => under(`src/${d}`))),
  },
  { why: 'config, rpc and http sit below the composition root', from: anyOf(under('src/config'), under('src/rpc'), under('src/http')), to: is('src/main.ts') },
  { why: 'the HTTP front door is built on rpc (one generation path), never the other way', from: under('src/rpc'), to: under('src/http') },
  { why: 'the composition root does not know the command line', from: is('src/main.ts'), to: under('src/cli') },
  {
    why: 'only the CLI sits above the composition root',
    from: (f) => under('src')(f) && !under('src/cli')(f),
    to: anyOf(under('src/cli'), is('src/main.ts')),
  },
];

function sourceFiles(dir: string): string[] {
  const out: string[] = [];
  for (const name of readdirSync(join(root, dir))) {
    const path = `${dir}/${name}`;
    if (statSync(join(root, path)).isDirectory()) out.push(...sourceFiles(path));
    else if (name.endsWith('.ts') && !name.endsWith('.d.ts')) out.push(path);
  }
  return out;
}

/** `./x.js` -> `src/y/x.ts` (or its index.ts); null for packages and for files that are not TypeScript sources. */
function resolveSpecifier(from: string, specifier: string): string | null {
  if (!specifier.startsWith('.')) return null;
  const target = resolve(root, dirname(from), specifier);
  const candidates = [target.replace(/\.js$/, '.ts'), `${target}.ts`, join(target, 'index.ts')];
  const hit = candidates.find((c) => c.endsWith('.ts') && existsSync(c));
  return hit === undefined ? null : relative(root, hit).split('\\').join('/');
}

/** Static imports and exports `from '...'`, `import('...')` and `import type`, as the compiler reads them (comments skipped). */
function importsOf(file: string): string[] {
  const info = ts.preProcessFile(readFileSync(join(root, file), 'utf8'), true, true);
  return info.importedFiles.map((f) => resolveSpecifier(file, f.fileName)).filter((f): f is string => f !== null);
}

function importGraph(): Map<string, string[]> {
  const graph = new Map<string, string[]>();
  for (const file of [...sourceFiles('src'), ...sourceFiles('kernels')]) graph.set(file, [...new Set(importsOf(file))]);
  return graph;
}

/** Every strongly connected component of more than one file (or a file importing itself), as one cycle each. */
function findCycles(graph: ReadonlyMap<string, readonly string[]>): string[][] {
  const index = new Map<string, number>();
  const low = new Map<string, number>();
  const stack: string[] = [];
  const onStack = new Set<string>();
  const components: string[][] = [];
  let next = 0;
  const visit = (v: string) => {
    index.set(v, next);
    low.set(v, next++);
    stack.push(v);
    onStack.add(v);
    for (const w of graph.get(v) ?? []) {
      if (!index.has(w)) {
        visit(w);
        low.set(v, Math.min(low.get(v)!, low.get(w)!));
      } else if (onStack.has(w)) low.set(v, Math.min(low.get(v)!, index.get(w)!));
    }
    if (low.get(v) === index.get(v)) {
      const component: string[] = [];
      let w: string;
      do {
        w = stack.pop()!;
        onStack.delete(w);
        component.push(w);
      } while (w !== v);
      if (component.length > 1 || (graph.get(v) ?? []).includes(v)) components.push(component);
    }
  };
  for (const v of graph.keys()) if (!index.has(v)) visit(v);
  return components.map((c) => cyclePath(graph, new Set(c)));
}

/** One concrete loop through a component, for the message: a -> b -> c -> a. */
function cyclePath(graph: ReadonlyMap<string, readonly string[]>, component: ReadonlySet<string>): string[] {
  const start = [...component].sort()[0]!;
  const seen = new Map<string, string>();
  const queue = [start];
  while (queue.length) {
    const v = queue.shift()!;
    for (const w of graph.get(v) ?? []) {
      if (!component.has(w)) continue;
      if (w === start) {
        const path = [v];
        while (path[0] !== start) path.unshift(seen.get(path[0]!)!);
        return [...path, start];
      }
      if (!seen.has(w)) {
        seen.set(w, v);
        queue.push(w);
      }
    }
  }
  return [...component];
}

const graph = importGraph();

test('the import graph covers src/ and kernels/', () => {
  assert.ok(graph.has('src/main.ts') && graph.has('kernels/ir.ts'));
  assert.ok((graph.get('src/main.ts') ?? []).length > 5, 'main.ts imports are found');
});

test('no import cycle', () => {
  const cycles = findCycles(graph);
  assert.deepEqual(cycles.map((c) => c.join(' -> ')), []);
});

test('imports point down', () => {
  const broken: string[] = [];
  for (const [from, targets] of graph) {
    for (const to of targets) {
      const rule = RULES.find((r) => r.from(from) && r.to(to));
      if (!rule) continue;
      broken.push(`${from} -> ${to} (${rule.why})`);
    }
  }
  assert.deepEqual(broken, []);
});

test('the cycle finder names a loop', () => {
  const g = new Map([
    ['a', ['b']],
    ['b', ['c']],
    ['c', ['a', 'd']],
    ['d', []],
  ]);
  assert.deepEqual(findCycles(g), [['a', 'b', 'c', 'a']]);
  assert.deepEqual(findCycles(new Map([['a', ['a']]])), [['a', 'a']]);
});
