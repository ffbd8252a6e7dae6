// Errors: exit codes, the SQLSTATE dug out of wrapped errors (slonik wraps pg's in its own),
// what each class means for the run, and one line saying what to do. Every SQLSTATE and
// driver-message pattern lives here.
import pg from 'pg';
import { InvalidInputError } from 'slonik';
import { describeTarget } from './db.ts';

/** Exit codes: documented in the README; a scheduler acts on them. */
export const EXIT = {
  OK: 0,
  FAILURE: 1, // unexpected error
  USAGE: 2, // bad command line
  DB_UNREACHABLE: 3, // cannot connect or authenticate
  REJECTED: 4, // ran to the end, but some documents or files were rejected
  NOT_MIGRATED: 5, // the schema is missing or behind: run `healthetl migrate up`
  UNBALANCED: 6, // a batch's counts do not reconcile
  BATCH_FAILED: 7, // a batch failed to transform (status): its error says why; the next run retries it
  DQ_FAILED: 8, // a data-quality check of error severity failed (status 'fail') in the checks run or dq ran; warn alone is 0
} as const;

export type ExitCode = (typeof EXIT)[keyof typeof EXIT];

/**
 * Which exit code wins when a command ends with several outcomes at once, highest first:
 *
 *   2 USAGE, 1 FAILURE  end a command as soon as they happen (an error thrown), so they never meet
 *                       another outcome; listed first so that nothing hides them
 *   3 DB_UNREACHABLE    PostgreSQL unreachable, login refused, server restarted: retry later
 *   5 NOT_MIGRATED      the schema is missing or behind: run `healthetl migrate up`
 *   6 UNBALANCED        a batch's counts do not reconcile
 *   7 BATCH_FAILED      a batch failed to transform (`status`; `run` and `transform` end with that batch's
 *                       own error instead, after transforming and checking the other batches)
 *   8 DQ_FAILED         an error-severity data-quality check failed (a warn-severity one alone: 0)
 *   4 REJECTED          some documents or files were rejected (or replay kept some patients)
 *   0 OK
 *
 * The code that calls for the most urgent action wins: a scheduler retries on 3, a DBA migrates on
 * 5, investigates on 6 and 7; a failed data-quality check (8) matters more than a rejected document,
 * which the batch counts and keeps (4). So `run` with rejects and a failed error check exits 8.
 * Every command that can end with more than one of these picks its code here.
 */
export const EXIT_PRECEDENCE: readonly ExitCode[] = [
  EXIT.USAGE,
  EXIT.FAILURE,
  EXIT.DB_UNREACHABLE,
  EXIT.NOT_MIGRATED,
  EXIT.UNBALANCED,
  EXIT.BATCH_FAILED,
  EXIT.DQ_FAILED,
  EXIT.REJECTED,
  EXIT.OK,
];

/** The exit code of a command that ended with these outcomes (false and undefined: not this one): see EXIT_PRECEDENCE; OK when none. */
export function exitCodeOf(outcomes: Iterable<ExitCode | false | undefined | null>): ExitCode {
  let best: ExitCode = EXIT.OK;
  for (const o of outcomes) {
    if (o === false || o === undefined || o === null) continue;
    if (!EXIT_PRECEDENCE.includes(o)) throw new TypeError(`exitCodeOf: ${o} is not an exit code`);
    if (EXIT_PRECEDENCE.indexOf(o) < EXIT_PRECEDENCE.indexOf(best)) best = o;
  }
  return best;
}

export class UserError extends Error {
  constructor(
    message: string,
    readonly exitCode: number,
  ) {
    super(message);
  }
}

type PgLikeError = Error & { code?: string; hint?: string; cause?: unknown; errno?: number; syscall?: string };

/**
 * The server's own error (pg's DatabaseError: it has a severity and a SQLSTATE) under slonik's
 * wrappers, which keep it in `cause` (slonik 47: BackendTerminated*, IntegrityConstraintViolation
 * and its subclasses, IdleTransactionTimeout, StatementCancelled, StatementTimeout, InputSyntax),
 * except InvalidInputError, which slonik makes of a 22P02 with the server's message only: that one
 * is given back as a 22P02 without its message (it quotes the value). Undefined for anything else
 * (a file error such as EPIPE, a socket error), whatever its code looks like.
 */
