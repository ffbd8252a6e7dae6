// The bi/ query pack in `npm run bench`: every bi/*.sql file run as the analyst role it is
// written for (healthetl_researcher for the deid ones, healthetl_analyst otherwise: SET ROLE, so
// the bench's user must be a member, as a superuser is) on the loaded bench database, one warm-up
// then the median of several runs, client-side wall time as a BI tool sees it. A query that needs
// more than a few seconds here needs an index or a view (issue 13): the table says which.
import { readdir, readFile } from 'node:fs/promises';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import pg from 'pg';

export const BI_DIR = path.resolve(import.meta.dirname, '..', 'bi');

export type BiQueryResult = { file: string; role: string; rows: number; median_ms: number; runs_ms: number[] };

/** The role a bi/ file is written for: its tier, by the schema it reads. */
export function roleFor(text: string): string {
  return /\bdeid\./.test(text) ? 'healthetl_researcher' : 'healthetl_analyst';
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

const r2 = (x: number) => Math.round(x * 100) / 100;

/** Runs every bi/*.sql file `runs` times (after one warm-up) as its role; the medians. */
export async function biQueries(url: string, opts: { runs: number; log: (m: string) => void }): Promise<BiQueryResult[]> {
  const files = (await readdir(BI_DIR)).filter((f) => f.endsWith('.sql')).sort();
  opts.log(`8. bi/ queries (${files.length} files), each as its analyst role; median of ${opts.runs}`);
  const out: BiQueryResult[] = [];
  for (const file of files) {
    const text = await readFile(path.join(BI_DIR, file), 'utf8');
    const role = roleFor(text);
    const c = new pg.Client({ connectionString: url, application_name: `healthetl bench: ${file}` });
    await c.connect();
    try {
      await c.query(`SET ROLE ${role}`);
      const first = await c.query(text);
      const rows = Array.isArray(first) ? first.at(-1)!.rowCount : first.rowCount;
      const runs: number[] = [];
      for (let i = 0; i < opts.runs; i++) {
        const t0 = performance.now();
        await c.query(text);
        runs.push(performance.now() - t0);
      }
      out.push({ file, role, rows: rows ?? 0, median_ms: r2(median(runs)), runs_ms: runs.map(r2) });
    } finally {
      await c.end().catch(() => undefined);
    }
  }
  return out;
}

export function biTable(results: BiQueryResult[], runs: number): string[] {
  return [
    `bi/ queries, each as its analyst role; median of ${runs} runs after one warm-up`,
    `| ${'file'.padEnd(34)} | ${'role'.padEnd(20)} | rows   | median ms |`,
    `| ${'-'.repeat(34)} | ${'-'.repeat(20)} | ------ | --------- |`,
    ...results.map(
      (r) => `| ${r.file.padEnd(34)} | ${r.role.padEnd(20)} | ${String(r.rows).padStart(6)} | ${r.median_ms.toFixed(2).padStart(9)} |`,
    ),
  ];
}
