// The CLI as a scheduler and a person use it: real processes (node bin/healthetl.mjs), a real
// PostgreSQL, no DATABASE_URL in the environment (only --database-url), CI=true, stdin closed
// unless a test pipes into it. Expected numbers come from fixtures/EXPECTED.md, by hand.
import { spawn } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { gunzipSync, gzipSync } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { useTestDatabase } from './db.ts';

const PROJECT_DIR = fileURLToPath(new URL('..', import.meta.url));
const BIN = path.join(PROJECT_DIR, 'bin', 'healthetl.mjs');
const UNREACHABLE = 'postgresql://postgres@127.0.0.1:1/x';

type Result = { code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string };
type Line = Record<string, unknown> & { level: number; msg: string };

function childEnv(extra: Record<string, string | undefined> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, CI: 'true' };
  for (const k of ['DATABASE_URL', 'PGHOST', 'PGPORT', 'PGUSER', 'PGPASSWORD', 'PGDATABASE', 'PGSSLMODE']) delete env[k];
  for (const [k, v] of Object.entries(extra)) {
    if (v === undefined) delete env[k];
    else env[k] = v;
  }
  return env;
}

/** Runs `healthetl <args>` to completion; stdin is /dev/null unless `input` is given. */
function healthetl(args: string[], opts: { input?: Buffer | string; env?: NodeJS.ProcessEnv; timeoutMs?: number } = {}): Promise<Result> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [BIN, ...args], {
      cwd: PROJECT_DIR,
      env: opts.env ?? childEnv(),
      stdio: [opts.input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout!.setEncoding('utf8').on('data', (c: string) => (stdout += c));
    child.stderr!.setEncoding('utf8').on('data', (c: string) => (stderr += c));
    const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs ?? 45_000);
    child.on('error', reject);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
    if (opts.input !== undefined) {
      child.stdin!.on('error', () => undefined); // EPIPE if the process exits early: the exit code tells
      child.stdin!.end(opts.input);
    }
  });
}

const db = (d: { url: () => string }, ...args: string[]) => [...args, '--database-url', d.url()];

/** Every stdout line must be a JSON object with a numeric level and a string msg. */
function jsonLines(stdout: string): Line[] {
  const lines = stdout.split('\n').filter((l) => l.length > 0);
  return lines.map((l) => {
    let parsed: unknown;
    expect(() => (parsed = JSON.parse(l)), `stdout line is not JSON: ${l}`).not.toThrow();
    expect(parsed).toMatchObject({ level: expect.any(Number), msg: expect.any(String) });
    return parsed as Line;
  });
}

/** The `run finished` line: exactly one, and the last line of stdout. */
function finished(r: Result): Line {
  const lines = jsonLines(r.stdout);
  expect(lines.filter((l) => l.msg === 'run finished')).toHaveLength(1);
  expect(lines.at(-1)!.msg).toBe('run finished');
  return lines.at(-1)!;
}

function stderrLines(r: Result): string[] {
  return r.stderr.split('\n').filter((l) => l.trim().length > 0);
}

type Query = <R extends Record<string, any> = any>(text: string, values?: unknown[]) => Promise<R[]>;

async function clinicalCounts(query: Query) {
  const [r] = await query(`
    SELECT (SELECT count(*) FROM clinical.patients)::int       AS patients,
           (SELECT count(*) FROM clinical.visits)::int         AS visits,
           (SELECT count(*) FROM clinical.diagnoses)::int      AS diagnoses,
           (SELECT count(*) FROM clinical.treatments)::int     AS treatments,
           (SELECT count(*) FROM clinical.provider_notes)::int AS provider_notes`);
  return r as { patients: number; visits: number; diagnoses: number; treatments: number; provider_notes: number };
}

async function bookkeepingCounts(query: Query) {
  const [r] = await query(`
    SELECT (SELECT count(*) FROM etl.patient_keys)::int       AS patient_keys,
           (SELECT count(*) FROM etl.rejected_documents)::int AS rejected_documents,
           (SELECT count(*) FROM etl.document_problems)::int  AS document_problems`);
  return r;
}