function serverErrorOf(err: unknown): { code: string; message: string; hint?: string } | undefined {
  let e = err as PgLikeError | undefined;
  for (let i = 0; i < 6 && e && typeof e === 'object'; i++) {
    if (e instanceof pg.DatabaseError && typeof e.code === 'string') return e as pg.DatabaseError & { code: string };
    // slonik's own InvalidInputErrors say what our code did wrong, capitalised and with a full stop;
    // the server's messages start in lower case.
    if (e instanceof InvalidInputError && !/^[A-Z]/.test(e.message)) return { code: '22P02', message: 'invalid input value' };
    e = e.cause as PgLikeError | undefined;
  }
  return undefined;
}

/** The first error down the `cause` chain that carries a code (pg's own, or Node's), else the last one. */
function innermost(err: unknown): PgLikeError {
  let e = err as PgLikeError;
  for (let i = 0; i < 5 && e && typeof e === 'object' && e.cause && !e.code; i++) e = e.cause as PgLikeError;
  return e;
}

/** The SQLSTATE of the server's error under slonik's wrappers; undefined when the server did not answer with one. */
function sqlState(err: unknown): string | undefined {
  return serverErrorOf(err)?.code;
}

/** The server answered with an error (told by its type, pg's DatabaseError, not by the shape of its code). */
export function isServerError(err: unknown): boolean {
  return serverErrorOf(err) !== undefined;
}

/** Class 22 (data exception) or 54001 (too deep): a bad document; anything else (connection, lock) is not ours to swallow. */
export function isDataError(err: unknown): boolean {
  const code = sqlState(err);
  return !!code && (code.startsWith('22') || code === '54001');
}

/** pg's messages for a session that is gone (no SQLSTATE: the socket closed). */
export function isConnectionError(err: unknown): boolean {
  const m = (err as Error)?.message ?? '';
  return /Connection terminated|ECONNRESET|ECONNREFUSED|Client has encountered a connection error|not queryable/.test(m);
}

/**
 * A server error that fails one batch only: the run goes on with the next one. A lost connection
 * (08), a server shutting down (57) or an error without a SQLSTATE ends the run.
 */
export function failsOnlyTheBatch(err: unknown): boolean {
  const code = sqlState(err);
  return !!code && !code.startsWith('08') && !code.startsWith('57');
}

/** The server refused a connection: too many for the role or the server (53300). */
export function isTooManyConnections(err: unknown): boolean {
  return sqlState(err) === '53300';
}

/** The SQLSTATE etl.begin_transform and etl.transform_batch raise for a batch whose loader is alive. */
export function isBatchStillLoading(err: unknown): boolean {
  return sqlState(err) === 'HE002';
}

/** A file system error as one line: "ENOENT: no such file or directory, open 'x'". */
export function fileErrorText(err: unknown): string {
  const e = err as NodeJS.ErrnoException;
  return e?.code ? `${e.code}: ${e.message.replace(/^[A-Z]+: /, '')}` : String((e as Error)?.message ?? err);
}

/** A document the server refused in COPY: its message only; detail and context can quote the document, which may be PHI. */
export function serverRefusedReason(err: unknown): string {
  const e = err as { message?: string; code?: string };
  return `$: PostgreSQL refused the document: ${e.message ?? 'error'}${e.code ? ` (SQLSTATE ${e.code})` : ''}`;
}

/** What etl.record_batch_failure keeps of a batch's error: its SQLSTATE and explainError's line (never a data error's server message). */
export function batchFailure(err: unknown): { sqlstate: string; message: string } {
  return { sqlstate: sqlState(err) ?? 'XX000', message: explainError(err).message };
}

/** One line: a server message may span several (a hint, a context). */
const oneLine = (text: string) => text.replace(/\s*\n\s*/g, ' ');

