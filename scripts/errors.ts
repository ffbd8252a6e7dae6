// Errors: exit codes, the SQLSTATE dug out of wrapped errors (slonik wraps pg's in its own),
// what each class means for the run, and one line saying what to do. Every SQLSTATE and
// driver-message pattern lives here.
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
} as const;

export class UserError extends Error {
  constructor(
    message: string,
    readonly exitCode: number,
  ) {
    super(message);
  }
}

type PgLikeError = Error & { code?: string; hint?: string; cause?: unknown; errno?: number };

/** The first error down the `cause` chain that carries a code (pg's own), else the last one. */
function innermost(err: unknown): PgLikeError {
  let e = err as PgLikeError;
  for (let i = 0; i < 5 && e && typeof e === 'object' && e.cause && !e.code; i++) e = e.cause as PgLikeError;
  return e;
}

/** The error's code, from pg's error under slonik's wrappers (a SQLSTATE, or a Node code such as ECONNREFUSED). */
function sqlState(err: unknown): string | undefined {
  return innermost(err)?.code || undefined;
}

// Five characters, digits and capitals: a SQLSTATE (a few errno names, EPIPE or EBUSY, match too).
const SQLSTATE = /^[0-9A-Z]{5}$/;

/** The server answered with an error (pg's error itself carries the SQLSTATE, unwrapped). */
export function isServerError(err: unknown): boolean {
  const code = (err as { code?: unknown } | undefined)?.code;
  return typeof code === 'string' && SQLSTATE.test(code);
}

/** Class 22 (data exception) or 54001 (too deep): a bad document; anything else (connection, lock) is not ours to swallow. */
export function isDataError(err: unknown): boolean {
  const code = (err as { code?: string }).code;
  return typeof code === 'string' && (code.startsWith('22') || code === '54001');
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
  return !!code && SQLSTATE.test(code) && !code.startsWith('08') && !code.startsWith('57');
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

/** Turns a driver or server error into one line saying what to do, and an exit code. */
export function explainError(err: unknown, databaseUrl?: string): { message: string; exitCode: number } {
  if (err instanceof UserError) return { message: err.message, exitCode: err.exitCode };
  const e = innermost(err);
  const where = databaseUrl ? describeTarget(databaseUrl) : 'the database';
  const code = e?.code ?? '';
  const unreachable = ['ECONNREFUSED', 'ENOTFOUND', 'EHOSTUNREACH', 'ETIMEDOUT', 'ECONNRESET', 'EAI_AGAIN'];
  if (unreachable.includes(code) || (/connect|Connection terminated|timeout expired/i.test(e?.message ?? '') && !code)) {
    return {
      message: `cannot reach PostgreSQL at ${where} (${code || e?.message}): start the server or set --database-url / DATABASE_URL`,
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
  if (code === '42P01' || code === '3F000' || code === '42883') {
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
  if (code.startsWith('22')) {
    // A data exception's message quotes the value (e.g. 'invalid input syntax for type date: "..."'),
    // which may be patient data: say what happened without it.
    return {
      message: `PostgreSQL could not convert a value in the data (SQLSTATE ${code}); nothing of what failed was committed. The value is not shown: it may be patient data. A document passed validation that should not have: please report it, with the batch id`,
      exitCode: EXIT.FAILURE,
    };
  }
  if (code.startsWith('HE')) {
    return { message: `${e.message}${e.hint ? `: ${e.hint}` : ''}`, exitCode: EXIT.FAILURE };
  }
  return { message: `${e?.message ?? String(err)}${code ? ` (SQLSTATE ${code})` : ''}`, exitCode: EXIT.FAILURE };
}