// Hand-derived from fixtures/EXPECTED.md.
const VALID = { patients: 16, visits: 15, diagnoses: 13, treatments: 9, provider_notes: 8 };
// valid/ plus snapshots/ in one invocation: snapshots end as step 2 (1 patient, 1 visit, 2 diagnoses).
const VALID_AND_SNAPSHOTS = { patients: 17, visits: 16, diagnoses: 15, treatments: 9, provider_notes: 8 };

// ---- PHI in the fixtures --------------------------------------------------------------------

function filesUnder(dir: string): string[] {
  return readdirSync(dir)
    .sort()
    .flatMap((n) => {
      const p = path.join(dir, n);
      return statSync(p).isDirectory() ? filesUnder(p) : [p];
    });
}

const PHI_KEYS = /"(given|family|prefix|suffix|ssn|mrn|phone|email|birth_date|text)"\s*:\s*"((?:[^"\\\n]|\\.)*)/g;

/** Names, SSNs, MRNs, phones, emails, birth dates and note texts of every document in the files. */
function phiValues(files: string[]): Set<string> {
  const out = new Set<string>();
  const add = (v: unknown) => {
    if (typeof v === 'string' && v.trim()) out.add(v.trim());
    if (Array.isArray(v)) v.forEach(add);
  };
  const walk = (doc: unknown) => {
    if (!doc || typeof doc !== 'object' || Array.isArray(doc)) return;
    const d = doc as Record<string, any>;
    const name = d.name && typeof d.name === 'object' ? d.name : {};
    [name.given, name.family, name.prefix, name.suffix, d.ssn, d.mrn, d.birth_date, d.contact?.phone, d.contact?.email].forEach(add);
    for (const v of Array.isArray(d.visits) ? d.visits : []) {
      for (const n of Array.isArray(v?.provider_notes) ? v.provider_notes : []) add(n?.text);
    }
  };
  // Text that does not parse (truncated lines, a malformed file) still holds PHI: take it by pattern.
  const scrape = (text: string) => {
    for (const m of text.matchAll(PHI_KEYS)) add(JSON.parse(`"${m[2]}"`));
  };
  for (const f of files) {
    let bytes = readFileSync(f);
    if (f.endsWith('.gz')) bytes = gunzipSync(bytes);
    const text = bytes.toString('utf8').replace(/^\uFEFF/, '');
    if (/\.json(\.gz)?$/.test(f)) {
      try {
        const doc = JSON.parse(text);
        (Array.isArray(doc) ? doc : [doc]).forEach(walk);
      } catch {
        scrape(text);
      }
    } else {
      for (const line of text.split('\n')) {
        try {
          const doc = JSON.parse(line);
          (Array.isArray(doc) ? doc : [doc]).forEach(walk);
        } catch {
          scrape(line);
        }
      }
    }
  }
  return out;
}

/** Which of the values appear in the text (ASCII values of 3+ characters as whole tokens; others anywhere). */
function leaked(text: string, values: Set<string>): string[] {
  const hits: string[] = [];
  for (const v of values) {
    if (/^[\x20-\x7e]*$/.test(v)) {
      if (v.length < 3) continue; // 'Jo', 'Id', 'No' would match ordinary words
      const re = new RegExp(`(?<![A-Za-z0-9])${v.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}(?![A-Za-z0-9])`);
      if (re.test(text)) hits.push(v);
    } else if (text.includes(v)) hits.push(v);
  }
  return hits;
}

// ---- tests ----------------------------------------------------------------------------------

