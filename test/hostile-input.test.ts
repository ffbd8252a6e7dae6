// Hostile input: every bad file or document is a clear reject naming the file and the position
// (line, item or byte), the other files still load, and nothing of a bad document or an unreadable
// file reaches the clinical tables. One `healthetl run` over a directory holding all of them, as a
// scheduler would call it; expected positions are computed from how each file is built.
import { execFileSync } from 'node:child_process';
import { mkdir, mkdtemp, readFile, rm, symlink, truncate, writeFile } from 'node:fs/promises';
import { truncateSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { gzipSync } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { createDbPool } from '../scripts/db.ts';
import { expandInputs } from '../scripts/inputs.ts';
import { loadBatch } from '../scripts/stage.ts';
import { batchSummaries } from '../scripts/status.ts';
import { childEnv, jsonLines, patients, runCli, writeNdjson, type CliResult, type LogLine } from './fault-helpers.ts';
import { useTestDatabase } from './db.ts';

const db = useTestDatabase();
const json = ['--log-format', 'json'];
const MiB = 1024 * 1024;
// A marker inside every hostile document: it must never appear in the output.
const PHI_CANARY = 'canary-7d1c'; // must never appear in a reason or a log line

const doc = (id: string, extra: object = {}) =>
  JSON.stringify({ patient_id: id, note: PHI_CANARY, visits: [{ visit_id: 'V1', visit_date: '2022-02-02' }], ...extra });
const bytes = (s: string) => Buffer.byteLength(s);
/** Byte offset of line n (1-based) in lines joined by \n. */
const lineOffset = (lines: (string | Buffer)[], n: number) =>
  lines.slice(0, n - 1).reduce((o, l) => o + (typeof l === 'string' ? bytes(l) : l.length) + 1, 0);

type Reject = { file: string; line: number | null; item: number | null; byte_offset: number; reason: string | RegExp };

let dir: string;
let input: string;
const rejects: Reject[] = [];
const loadedIds: string[] = [];
let run: CliResult;
let lines: LogLine[];
let probe: { deep10kArrays: boolean; deep10kObjects: boolean; deep100k: boolean };

beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'healthetl-hostile-'));
  input = path.join(dir, 'in');
  await mkdir(input);
  const f = (name: string) => path.join(input, name);

  // Good files around the bad ones.
  await writeNdjson(f('good-a.ndjson'), [doc('G-1'), doc('G-2')]);
  await writeFile(f('good-b.json'), `[${doc('G-3')},\n${doc('G-4')}]\n`);
  loadedIds.push('G-1', 'G-2', 'G-3', 'G-4');

  // Truncated JSON (cut just after `"visits":[`): a .json file is refused whole; an NDJSON line only that line.
  const cutShort = (s: string) => s.slice(0, s.indexOf('"visits":[') + 10);
  const cut = cutShort(doc('T-1'));
  await writeFile(f('truncated.json'), cut);
  rejects.push({
    file: 'truncated.json',
    line: null,
    item: null,
    byte_offset: 0,
    reason: `$: not valid JSON: unexpected end of input (at byte ${bytes(cut)})`,
  });
  const arr = `[${doc('T-8')},\n${doc('T-9').slice(0, 25)}`;
  await writeFile(f('truncated-array.json'), arr);
  rejects.push({
    file: 'truncated-array.json',
    line: null,
    item: null,
    byte_offset: 0,
    reason: `$: not valid JSON: unexpected end of input inside the top-level array (at byte ${bytes(arr)})`,
  });
  const tl = [doc('T-2'), cutShort(doc('T-3')), doc('T-4')];
  await writeNdjson(f('truncated.ndjson'), tl);
  rejects.push({
    file: 'truncated.ndjson',
    line: 2,
    item: null,
    byte_offset: lineOffset(tl, 2),
    reason: `$: not valid JSON: unexpected end of input (at byte ${lineOffset(tl, 2) + bytes(tl[1])})`,
  });
  loadedIds.push('T-2', 'T-4');

  // Invalid UTF-8 (0xC3 must be followed by a continuation byte, 0x28 is '(').
  const head = `{"patient_id":"U-2","note":"${PHI_CANARY}","x":"a`;
  const ul = [doc('U-1'), Buffer.concat([Buffer.from(head), Buffer.from([0xc3, 0x28]), Buffer.from('"}')]), doc('U-3')];
  await writeFile(f('bad-utf8.ndjson'), Buffer.concat(ul.flatMap((l) => [Buffer.from(l), Buffer.from('\n')])));
  rejects.push({
    file: 'bad-utf8.ndjson',
    line: 2,
    item: null,
    byte_offset: lineOffset(ul, 2),
    reason: `$: not valid UTF-8 (at byte ${lineOffset(ul, 2) + bytes(head)})`,
  });
  loadedIds.push('U-1', 'U-3');

  // \u0000 inside a string (jsonb cannot store it).
  const nul = `{"patient_id":"N-1","note":"${PHI_CANARY}","x":"a\\u0000b"}`;
  await writeNdjson(f('nul.ndjson'), [nul]);
  rejects.push({
    file: 'nul.ndjson',
    line: 1,
    item: null,
    byte_offset: 0,
    reason: `$: contains \\u0000, which PostgreSQL cannot store (at byte ${nul.indexOf('\\u0000')})`,
  });

  // A 50 MB document between two good ones (the default limit is 16 MiB).
  const big = `{"patient_id":"BIG-1","note":"${PHI_CANARY}","pad":"${'x'.repeat(50 * MiB)}"}`;
  const bl = [doc('BIG-0'), big, doc('BIG-2')];
  await writeNdjson(f('big.ndjson'), bl);
  rejects.push({
    file: 'big.ndjson',
    line: 2,
    item: null,
    byte_offset: lineOffset(bl, 2),
    reason: '$: document is larger than the 16 MiB limit (--max-document-mb)',
  });
  loadedIds.push('BIG-0', 'BIG-2');

  // Nesting 10,000 levels deep (an unknown field; the clinical fields name and facility), and 100,000.
  const arrays = (n: number) => '['.repeat(n) + ']'.repeat(n);
  const objects = (n: number) => '{"a":'.repeat(n) + '1' + '}'.repeat(n);
  const dl = [
    `{"patient_id":"D-1","note":"${PHI_CANARY}","deep":${arrays(10_000)},"visits":[]}`,
    `{"patient_id":"D-2","note":"${PHI_CANARY}","name":${objects(10_000)},"visits":[{"visit_id":"V","visit_date":"2021-01-01","facility":${objects(10_000)}}]}`,
    `{"patient_id":"D-3","note":"${PHI_CANARY}","deep":${arrays(100_000)}}`,
    doc('D-4'),
  ];
  await writeNdjson(f('deep.ndjson'), dl);
  const accepts = async (text: string) => {
    try {
      await db.query(`SELECT $1::jsonb IS NOT NULL`, [text]);
      return true;
    } catch (err) {
      expect((err as { code?: string }).code).toBe('54001'); // stack depth limit exceeded
      return false;
    }
  };
  probe = {
    deep10kArrays: await accepts(arrays(10_000)),
    deep10kObjects: await accepts(objects(10_000)),
    deep100k: await accepts(arrays(100_000)),
  };
  const refused = '$: PostgreSQL refused the document: stack depth limit exceeded (SQLSTATE 54001)';
  const deepOutcome = (n: number, ok: boolean, id: string) => {
    if (ok) loadedIds.push(id);
    else rejects.push({ file: 'deep.ndjson', line: n, item: null, byte_offset: lineOffset(dl, n), reason: refused });
  };
  deepOutcome(1, probe.deep10kArrays, 'D-1');
  deepOutcome(2, probe.deep10kObjects, 'D-2');
  deepOutcome(3, probe.deep100k, 'D-3');
  loadedIds.push('D-4');

  // Numbers beyond a double: JSON.parse gives Infinity, so the loader refuses them.
  const hl = [
    `{"patient_id":"H-1","note":"${PHI_CANARY}","weight":1e400}`,
    `{"patient_id":"H-2","note":"${PHI_CANARY}","visits":[{"visit_id":"V1","visit_date":"2022-02-02","cost":-1E+400}]}`,
    `{"patient_id":"H-3","note":"${PHI_CANARY}","n":${'9'.repeat(400)}}`,
    doc('H-4', { largest: 1.7976931348623157e308, smallest: 5e-324 }),
  ];
  await writeNdjson(f('huge-number.ndjson'), hl);
  const numberAt = (n: number, field: string, token: string) =>
    rejects.push({
      file: 'huge-number.ndjson',
      line: n,
      item: null,
      byte_offset: lineOffset(hl, n),
      reason: `${field}: number too large for a double (at byte ${lineOffset(hl, n) + hl[n - 1].indexOf(token)})`,
    });
  numberAt(1, 'weight', '1e400');
  numberAt(2, 'visits[0].cost', '-1E+400');
  numberAt(3, 'n', '999');
  loadedIds.push('H-4');

  // Duplicate keys: JSON.parse and jsonb would silently keep the last value.
  const kl = [
    `{"patient_id":"K-1","note":"${PHI_CANARY}","patient_id":"K-2"}`,
    `{"patient_id":"K-3","note":"${PHI_CANARY}","visits":[{"visit_id":"V1","visit_date":"2022-02-02","visit_date":"2023-03-03"}]}`,
    // Not duplicates: a key containing a colon, a value starting with one, spaces around colons, \" in strings.
    `{"patient_id" : "K-4", "note":"${PHI_CANARY}", "a:b":1, "s":":x", "t":"say \\": no", "visits":[{"visit_id":"V1","visit_date":"2022-02-02"}]}`,
    `{"patient_id":"K-5","note":"${PHI_CANARY}","x":1,"\\u0078":2}`,
  ];
  await writeNdjson(f('dup-keys.ndjson'), kl);
  const dupAt = (n: number, field: string, from: number) =>
    rejects.push({
      file: 'dup-keys.ndjson',
      line: n,
      item: null,
      byte_offset: lineOffset(kl, n),
      reason: `${field}: duplicate key, the document is ambiguous (at byte ${lineOffset(kl, n) + from})`,
    });
  dupAt(1, 'patient_id', kl[0].lastIndexOf('"patient_id"'));
  dupAt(2, 'visits[0].visit_date', kl[1].lastIndexOf('"visit_date"'));
  dupAt(4, 'x', kl[3].indexOf('"\\u0078"'));
  loadedIds.push('K-4');
  const ka = `[${doc('K-6')},\n{"patient_id":"K-7","note":"${PHI_CANARY}","mrn":"1","mrn":"2"},\n${doc('K-8')}]`;
  await writeFile(f('dup-keys-array.json'), ka);
  const item1 = ka.indexOf('{"patient_id":"K-7"');
  rejects.push({
    file: 'dup-keys-array.json',
    line: null,
    item: 1,
    byte_offset: item1,
    reason: `mrn: duplicate key, the document is ambiguous (at byte ${ka.lastIndexOf('"mrn"')})`,
  });
  loadedIds.push('K-6', 'K-8');

  // Binary files named .json: an image (not UTF-8 from byte 0) and an ELF header (ASCII, not JSON).
  const png = Buffer.concat([Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]), Buffer.alloc(64, 0xfe)]);
  await writeFile(f('image.json'), png);
  rejects.push({ file: 'image.json', line: null, item: null, byte_offset: 0, reason: '$: not valid UTF-8 (at byte 0)' });
  await writeFile(f('program.json'), Buffer.from([0x7f, 0x45, 0x4c, 0x46, 0x02, 0x01, 0x01, 0x00, 0x00, 0x00]));
  rejects.push({ file: 'program.json', line: null, item: null, byte_offset: 0, reason: '$: not valid JSON: syntax error (at byte 0)' });

  // Corrupt gzip: damaged in the middle, and cut short. Both unreadable; nothing read before the damage is kept.
  const gz = gzipSync(Buffer.from(Array.from({ length: 300 }, (_, i) => doc(`GZ-${i}`)).join('\n') + '\n'));
  const damaged = Buffer.from(gz);
  damaged.fill(0x55, Math.floor(gz.length / 2), Math.floor(gz.length / 2) + 64);
  await writeFile(f('damaged.ndjson.gz'), damaged);
  await writeFile(f('cut.ndjson.gz'), gz.subarray(0, Math.floor(gz.length / 2)));

  // An empty file: no documents, not an error.
  await writeFile(f('empty.ndjson'), '');

  // A FIFO: never opened (it would block), listed as skipped.
  execFileSync('mkfifo', [f('pipe.ndjson')]);

  // A directory of directories: 40 levels with a file at the bottom, empty siblings, and a
  // symbolic link back up (a loop).
  let deepDir = path.join(input, 'tree');
  for (let i = 0; i < 40; i++) {
    await mkdir(path.join(deepDir, 'empty'), { recursive: true });
    deepDir = path.join(deepDir, `d${i}`);
  }
  await mkdir(deepDir, { recursive: true });
  await writeNdjson(path.join(deepDir, 'bottom.ndjson'), [doc('TREE-1')]);
  await symlink('../..', path.join(input, 'tree', 'd0', 'd1', 'up'));
  loadedIds.push('TREE-1');

  // Two symbolic links to each other.
  await symlink('loop-b.json', f('loop-a.json'));
  await symlink('loop-a.json', f('loop-b.json'));

  // A tree of empty directories, named on the command line next to the input directory.
  await mkdir(path.join(dir, 'nothing', 'a', 'b', 'c'), { recursive: true });

  run = await runCli([...['run', input, path.join(dir, 'nothing')], '--database-url', db.url(), ...json]);
  lines = jsonLines(run.stdout);
}, 120_000);