/** Turns a driver or server error into one line saying what to do, and an exit code. */
export function explainError(err: unknown, databaseUrl?: string): { message: string; exitCode: number } {
  if (err instanceof UserError) return { message: err.message, exitCode: err.exitCode };
  const server = serverErrorOf(err);
  const e = innermost(err);
  const where = databaseUrl ? describeTarget(databaseUrl) : 'the database';
  // A SQLSTATE only when the server said it; else Node's code (ECONNREFUSED, ENOENT: a socket or a file).
  const code = server?.code ?? e?.code ?? '';
  const unreachable = ['ECONNREFUSED', 'ENOTFOUND', 'EHOSTUNREACH', 'ETIMEDOUT', 'ECONNRESET', 'EAI_AGAIN'];
  // A Unix-socket directory that does not exist, or that we may not enter (PGHOST=/nonexistent).
  const noSocket = !server && e?.syscall === 'connect' && (code === 'ENOENT' || code === 'EACCES');
  if (
    !server &&
    (unreachable.includes(code) || noSocket || (/connect|Connection terminated|timeout expired/i.test(e?.message ?? '') && !code))
  ) {
    return {
      message: `cannot reach PostgreSQL at ${where} (${code || oneLine(e?.message ?? '')}${noSocket ? ': no server socket there' : ''}): start the server or set --database-url / DATABASE_URL`,
      exitCode: EXIT.DB_UNREACHABLE,
    };
  }
  // pg's own errors when the server asks for a password and none was given (SCRAM, then cleartext and md5).
  if (!server && /client password must be a|password must be a string|The "password" argument must be/i.test(e?.message ?? '')) {
    return {
      message: `PostgreSQL at ${where} asks for a password and none was given: set PGPASSWORD or put it in ~/.pgpass (never on the command line)`,
      exitCode: EXIT.DB_UNREACHABLE,
    };
  }
  if (code === '28P01' || code === '28000') {
    return {
      message: `PostgreSQL at ${where} refused the login (${code}): check the user and password in the connection settings`,
      exitCode: EXIT.DB_UNREACHABLE,
    };
  }
  if (code === '3D000') {
    return {
      message: `database ${where} does not exist: create it (createdb) or point --database-url at an existing one`,
      exitCode: EXIT.DB_UNREACHABLE,
    };
  }
  if (code === '57P01' || code === '57P02' || code === '57P03') {
    return {
      message: `PostgreSQL at ${where} shut down or restarted during the command (${code}): nothing half-done was committed; run the same command again`,
      exitCode: EXIT.DB_UNREACHABLE,
    };
  }
  // A table, schema, function or column missing: the schema is older than this code.
  if (code === '42P01' || code === '3F000' || code === '42883' || code === '42703') {
    return {
      message: `the healthetl schema is missing or out of date in ${where} (${code}): run "healthetl migrate up" first`,
      exitCode: EXIT.NOT_MIGRATED,
    };
  }
  if (code === '55P03') {
    return {
      message: `gave up waiting for a lock in ${where} (lock_timeout): another session holds it; retry later or raise HEALTHETL_LOCK_TIMEOUT_MS`,
      exitCode: EXIT.FAILURE,
    };
  }
  if (code === '57014') {
    return {
      message: `a statement ran longer than statement_timeout in ${where}: raise HEALTHETL_STATEMENT_TIMEOUT_MS (0 disables it)`,
      exitCode: EXIT.FAILURE,
    };
  }
  if (server && code.startsWith('22')) {
    // A data exception's message quotes the value (e.g. 'invalid input syntax for type date: "..."'),
    // which may be patient data: say what happened without it.
    return {
      message: `PostgreSQL could not convert a value in the data (SQLSTATE ${code}); nothing of what failed was committed. The value is not shown: it may be patient data. A document passed validation that should not have: please report it, with the batch id`,
      exitCode: EXIT.FAILURE,
    };
  }
  if (code === 'HE010') {
    // etl.erase_patient without a patient id or a source system (the CLI checks its options first).
    return {
      message:
        'erase needs a patient id and a source system: healthetl erase --patient-id ID [--source-system S] (the source system defaults to "default")',
      exitCode: EXIT.USAGE,
    };
  }
  if (server && code === '42501') {
    // The server's message names the object ("permission denied for function erase_patient"), never a value.
    return {
      message: `${oneLine(server.message)} (SQLSTATE 42501) in ${where}: this login lacks a privilege the command needs; erase, rotate-pseudonym-key and dq set run as the migrator's login (a member of healthetl_owner), load, run, transform, status, dq and privacy-report as a member of healthetl_loader`,
      exitCode: EXIT.FAILURE,
    };
  }
  if (server && code.startsWith('HE')) {
    return { message: oneLine(`${server.message}${server.hint ? `: ${server.hint}` : ''}`), exitCode: EXIT.FAILURE };
  }
  if (server) return { message: oneLine(`${server.message} (SQLSTATE ${code})`), exitCode: EXIT.FAILURE };
  // A library that put a stack into its message (node-pg-migrate does): the stack is --verbose's.
  const text = (e?.message ?? String(err))
    .split('\n')
    .filter((l) => !/^\s+at /.test(l))
    .join('\n');
  return { message: oneLine(`${text}${code ? ` (${code})` : ''}`), exitCode: EXIT.FAILURE };
}