describe('help and bad usage', () => {
  const main = useTestDatabase();

  test('--help works on every command, exits 0 and names the command', async () => {
    const commands = ['', 'migrate', 'load', 'transform', 'run', 'status', 'demo'];
    const results = await Promise.all(commands.map((c) => healthetl(c ? [c, '--help'] : ['--help'])));
    results.forEach((r, i) => {
      const c = commands[i];
      expect(r.code, `${c} --help: ${r.stderr}`).toBe(0);
      expect(r.stderr).toBe('');
      expect(r.stdout).toContain(c ? `healthetl ${c}` : 'healthetl <command>');
    });
    // The top-level help lists every command and the exit codes.
    for (const c of commands.slice(1)) expect(results[0].stdout).toMatch(new RegExp(`healthetl ${c}\\b`));
    expect(results[0].stdout).toContain('3 database unreachable');
  });

  test('bad usage exits 2 with one line on stderr and does nothing', async () => {
    const before = await main.query(`SELECT count(*)::int AS n FROM etl.batches`);
    const cases: Array<{ args: string[]; mentions: RegExp }> = [
      { args: ['bogus'], mentions: /bogus/ },
      { args: db(main, 'run', 'fixtures/valid', '--bogus'), mentions: /Unknown argument: bogus/ },
      { args: db(main, 'run'), mentions: /need at least 1/ },
      { args: db(main, 'migrate', 'sideways'), mentions: /sideways/ },
      { args: db(main, 'status', '--batch', 'abc'), mentions: /--batch must be a number/ },
    ];
    const results = await Promise.all(cases.map((c) => healthetl(c.args)));
    results.forEach((r, i) => {
      const what = cases[i].args.join(' ');
      expect(r.code, `${what}: ${r.stderr}`).toBe(2);
      expect(stderrLines(r), what).toHaveLength(1);
      expect(r.stderr, what).toMatch(/^healthetl: /);
      expect(r.stderr, what).toMatch(cases[i].mentions);
      expect(r.stderr, what).not.toMatch(/^\s+at /m);
      expect(r.stdout, what).toBe('');
    });
    // Nothing was started in the database.
    expect(await main.query(`SELECT count(*)::int AS n FROM etl.batches`)).toEqual(before);
  });
});

describe('database unreachable', () => {
  test('exit 3 with one line naming host:port and what to do, no stack trace', async () => {
    const commands = [['status'], ['run', 'fixtures/valid']];
    const results = await Promise.all(commands.map((c) => healthetl([...c, '--database-url', UNREACHABLE])));
    results.forEach((r, i) => {
      const what = commands[i].join(' ');
      expect(r.code, `${what}: ${r.stderr}`).toBe(3);
      const lines = stderrLines(r);
      expect(lines, what).toHaveLength(1);
      expect(lines[0]).toContain('127.0.0.1:1');
      expect(lines[0]).toMatch(/start the server|--database-url|DATABASE_URL/);
      expect(r.stderr).not.toMatch(/^\s+at /m);
      // stdout stays JSON lines, with the same message at level error.
      expect(jsonLines(r.stdout).some((l) => l.level === 50 && l.msg.includes('127.0.0.1:1'))).toBe(true);
    });
  });

  test('--verbose adds the stack trace', async () => {
    const r = await healthetl(['status', '--verbose', '--database-url', UNREACHABLE]);
    expect(r.code).toBe(3);
    expect(r.stderr).toContain('127.0.0.1:1');
    expect(r.stderr).toMatch(/^\s+at /m);
  });
});