afterAll(async () => {
  if (dir) await rm(dir, { recursive: true, force: true });
});

describe('one run over a directory of hostile files', () => {
  test('exits 4 (something was rejected) with JSON lines only, no error, no document content', () => {
    expect(run.code, run.stderr).toBe(4);
    expect(run.stderr).toBe('');
    expect(lines.filter((l) => l.level >= 50)).toEqual([]);
    expect(run.stdout).not.toContain(PHI_CANARY);
    expect(lines.at(-1)!.msg).toBe('run finished');
  });

  test('PostgreSQL takes 10,000 levels of nesting and refuses 100,000 (stack depth limit exceeded)', () => {
    // What the server does decides whether a deep document loads or is a reject (below); this
    // records it: with the default max_stack_depth (2 MB), 10,000 levels parse and 100,000 do not.
    expect(probe).toEqual({ deep10kArrays: true, deep10kObjects: true, deep100k: false });
  });

  test('each bad document is one reject naming the file and its line, item or byte, with the exact reason', async () => {
    const rows = await db.query(
      `SELECT source_file, line::int AS line, item::int AS item, byte_offset::int AS byte_offset, reason, field
       FROM etl.rejected_documents ORDER BY source_file, line NULLS FIRST, item NULLS FIRST`,
    );
    const got = rows.map((r) => ({
      file: path.relative(input, r.source_file),
      line: r.line,
      item: r.item,
      byte_offset: r.byte_offset,
      reason: r.reason,
    }));
    const want = [...rejects].sort((a, b) =>
      a.file < b.file ? -1 : a.file > b.file ? 1 : (a.line ?? -1) - (b.line ?? -1) || (a.item ?? -1) - (b.item ?? -1),
    );
    expect(got).toEqual(want);
    for (const r of rows) expect(r.field).toBe(r.reason.slice(0, r.reason.indexOf(': ')));
    // Reasons from the loader never quote the document.
    for (const r of rows) expect(r.reason).not.toContain(PHI_CANARY);
  });

  test('unreadable and skipped inputs are reported per file with the reason; the empty file and the empty tree are not errors', async () => {
    const files = await db.query(
      `SELECT source_file, status, documents::int AS documents, error FROM etl.batch_files ORDER BY source_file`,
    );
    const by = new Map(files.map((x) => [path.relative(input, x.source_file), x]));
    expect(by.get('damaged.ndjson.gz')).toMatchObject({ status: 'unreadable', documents: 0 });
    expect(by.get('damaged.ndjson.gz')!.error).toMatch(/^Z_DATA_ERROR: .* \(after \d+ bytes\)$/);
    expect(by.get('cut.ndjson.gz')).toMatchObject({ status: 'unreadable', documents: 0 });
    expect(by.get('cut.ndjson.gz')!.error).toMatch(/unexpected end of file \(after \d+ bytes\)$/);
    expect(by.get('pipe.ndjson')).toMatchObject({ status: 'skipped', error: 'not a regular file' });
    expect(by.get('tree/d0/d1/up')).toMatchObject({ status: 'skipped', error: 'directory already visited (symbolic link loop)' });
    for (const l of ['loop-a.json', 'loop-b.json']) {
      expect(by.get(l)).toMatchObject({ status: 'unreadable', documents: 0 });
      expect(by.get(l)!.error).toMatch(/^ELOOP: /);
    }
    expect(by.get('empty.ndjson')).toMatchObject({ status: 'staged', documents: 0, error: null });
    expect(by.get('truncated.json')).toMatchObject({ status: 'rejected', documents: 1 });
    expect(by.get('truncated-array.json')).toMatchObject({ status: 'rejected', documents: 1 });
    expect(files.filter((x) => x.source_file.includes(`${path.sep}nothing`))).toEqual([]);
    // One log line per input, naming it; the problems at warn level.
    const named = new Map(lines.filter((l) => typeof l.file === 'string').map((l) => [path.relative(input, l.file as string), l]));
    expect(named.size).toBe(files.length);
    for (const [name, row] of by) {
      expect(named.get(name), name).toBeDefined();
      expect(named.get(name)!.level, name).toBe(row.status === 'staged' ? 30 : 40);
    }
  });

  test('the good documents of every file are loaded; nothing of a bad document or unreadable file is in clinical', async () => {
    const ids = (await db.query(`SELECT source_patient_id AS id FROM clinical.patients ORDER BY 1`)).map((r) => r.id);
    expect(ids).toEqual([...loadedIds].sort());
    const [gz] = await db.query(`SELECT count(*)::int AS n FROM landing.raw_documents WHERE source_file LIKE '%.gz'`);
    expect(gz.n).toBe(0);
    // D-2's name and facility are 10,000 levels deep: loaded as NULL, not an error.
    const [d2] = await db.query(`SELECT p.given_name, p.family_name, v.facility_id, v.facility_name FROM clinical.patients p
                                 JOIN clinical.visits v USING (patient_key) WHERE p.source_patient_id = 'D-2'`);
    expect(d2).toEqual({ given_name: null, family_name: null, facility_id: null, facility_name: null });
    // H-4's extreme but finite doubles and K-4's colons were no reason to refuse them.
    const [h4] = await db.query(
      `SELECT payload->>'largest' AS largest, payload->>'smallest' AS smallest FROM landing.raw_documents WHERE payload->>'patient_id' = 'H-4'`,
    );
    expect(Number(h4.largest)).toBe(1.7976931348623157e308);
    expect(Number(h4.smallest)).toBe(5e-324);
  });

  test('the batch reconciles', async () => {
    const pool = await createDbPool(db.url());
    try {
      const [b] = await batchSummaries(pool);
      expect(b).toMatchObject({ rejected: rejects.length, loaded: loadedIds.length, staged: 0, balanced: true });
    } finally {
      await pool.end();
    }
  });
});