describe('run: exit codes, JSON lines, counts, status', () => {
  const main = useTestDatabase();
  let validRun: Result;
  let invalidRun: Result;
  let againRun: Result;
  let noCiRun: Result;
  let afterFirst: Awaited<ReturnType<typeof clinicalCounts>>;

  beforeAll(async () => {
    validRun = await healthetl(db(main, 'run', 'fixtures/valid'));
    afterFirst = await clinicalCounts(main.query);
    invalidRun = await healthetl(db(main, 'run', 'fixtures/invalid'));
    againRun = await healthetl(db(main, 'run', 'fixtures/valid'));
    noCiRun = await healthetl(db(main, 'run', 'fixtures/snapshots/v2.ndjson'), { env: childEnv({ CI: undefined }) });
  });

  test('exit codes: 0 for valid, 4 when something is rejected, 0 again for duplicates', () => {
    expect(validRun.code, validRun.stderr).toBe(0);
    expect(invalidRun.code, invalidRun.stderr).toBe(4);
    expect(againRun.code, againRun.stderr).toBe(0);
    for (const r of [validRun, againRun]) expect(r.stderr).toBe('');
  });

  test('stdout is JSON lines; run finished carries the counts of EXPECTED.md', () => {
    expect(finished(validRun)).toMatchObject({ level: 30, documents: 16, loaded: 16, rejected: 0, duplicate: 0, superseded: 0 });
    // invalid/: rejects.ndjson 31 documents (2 load, 29 rejected) + malformed.json rejected whole.
    expect(finished(invalidRun)).toMatchObject({ documents: 32, loaded: 2, rejected: 30, duplicate: 0, superseded: 0, failed_files: 1 });
    expect(finished(againRun)).toMatchObject({ documents: 16, loaded: 0, rejected: 0, duplicate: 16, superseded: 0 });
    // One "file ..." line per input file.
    expect(jsonLines(validRun.stdout).filter((l) => typeof l.file === 'string')).toHaveLength(6);
    const malformed = jsonLines(invalidRun.stdout).find((l) => String(l.file).endsWith('malformed.json'));
    expect(malformed).toMatchObject({ level: 40, msg: 'file rejected' });
  });

  test('the database holds what one load of valid/ and invalid/ gives', async () => {
    expect(afterFirst).toEqual(VALID);
    // invalid/ adds R-OK-1 and R-OK-2: 2 patients, 2 visits, 1 diagnosis, 0 treatments, 1 note;
    // snapshots/v2.ndjson adds S-1: 1 patient, 1 visit, 2 diagnoses.
    expect(await clinicalCounts(main.query)).toEqual({ patients: 19, visits: 18, diagnoses: 16, treatments: 9, provider_notes: 9 });
    expect(await bookkeepingCounts(main.query)).toEqual({ patient_keys: 19, rejected_documents: 30, document_problems: 0 });
  });

  test('logs are JSON lines when not on a terminal even without CI', () => {
    expect(noCiRun.code, noCiRun.stderr).toBe(0);
    expect(noCiRun.stderr).toBe('');
    expect(finished(noCiRun)).toMatchObject({ documents: 1, loaded: 1, rejected: 0, duplicate: 0, superseded: 0 });
  });

  test('status: one balanced JSON line per batch, exit 0; an unknown batch exits 2', async () => {
    const r = await healthetl(db(main, 'status', '--log-format', 'json'));
    expect(r.code, r.stderr).toBe(0);
    const batches = jsonLines(r.stdout).filter((l) => l.msg === 'batch');
    expect(batches).toHaveLength(4);
    for (const b of batches) {
      const n = (k: string) => b[k] as number;
      expect(n('received'), JSON.stringify(b)).toBe(n('loaded') + n('rejected') + n('duplicate') + n('superseded') + n('staged'));
      expect(n('staged')).toBe(0);
      expect(b.balanced).toBe(true);
    }
    const byBatch = new Map(batches.map((b) => [b.batch_id, b]));
    expect(byBatch.get(finished(validRun).batch)).toMatchObject({ received: 16, loaded: 16, rejected: 0, duplicate: 0, superseded: 0 });
    expect(byBatch.get(finished(invalidRun).batch)).toMatchObject({ received: 32, loaded: 2, rejected: 30, failed_files: 1 });
    expect(byBatch.get(finished(againRun).batch)).toMatchObject({ received: 16, loaded: 0, duplicate: 16 });

    const one = await healthetl(db(main, 'status', '--batch', String(finished(invalidRun).batch)));
    expect(one.code).toBe(0);
    expect(jsonLines(one.stdout).map((l) => l.batch_id)).toEqual([finished(invalidRun).batch]);

    const missing = await healthetl(db(main, 'status', '--batch', '999999'));
    expect(missing.code).toBe(2);
    expect(stderrLines(missing)).toHaveLength(1);
    expect(missing.stderr).toContain('999999');
  });

  test('migrate status lists the migrations as applied', async () => {
    const r = await healthetl(db(main, 'migrate', 'status'));
    expect(r.code, r.stderr).toBe(0);
    const lines = jsonLines(r.stdout);
    const names = lines.map((l) => l.migration);
    expect(names).toEqual(expect.arrayContaining(['0001_landing-and-etl-schemas', '0002_clinical-tables', '0003_transform-functions']));
    const files = readdirSync(path.join(PROJECT_DIR, 'migrations')).filter((f) => f.endsWith('.sql'));
    expect(lines).toHaveLength(files.length);
    for (const l of lines) {
      expect(l.msg).toBe('applied');
      expect(Number.isNaN(Date.parse(String(l.applied_at)))).toBe(false);
    }
  });
});

describe('PHI never in output', () => {
  const main = useTestDatabase();
  const inputs = ['fixtures/valid', 'fixtures/invalid'];
  const phi = phiValues(inputs.flatMap((d) => filesUnder(path.join(PROJECT_DIR, d))));

  test('the collector found the PHI of the fixtures', () => {
    // Hand-picked from the fixture files, including the gzipped file and the malformed one.
    for (const v of [
      'Testperson',
      'Quinn',
      '000-00-0001',
      'MRN-0001',
      '+1-555-0100',
      'ada.testperson@example.invalid',
      '1970-01-15',
      'Fictional note: cough and fever for 3 days.',
      '李',
      '小龍',
      'Müller',
      'Kim',
      'Gzipped',
      'Mia',
      'Truncated',
    ]) {
      expect(phi, v).toContain(v);
    }
    expect(phi.size).toBeGreaterThan(60);
  });

  test('no name, SSN, MRN, phone, email, birth date or note text in stdout or stderr', async () => {
    const runs: Result[] = [];
    // Loaded fresh in JSON with debug logs; then again for a person (rejects are read again and listed).
    runs.push(await healthetl(db(main, 'run', ...inputs, '--verbose')));
    runs.push(await healthetl(db(main, 'run', ...inputs, '--log-format', 'pretty')));
    expect(runs.map((r) => r.code)).toEqual([4, 4]);
    expect(finished(runs[0])).toMatchObject({ documents: 48, loaded: 18, rejected: 30 });
    // The pretty run did print something about the rejects, so the check has text to look at.
    expect(runs[1].stdout).toContain('rejected: fixtures/invalid/rejects.ndjson line 3: $');
    expect(runs[1].stderr).toContain('run finished');
    for (const r of runs) {
      expect(leaked(r.stdout, phi), 'stdout').toEqual([]);
      expect(leaked(r.stderr, phi), 'stderr').toEqual([]);
    }
  });

  test('the leak check itself finds a value when one is there', () => {
    expect(leaked('{"msg":"x","given":"Testperson"}', phi)).toEqual(['Testperson']);
    expect(leaked('family=李', phi)).toEqual(['李']);
  });
});

describe('standard input', () => {
  const d = useTestDatabase();

  test('run - loads NDJSON piped in', async () => {
    const r = await healthetl(db(d, 'run', '-'), { input: readFileSync(path.join(PROJECT_DIR, 'fixtures/valid/patients.ndjson')) });
    expect(r.code, r.stderr).toBe(0);
    expect(finished(r)).toMatchObject({ documents: 8, loaded: 8, rejected: 0 });
    // valid/patients.ndjson: 8 patients, 8 visits, 8 diagnoses, 6 treatments, 4 notes.
    expect(await clinicalCounts(d.query)).toEqual({ patients: 8, visits: 8, diagnoses: 8, treatments: 6, provider_notes: 4 });
    expect(await d.query(`SELECT source_file, documents::int FROM etl.batch_files`)).toEqual([{ source_file: '-', documents: 8 }]);
  });

  test('run - --stdin-format json loads a JSON array piped in', async () => {
    const r = await healthetl(db(d, 'run', '-', '--stdin-format', 'json'), {
      input: readFileSync(path.join(PROJECT_DIR, 'fixtures/valid/array.json')),
    });
    expect(r.code, r.stderr).toBe(0);
    expect(finished(r)).toMatchObject({ documents: 3, loaded: 3, rejected: 0 });
    const items = await d.query(`SELECT item::int FROM landing.raw_documents WHERE format = 'json' ORDER BY item`);
    expect(items.map((i) => i.item)).toEqual([0, 1, 2]);
    // array.json: 3 patients, 3 visits, 2 diagnoses, 1 treatment, 2 notes on top of the 8/8/8/6/4.
    expect(await clinicalCounts(d.query)).toEqual({ patients: 11, visits: 11, diagnoses: 10, treatments: 7, provider_notes: 6 });
  });

  test('gzip-compressed NDJSON piped in is recognised by its magic bytes', async () => {
    const gz = readFileSync(path.join(PROJECT_DIR, 'fixtures/valid/gzipped.ndjson.gz'));
    expect([gz[0], gz[1]]).toEqual([0x1f, 0x8b]);
    const r = await healthetl(db(d, 'run', '-'), { input: gz });
    expect(r.code, r.stderr).toBe(0);
    expect(finished(r)).toMatchObject({ documents: 2, loaded: 2, rejected: 0 });
    const ids = await d.query(`SELECT source_patient_id FROM clinical.patients WHERE family_name = 'Gzipped' ORDER BY 1`);
    expect(ids.map((i) => i.source_patient_id)).toEqual(['P-4001', 'P-4002']);
  });

  test('a document piped in twice is a duplicate the second time', async () => {
    const doc = gzipSync(readFileSync(path.join(PROJECT_DIR, 'fixtures/valid/nested/dir/deep.jsonl')));
    const first = await healthetl(db(d, 'run', '-'), { input: doc });
    const second = await healthetl(db(d, 'run', '-'), { input: doc });
    expect([first.code, second.code]).toEqual([0, 0]);
    expect(finished(first)).toMatchObject({ documents: 1, loaded: 1, duplicate: 0 });
    expect(finished(second)).toMatchObject({ documents: 1, loaded: 0, duplicate: 1 });
  });
});