describe('a file that changes while it is read', () => {
  test('truncated mid-read: unreadable, nothing of it kept, the other file loads; once complete it loads whole', async () => {
    const d = await mkdtemp(path.join(dir, 'changing-'));
    const file = path.join(d, 'growing.ndjson');
    const { lines: text } = patients(0, 2000, 21); // about 7 MB: far more than the reader buffers ahead (a few MB)
    await writeNdjson(file, text);
    const original = await readFile(file);
    await writeNdjson(path.join(d, 'other.ndjson'), [doc('OTHER-1')]);
    let cutAt = -1;
    const r = await loadBatch(db.url(), expandInputs([file, path.join(d, 'other.ndjson')]), {
      // Called while the file is being staged (every 256 documents): the producer truncates it.
      onProgress: (p) => {
        if (cutAt < 0 && p.documents >= 256) {
          cutAt = p.documents;
          truncateSync(file, 0);
        }
      },
    });
    expect(cutAt).toBeGreaterThan(0);
    expect(r.files.map((x) => [path.basename(x.path), x.status])).toEqual([
      ['growing.ndjson', 'unreadable'],
      ['other.ndjson', 'staged'],
    ]);
    expect(r.files[0].reason).toMatch(/^the file changed while it was being read \(\d+ bytes when fingerprinted, \d+ read\)/);
    const kept = async (batch: number) =>
      (await db.query(`SELECT count(*)::int AS n FROM landing.raw_documents WHERE source_file = $1 AND batch_id = $2`, [file, batch]))[0].n;
    expect(await kept(r.batchId)).toBe(0);
    // The complete file arrives again: it is read whole, not taken for a copy of a partial read
    // (its fingerprint was never recorded for bytes that were not staged).
    await writeFile(file, original);
    const again = await loadBatch(db.url(), expandInputs([file]));
    expect(again.files[0]).toMatchObject({ status: 'staged', documents: 2000, rejected: 0 });
    expect(await kept(again.batchId)).toBe(2000);
  });
});