describe('load then transform equals run', () => {
  const viaRun = useTestDatabase();
  const viaSteps = useTestDatabase();
  const inputs = ['fixtures/valid', 'fixtures/warnings', 'fixtures/invalid'];
  // valid 16/15/13/9/8 + warnings 5/2/1/2/1 + invalid 2/2/1/0/1 (EXPECTED.md).
  const expected = { patients: 23, visits: 19, diagnoses: 15, treatments: 11, provider_notes: 10 };

  test('same clinical counts, rejects and problems', async () => {
    const run = await healthetl(db(viaRun, 'run', ...inputs));
    expect(run.code, run.stderr).toBe(4);
    expect(finished(run)).toMatchObject({ documents: 53, loaded: 23, rejected: 30, duplicate: 0, superseded: 0, problems: 12 });

    const load = await healthetl(db(viaSteps, 'load', ...inputs));
    expect(load.code, load.stderr).toBe(4); // malformed.json and a truncated line are refused while loading
    const staged = jsonLines(load.stdout).find((l) => l.msg === 'batch staged');
    expect(staged).toMatchObject({ documents: 53, rejected: 2 });
    expect(await clinicalCounts(viaSteps.query)).toEqual({ patients: 0, visits: 0, diagnoses: 0, treatments: 0, provider_notes: 0 });
    // Before the transform the batch is balanced with 51 documents staged.
    const pending = await healthetl(db(viaSteps, 'status'));
    expect(pending.code).toBe(0);
    expect(jsonLines(pending.stdout)[0]).toMatchObject({ received: 53, staged: 51, rejected: 2, loaded: 0, balanced: true });

    const transform = await healthetl(db(viaSteps, 'transform'));
    expect(transform.code, transform.stderr).toBe(4);
    expect(jsonLines(transform.stdout).find((l) => l.msg === 'batch transformed')).toMatchObject({
      documents: 51,
      loaded: 23,
      rejected: 28,
      problems: 12,
    });

    expect(await clinicalCounts(viaRun.query)).toEqual(expected);
    expect(await clinicalCounts(viaSteps.query)).toEqual(expected);
    const book = { patient_keys: 23, rejected_documents: 30, document_problems: 12 };
    expect(await bookkeepingCounts(viaRun.query)).toEqual(book);
    expect(await bookkeepingCounts(viaSteps.query)).toEqual(book);

    const again = await healthetl(db(viaSteps, 'transform'));
    expect(again.code).toBe(0);
    expect(jsonLines(again.stdout).map((l) => l.msg)).toEqual(['nothing to transform']);
  });

  test('loading the same file twice before transforming loads it once', async () => {
    const d = viaRun; // v2 of the snapshots is not in this database yet
    const a = await healthetl(db(d, 'load', 'fixtures/snapshots/v2.ndjson'));
    const b = await healthetl(db(d, 'load', 'fixtures/snapshots/v2.ndjson'));
    expect([a.code, b.code]).toEqual([0, 0]);
    const t = await healthetl(db(d, 'transform'));
    expect(t.code, t.stderr).toBe(0);
    const rows = await d.query(`SELECT given_name, city FROM clinical.patients WHERE source_patient_id = 'S-1'`);
    expect(rows).toEqual([{ given_name: 'Sam', city: 'Secondville' }]);
    const outcome = await d.query(`
      SELECT d.status, count(*)::int AS n FROM landing.raw_documents d
      WHERE d.source_file = 'fixtures/snapshots/v2.ndjson' GROUP BY 1 ORDER BY 1`);
    expect(outcome).toEqual([
      { status: 'duplicate', n: 1 },
      { status: 'loaded', n: 1 },
    ]);
  });
});