describe('memory stays bounded by --max-document-mb, not by the document', () => {
  test('an 80 MB document costs the loader no more memory than a 20 MB one', async () => {
    const d = await mkdtemp(path.join(dir, 'memory-'));
    const hook = path.join(d, 'peak-rss.mjs');
    // Preloaded into the CLI process: writes its peak RSS (kB) when it exits.
    await writeFile(
      hook,
      `import { writeFileSync } from 'node:fs';\nprocess.on('exit', () => writeFileSync(process.env.PEAK_RSS_FILE, String(process.resourceUsage().maxRSS)));\n`,
    );
    const peak = async (mb: number): Promise<number> => {
      const file = path.join(d, `doc-${mb}mb.json`);
      await writeFile(file, `{"patient_id":"MEM-${mb}","pad":"${'x'.repeat(mb * MiB)}"}`);
      const out = path.join(d, `rss-${mb}.txt`);
      const r = await runCli(['load', file, '--database-url', db.url(), ...json], {
        nodeArgs: ['--import', pathToFileURL(hook).href],
        env: childEnv({ PEAK_RSS_FILE: out }),
      });
      expect(r.code, r.stderr).toBe(4);
      const [rej] = await db.query(`SELECT reason FROM etl.rejected_documents WHERE source_file = $1`, [file]);
      expect(rej.reason).toBe('$: document is larger than the 16 MiB limit (--max-document-mb)');
      await truncate(file, 0);
      return Number(await readFile(out, 'utf8')) * 1024;
    };
    const at20 = await peak(20);
    const at80 = await peak(80);
    // Holding the document would cost at least the 60 MB between the two; streaming costs the same.
    expect(at80 - at20, `peak RSS ${at20} B at 20 MB, ${at80} B at 80 MB`).toBeLessThan(40 * MiB);
  });
});