/** A TCP proxy to the test server that delays what the server sends, like a database across a network. */
async function slowProxy(databaseUrl: string, delayMs: number): Promise<{ url: string; close: () => Promise<void> }> {
  const target = new URL(databaseUrl);
  const sockets = new Set<net.Socket>();
  const server = net.createServer((client) => {
    const upstream = net.connect(Number(target.port || 5432), target.hostname);
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.on('error', () => undefined);
      s.on('close', () => {
        client.destroy();
        upstream.destroy();
      });
    }
    client.on('data', (c) => upstream.write(c));
    upstream.on('data', (c) => setTimeout(() => client.writable && client.write(c), delayMs));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const url = new URL(databaseUrl);
  url.hostname = '127.0.0.1';
  url.port = String((server.address() as net.AddressInfo).port);
  return {
    url: url.toString(),
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}

describe('a slow database connection', () => {
  const d = useTestDatabase();
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'healthetl-cli-'));
  afterAll(() => rmSync(tmp, { recursive: true, force: true }));

  // Reading a file must not start before the loader consumes it: chunks read while BEGIN was in
  // flight used to be dropped, and the files were recorded as staged with 0 documents.
  test('every document of every file is staged; a corrupt gzip is one unreadable file, not a crash', async () => {
    const corrupt = path.join(tmp, 'corrupt.ndjson.gz');
    writeFileSync(corrupt, gzipSync(readFileSync(path.join(PROJECT_DIR, 'fixtures/valid/patients.ndjson'))).subarray(0, 40));
    const proxy = await slowProxy(d.url(), 15);
    try {
      const r = await healthetl(['run', 'fixtures/valid', corrupt, '--database-url', proxy.url]);
      expect(r.code, r.stderr).toBe(4);
      expect(r.stderr).not.toMatch(/Unhandled|^\s+at /m);
      const lines = jsonLines(r.stdout);
      const perFile = Object.fromEntries(lines.filter((l) => l.msg === 'file staged').map((l) => [l.file, l.documents]));
      expect(perFile).toEqual({
        'fixtures/valid/array.json': 3,
        'fixtures/valid/gzipped.ndjson.gz': 2,
        'fixtures/valid/nested/dir/deep.jsonl': 1,
        'fixtures/valid/one-patient.json': 1,
        'fixtures/valid/patients.ndjson': 8,
        'fixtures/valid/with-bom.json': 1,
      });
      expect(lines.find((l) => l.file === corrupt)).toMatchObject({ level: 40, msg: 'file unreadable' });
      expect(finished(r)).toMatchObject({ documents: 16, loaded: 16, rejected: 0, failed_files: 1 });
    } finally {
      await proxy.close();
    }
    expect(await clinicalCounts(d.query)).toEqual(VALID);
  });
});

describe('concurrent runs on overlapping inputs', () => {
  const two = useTestDatabase();
  const four = useTestDatabase();

  async function concurrently(d: typeof two, n: number) {
    const results = await Promise.all(Array.from({ length: n }, () => healthetl(db(d, 'run', 'fixtures/valid', 'fixtures/snapshots'))));
    for (const r of results) expect(r.code, r.stderr).toBe(0);

    // Exactly one load's worth of clinical rows.
    expect(await clinicalCounts(d.query)).toEqual(VALID_AND_SNAPSHOTS);
    expect(await bookkeepingCounts(d.query)).toEqual({ patient_keys: 17, rejected_documents: 0, document_problems: 0 });
    const [s1] = await d.query(`SELECT given_name, city FROM clinical.patients WHERE source_patient_id = 'S-1'`);
    expect(s1).toEqual({ given_name: 'Sam', city: 'Secondville' });

    // Every received document of every batch is accounted for.
    const status = await healthetl(db(d, 'status'));
    expect(status.code, status.stderr).toBe(0);
    const batches = jsonLines(status.stdout);
    expect(batches).toHaveLength(n);
    for (const b of batches) {
      expect(b).toMatchObject({ received: 19, staged: 0, rejected: 0, balanced: true });
    }
    // The first batch transformed loads 16 + v2 and supersedes v0 and v1; the others are duplicates.
    const outcomes = batches.map((b) => [b.loaded, b.superseded, b.duplicate]).sort();
    const expected = [[17, 2, 0], ...Array.from({ length: n - 1 }, () => [0, 0, 19])].sort();
    expect(outcomes).toEqual(expected);
    // No document's bytes were loaded twice.
    expect(
      await d.query(`SELECT content_sha256 FROM landing.raw_documents WHERE status = 'loaded' GROUP BY 1 HAVING count(*) > 1`),
    ).toEqual([]);

    // What each process reported for its own batch adds up and matches status.
    const byBatch = new Map(batches.map((b) => [b.batch_id, b]));
    for (const r of results) {
      const f = finished(r);
      expect(f.documents).toBe(19);
      expect((f.loaded as number) + (f.rejected as number) + (f.duplicate as number) + (f.superseded as number)).toBe(19);
      expect(byBatch.get(f.batch)).toMatchObject({ loaded: f.loaded, duplicate: f.duplicate, superseded: f.superseded });
    }
  }

  test('two processes', async () => {
    await concurrently(two, 2);
  });

  test('four processes', async () => {
    await concurrently(four, 4);
  });
});

describe('demo', () => {
  const d = useTestDatabase();

  test('off a terminal the summary is plain text on stdout and the log lines are JSON on stderr', async () => {
    const r = await healthetl(db(d, 'demo'), { timeoutMs: 55_000 });
    expect(r.code, r.stderr).toBe(0);
    const out = r.stdout.split('\n').filter((l) => l.trim().length > 0);
    for (const l of out) expect(() => JSON.parse(l), `stdout line is JSON: ${l}`).toThrow();
    expect(out).toContain('Table counts');
    expect(r.stdout).toMatch(/^This run \(batch \d+\): received \d+ = loaded \d+ \+ rejected \d+ \+ duplicate \d+ \+ superseded \d+/m);
    expect(out).toContain('Latest visits (synthetic fixtures)');
    const logs = stderrLines(r).map((l) => JSON.parse(l) as Line);
    expect(logs.map((l) => l.msg)).toContain('batch staged');
  });

  test("a re-run rejects the fixtures' bad documents again (exit 0: they are demo data) but stores no reject twice", async () => {
    const rejects = () =>
      d.query(`SELECT encode(content_sha256, 'hex') AS sha, document_id::int, field, reason FROM etl.rejected_documents ORDER BY 1`);
    const before = await rejects();
    expect(before).toHaveLength(30); // invalid/: 29 in rejects.ndjson and malformed.json (fixtures/EXPECTED.md)
    const again = await healthetl(db(d, 'demo'), { timeoutMs: 55_000 });
    expect(again.code, again.stderr).toBe(0);
    expect(again.stdout).toMatch(/^This run \(batch \d+\): received \d+ = loaded 0 \+ rejected 30 \+ duplicate \d+ \+ superseded 0/m);
    expect(await rejects()).toEqual(before);
    const [deliveries] = await d.query(`SELECT min(deliveries)::int AS min, max(deliveries)::int AS max FROM etl.rejected_documents`);
    expect(deliveries).toEqual({ min: 2, max: 2 });
  });
});
