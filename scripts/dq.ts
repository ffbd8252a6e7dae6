// `healthetl dq`: the operator's side of the data-quality checks (migrations/0011). Runs them
// (dq.run: one batch's patients, or the whole database), reads the results with each check's trend
// over its last runs, and shows them as a terminal table, one JSON object, or one self-contained
// HTML page (inline CSS and SVG: nothing is loaded from anywhere). `healthetl dq set` tunes a check
// (one UPDATE of dq.checks; its trigger records who, when, old and new value). Everything here is
// counts, ratios and check names: the failing rows stay in dq.result_samples, by surrogate key.
import { z } from 'zod';
import type { DatabasePool } from 'slonik';
import { sql } from './db.ts';

/** How many of a check's runs its trend shows. */
export const TREND_RUNS = 20;

const Status = z.enum(['pass', 'warn', 'fail']);
export type DqStatus = z.infer<typeof Status>;
const Measure = z.enum(['failing_ratio', 'hours', 'ratio_to_median']);
export type DqMeasure = z.infer<typeof Measure>;
/** slonik gives timestamptz as milliseconds since the epoch. */
const Time = z.coerce.number().transform((ms) => new Date(ms).toISOString());

const CheckRow = z.object({
  check_name: z.string(),
  dimension: z.string(),
  relation: z.string(),
  description: z.string(),
  measure: Measure,
  threshold_meaning: z.string(),
  enabled: z.boolean(),
  // As the result was judged (the check's settings at its run); the check's current ones when it has no result.
  severity: z.enum(['warn', 'error']),
  threshold: z.coerce.number(),
  // null: the check has no result in what is shown (disabled, or added after the run)
  rows_checked: z.coerce.number().nullable(),
  rows_failing: z.coerce.number().nullable(),
  failing_ratio: z.coerce.number().nullable(), // null also when nothing was checked
  measured: z.coerce.number().nullable(), // what the threshold is compared with, in the measure's unit
  status: Status.nullable(),
  run_id: z.coerce.number().nullable(),
  batch_id: z.coerce.number().nullable(), // the run's batch; null: the whole database (or no result)
  checked_at: Time.nullable(),
  failing_since: Time.nullable(), // the first run of its current streak of warn/fail; null when it passes
});

const TrendRow = z.object({
  check_name: z.string(),
  run_id: z.coerce.number(),
  batch_id: z.coerce.number().nullable(),
  checked_at: Time,
  status: Status,
  rows_checked: z.coerce.number(),
  rows_failing: z.coerce.number(),
  failing_ratio: z.coerce.number().nullable(),
  measured: z.coerce.number().nullable(),
  threshold: z.coerce.number(),
});
export type DqTrendPoint = Omit<z.infer<typeof TrendRow>, 'check_name'>;
export type DqCheck = z.infer<typeof CheckRow> & { trend: DqTrendPoint[] };

export type DqScope = { kind: 'all' } | { kind: 'batch'; batchId: number } | { kind: 'latest' };

export type DqReport = {
  /** The run shown; with scope latest, the newest run any check's result comes from (null: no run yet). */
  run_id: number | null;
  scope: 'all' | 'batch' | 'latest';
  /** The batch whose patients were checked (scope batch). */
  batch_id: number | null;
  /** When the last batch was transformed: how fresh the data checked is. */
  data_as_of: string | null;
  /** When the run shown started (scope latest: the newest result's). */
  checked_at: string | null;
  summary: { checks: number; pass: number; warn: number; fail: number; not_run: number };
  /** Every check of dq.checks, failing ones first (fail, warn, pass, not run), then by dimension and name. */
  checks: DqCheck[];
};

/** The batch `healthetl dq` checks by default: the latest transformed one; null when none is. */
export async function latestTransformedBatch(pool: DatabasePool): Promise<number | null> {
  return pool.oneFirst(sql.type(z.object({ batch_id: z.coerce.number().nullable() }))`
    SELECT max(batch_id) AS batch_id FROM etl.batches WHERE status = 'transformed'`);
}

/** Runs every enabled check (dq.run) on one batch's patients, or the whole database (null); the run's id. */
export async function runChecks(pool: DatabasePool, batchId: number | null): Promise<number> {
  return pool.oneFirst(sql.type(z.object({ run_id: z.coerce.number() }))`SELECT dq.run(${batchId}::bigint) AS run_id`);
}

const Summary = z.object({
  run_id: z.coerce.number(),
  batch_id: z.coerce.number().nullable(),
  pass: z.coerce.number(),
  warn: z.coerce.number(),
  fail: z.coerce.number(),
  warned: z.array(z.string()),
  failed: z.array(z.string()),
});
/** One run in a line's worth: how many checks passed, warned, failed, and which. */
export type DqSummary = z.infer<typeof Summary>;

/** The counts of one run's results, with the names of the checks that warned or failed. */
export async function summaryOf(pool: DatabasePool, runId: number): Promise<DqSummary> {
  return pool.one(sql.type(Summary)`
    SELECT u.run_id, u.batch_id,
           count(r.check_name) FILTER (WHERE r.status = 'pass') AS pass,
           count(r.check_name) FILTER (WHERE r.status = 'warn') AS warn,
           count(r.check_name) FILTER (WHERE r.status = 'fail') AS fail,
           coalesce(array_agg(r.check_name ORDER BY r.check_name) FILTER (WHERE r.status = 'warn'), '{}') AS warned,
           coalesce(array_agg(r.check_name ORDER BY r.check_name) FILTER (WHERE r.status = 'fail'), '{}') AS failed
    FROM dq.runs u LEFT JOIN dq.results r USING (run_id)
    WHERE u.run_id = ${runId}
    GROUP BY u.run_id, u.batch_id`);
}

/** dq.run on a batch's patients, and the summary of that run: what `run` and `transform` do after each batch. */
export async function checkBatch(pool: DatabasePool, batchId: number): Promise<DqSummary> {
  return summaryOf(pool, await runChecks(pool, batchId));
}

const STATUS_ORDER: Record<string, number> = { fail: 0, warn: 1, pass: 2 };
const DIMENSION_ORDER = ['completeness', 'validity', 'uniqueness', 'consistency', 'timeliness', 'volume'];
const rank = (c: DqCheck) => STATUS_ORDER[c.status ?? ''] ?? 3;

/**
 * Every check with its result in one run (runId), or its latest result (null: what dq.latest_results
 * shows, except that a disabled check shows none: its last result is stale, and a check disabled
 * while it failed would fail `dq --latest` for ever), and its trend: its last TREND_RUNS results up
 * to that one, oldest first. failing_since is worked out as dq.latest_results does (the first run of
 * the current streak of warn/fail, runs of any scope), up to the result shown.
 */
export async function readReport(pool: DatabasePool, runId: number | null, scope: DqReport['scope']): Promise<DqReport> {
  const which =
    runId === null
      ? sql.fragment`c.enabled AND res.run_id = (SELECT max(x.run_id) FROM dq.results x WHERE x.check_name = c.check_name)`
      : sql.fragment`res.run_id = ${runId}`;
  const rows = await pool.any(sql.type(CheckRow)`
    SELECT c.check_name, c.dimension, c.relation, c.description, k.measure, k.threshold_meaning, c.enabled,
           coalesce(res.severity, c.severity) AS severity, coalesce(res.threshold, c.threshold) AS threshold,
           res.rows_checked, res.rows_failing, res.failing_ratio, res.measured, res.status,
           res.run_id, run.batch_id, run.started_at AS checked_at,
           CASE WHEN res.status <> 'pass' THEN
             (SELECT min(fu.started_at) FROM dq.results f JOIN dq.runs fu USING (run_id)
              WHERE f.check_name = c.check_name AND f.status <> 'pass' AND f.run_id <= res.run_id
                AND f.run_id > coalesce((SELECT max(p.run_id) FROM dq.results p
                                         WHERE p.check_name = c.check_name AND p.status = 'pass' AND p.run_id < res.run_id), 0)) END
             AS failing_since
    FROM dq.checks c
    JOIN dq.check_kinds k USING (kind)
    LEFT JOIN dq.results res ON res.check_name = c.check_name AND ${which}
    LEFT JOIN dq.runs run ON run.run_id = res.run_id`);
  const trends = await pool.any(sql.type(TrendRow)`
    SELECT c.check_name, t.run_id, t.batch_id, t.checked_at, t.status, t.rows_checked, t.rows_failing, t.failing_ratio, t.measured, t.threshold
    FROM dq.checks c
    CROSS JOIN LATERAL (
      SELECT res.run_id, run.batch_id, run.started_at AS checked_at, res.status, res.rows_checked, res.rows_failing,
             res.failing_ratio, res.measured, res.threshold
      FROM dq.results res JOIN dq.runs run USING (run_id)
      WHERE res.check_name = c.check_name AND (${runId}::bigint IS NULL OR res.run_id <= ${runId}::bigint)
      ORDER BY res.run_id DESC
      LIMIT ${TREND_RUNS}) t
    ORDER BY c.check_name, t.run_id`);
  const byCheck = new Map<string, DqTrendPoint[]>();
  for (const { check_name, ...point } of trends) {
    if (!byCheck.has(check_name)) byCheck.set(check_name, []);
    byCheck.get(check_name)!.push(point);
  }
  const checks: DqCheck[] = rows.map((r) => ({ ...r, trend: byCheck.get(r.check_name) ?? [] }));
  checks.sort(
    (a, b) =>
      rank(a) - rank(b) ||
      DIMENSION_ORDER.indexOf(a.dimension) - DIMENSION_ORDER.indexOf(b.dimension) ||
      a.check_name.localeCompare(b.check_name),
  );
  const run = await pool.maybeOne(sql.type(
    z.object({ run_id: z.coerce.number(), batch_id: z.coerce.number().nullable(), started_at: Time }),
  )`
    SELECT run_id, batch_id, started_at FROM dq.runs
    WHERE run_id = coalesce(${runId}::bigint, (SELECT max(r.run_id) FROM dq.results r JOIN dq.checks c USING (check_name) WHERE c.enabled))`);
  const dataAsOf = await pool.oneFirst(sql.type(z.object({ at: Time.nullable() }))`
    SELECT max(transformed_at) AS at FROM etl.batches WHERE status = 'transformed'`);
  const count = (s: DqStatus | null) => checks.filter((c) => c.status === s).length;
  return {
    run_id: run?.run_id ?? null,
    scope,
    batch_id: scope === 'latest' ? null : (run?.batch_id ?? null),
    data_as_of: dataAsOf,
    checked_at: run?.started_at ?? null,
    summary: { checks: checks.length, pass: count('pass'), warn: count('warn'), fail: count('fail'), not_run: count(null) },
    checks,
  };
}

/** Whether an error-severity check failed in what the report shows: `dq`, `run` and `transform` then exit 8. */
export function hasFailures(report: { checks: { status: DqStatus | null }[] }): boolean {
  return report.checks.some((c) => c.status === 'fail');
}

// ---- tuning -------------------------------------------------------------------------------------

export type CheckSettings = { severity?: 'warn' | 'error'; threshold?: number; enabled?: boolean };
export type CheckChange = { setting: 'severity' | 'threshold' | 'enabled'; old_value: string; new_value: string };

const Settings = z.object({
  severity: z.string(),
  threshold: z.string(), // numeric as text: 0.01 stays 0.01
  enabled: z.boolean(),
});

/** The names of the checks (for the message about an unknown one). */
export async function checkNames(pool: DatabasePool): Promise<string[]> {
  return [...(await pool.anyFirst(sql.type(z.object({ check_name: z.string() }))`SELECT check_name FROM dq.checks ORDER BY check_name`))];
}

/** A check's measure (how its threshold reads); null when there is no such check. */
export async function measureOf(pool: DatabasePool, checkName: string): Promise<DqMeasure | null> {
  return pool.maybeOneFirst(sql.type(z.object({ measure: Measure }))`
    SELECT k.measure FROM dq.checks c JOIN dq.check_kinds k USING (kind) WHERE c.check_name = ${checkName}`);
}

/**
 * Sets a check's severity, threshold and/or enabled in one UPDATE of dq.checks (its trigger records
 * each change in dq.check_changes with session_user and the time): what changed, old and new; null
 * when there is no such check. Takes the owner's privilege (healthetl_owner): the loader gets 42501.
 */
export async function setCheck(pool: DatabasePool, checkName: string, s: CheckSettings): Promise<CheckChange[] | null> {
  const row = await pool.maybeOne(sql.type(z.object({ was: Settings, now: Settings }))`
    UPDATE dq.checks c
    SET severity = coalesce(${s.severity ?? null}::text, c.severity),
        threshold = coalesce(${s.threshold === undefined ? null : String(s.threshold)}::numeric, c.threshold),
        enabled = coalesce(${s.enabled ?? null}::boolean, c.enabled)
    FROM (SELECT p.check_name, p.severity, p.threshold, p.enabled FROM dq.checks p WHERE p.check_name = ${checkName} FOR UPDATE) prev
    WHERE c.check_name = prev.check_name
    RETURNING json_build_object('severity', prev.severity, 'threshold', prev.threshold::text, 'enabled', prev.enabled) AS was,
              json_build_object('severity', c.severity, 'threshold', c.threshold::text, 'enabled', c.enabled) AS now`);
  if (!row) return null;
  const changes: CheckChange[] = [];
  for (const setting of ['severity', 'threshold', 'enabled'] as const) {
    const [before, after] = [String(row.was[setting]), String(row.now[setting])];
    if (before !== after) changes.push({ setting, old_value: before, new_value: after });
  }
  return changes;
}

// ---- presentation -------------------------------------------------------------------------------

/** A share as a percentage: 0.076923 -> "7.69 %"; above 0 but under 0.005 % -> "<0.01 %". */
function percent(ratio: number): string {
  if (ratio > 0 && ratio < 0.0001) return '<0.01 %';
  return `${Number((ratio * 100).toFixed(2))} %`;
}

const plain = (n: number) => String(Number(n.toFixed(3)));

/** What the check measured, in its unit; "-" when it measured nothing (no rows, or too few batches for a median). */
export function formatMeasured(c: { measure: DqMeasure; failing_ratio: number | null; measured: number | null }): string {
  if (c.measure === 'failing_ratio') return c.failing_ratio === null ? '-' : percent(c.failing_ratio);
  if (c.measured === null) return '-';
  return c.measure === 'hours' ? `${plain(c.measured)} h` : `${plain(c.measured)} x median`;
}

/** The threshold in the check's unit, as what is allowed. */
export function formatThreshold(c: { measure: DqMeasure; threshold: number }): string {
  if (c.measure === 'failing_ratio') return `<= ${percent(c.threshold)}`;
  if (c.measure === 'hours') return `<= ${plain(c.threshold)} h`;
  return `${plain(Math.max(0, 1 - c.threshold))} to ${plain(1 + c.threshold)} x median`;
}

/** A timestamp as "YYYY-MM-DD HH:MM UTC" (the same on every machine). */
export function formatTime(iso: string | null): string {
  return iso === null ? '-' : `${iso.slice(0, 10)} ${iso.slice(11, 16)} UTC`;
}

const STATUS_LABEL: Record<string, string> = { fail: 'FAIL', warn: 'WARN', pass: 'pass' };
const statusLabel = (c: DqCheck) => (c.status ? STATUS_LABEL[c.status] : c.enabled ? 'not run' : 'disabled');

function scopeText(r: DqReport): string {
  if (r.run_id === null) return 'no checks have run yet';
  if (r.scope === 'latest') return `latest results (newest: run ${r.run_id}, ${formatTime(r.checked_at)})`;
  return `run ${r.run_id} of ${r.scope === 'batch' ? `batch ${r.batch_id}'s patients` : 'the whole database'}, ${formatTime(r.checked_at)}`;
}

function summaryText(r: DqReport): string {
  const s = r.summary;
  return `${s.checks} checks: ${s.fail} failed (error), ${s.warn} warned, ${s.pass} passed${s.not_run ? `, ${s.not_run} not run` : ''}`;
}

/** The report as a plain-text table for a terminal: one line per check, failing ones first. */
export function formatTable(r: DqReport): string {
  const head = ['STATUS', 'CHECK', 'DIMENSION', 'SEVERITY', 'FAILING/CHECKED', 'MEASURED', 'ALLOWED', 'FAILING SINCE'];
  const rows = r.checks.map((c) => [
    statusLabel(c),
    c.check_name,
    c.dimension,
    c.severity,
    c.rows_checked === null ? '-' : `${c.rows_failing}/${c.rows_checked}`,
    c.status ? formatMeasured(c) : '-',
    formatThreshold(c),
    c.failing_since ? formatTime(c.failing_since) : '-',
  ]);
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((row) => row[i].length)));
  const line = (cells: string[]) =>
    cells
      .map((cell, i) => (i === cells.length - 1 ? cell : cell.padEnd(widths[i])))
      .join('  ')
      .trimEnd();
  return [
    `Data quality: ${scopeText(r)}; data as of ${formatTime(r.data_as_of)}`,
    summaryText(r),
    '',
    line(head),
    ...rows.map(line),
    '',
    'Failing rows, by surrogate key: SELECT * FROM dq.result_samples WHERE run_id = ... AND check_name = ...',
  ].join('\n');
}

// ---- HTML ---------------------------------------------------------------------------------------

const HTML_ESCAPES: Record<string, string> = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };
/** Text for HTML content or a quoted attribute: every value the page shows goes through this. */
export function escapeHtml(value: unknown): string {
  return String(value).replace(/[&<>"']/g, (ch) => HTML_ESCAPES[ch]);
}

const COLOURS: Record<DqStatus, string> = { pass: '#2e7d32', warn: '#b26a00', fail: '#c62828' };

/** The value a trend point is drawn at: the failing ratio, or what the check measured (hours, ratio to the median). */
function trendValue(measure: DqMeasure, p: { failing_ratio: number | null; measured: number | null }): number | null {
  return measure === 'failing_ratio' ? p.failing_ratio : p.measured;
}

/**
 * A check's trend as a small inline SVG bar chart: one bar per run (oldest left), its height the
 * measure, its colour the status, a tooltip (title) with the run; the threshold as a dashed line
 * (a band for a ratio to the median). A run that measured nothing is a grey tick.
 */
export function trendSvg(c: DqCheck): string {
  const points = c.trend;
  if (points.length === 0) return '<span class="none">no runs yet</span>';
  const W = 168;
  const H = 40;
  const top = 3;
  const base = H - 3;
  const values = points.map((p) => trendValue(c.measure, p));
  const threshold = points[points.length - 1].threshold;
  const limit = c.measure === 'ratio_to_median' ? 1 + threshold : threshold;
  const max = Math.max(...values.map((v) => v ?? 0), limit, c.measure === 'failing_ratio' ? 0.01 : 1e-9);
  const y = (v: number) => base - (v / max) * (base - top);
  const slot = W / TREND_RUNS;
  const barW = Math.max(2, slot - 2);
  const x0 = W - slot * points.length; // the newest run at the right edge
  const parts: string[] = [];
  if (c.measure === 'ratio_to_median') {
    const low = Math.max(0, 1 - threshold);
    parts.push(
      `<rect class="band" x="0" y="${y(limit).toFixed(1)}" width="${W}" height="${(y(low) - y(limit)).toFixed(1)}" fill="#e8f0e8"><title>allowed: ${escapeHtml(formatThreshold(c))}</title></rect>`,
    );
  }
  parts.push(`<line class="axis" x1="0" y1="${base}" x2="${W}" y2="${base}" stroke="#9e9e9e" stroke-width="1"/>`);
  points.forEach((p, i) => {
    const v = values[i];
    const x = (x0 + i * slot + 1).toFixed(1);
    const tip = escapeHtml(
      `run ${p.run_id} (${p.batch_id === null ? 'whole database' : `batch ${p.batch_id}`}), ${formatTime(p.checked_at)}: ${p.status}, ` +
        `${p.rows_failing} of ${p.rows_checked} failing, measured ${formatMeasured({ measure: c.measure, ...p })}`,
    );
    if (v === null) {
      parts.push(
        `<rect class="bar none" x="${x}" y="${base - 2}" width="${barW.toFixed(1)}" height="2" fill="#bdbdbd"><title>${tip}</title></rect>`,
      );
    } else {
      const h = Math.max(1.5, base - y(v));
      parts.push(
        `<rect class="bar ${p.status}" x="${x}" y="${(base - h).toFixed(1)}" width="${barW.toFixed(1)}" height="${h.toFixed(1)}" fill="${COLOURS[p.status]}"><title>${tip}</title></rect>`,
      );
    }
  });
  if (c.measure !== 'ratio_to_median') {
    const ty = Math.min(y(threshold), base - 0.5).toFixed(1);
    parts.push(
      `<line class="threshold" x1="0" y1="${ty}" x2="${W}" y2="${ty}" stroke="#424242" stroke-width="1" stroke-dasharray="3 2"><title>threshold: ${escapeHtml(formatThreshold(c))}</title></line>`,
    );
  }
  const label = `${c.check_name}: ${formatMeasured(c.measure === 'failing_ratio' ? { ...c, failing_ratio: values[values.length - 1] } : { ...c, measured: values[values.length - 1] })} in the latest of ${points.length} run${points.length === 1 ? '' : 's'}; allowed ${formatThreshold(c)}`;
  return `<svg class="trend" xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" role="img" aria-label="${escapeHtml(label)}">${parts.join('')}</svg>`;
}

const CSS = `
:root { color-scheme: light; }
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px; color: #212121; background: #fff; }
h1 { font-size: 20px; margin: 0 0 4px; }
header p { margin: 2px 0; color: #424242; }
.asof { font-size: 16px; color: #212121; }
.totals span { display: inline-block; margin-right: 12px; }
table { border-collapse: collapse; margin-top: 16px; width: 100%; }
th, td { text-align: left; vertical-align: top; padding: 6px 8px; border-bottom: 1px solid #e0e0e0; }
th { font-size: 12px; text-transform: uppercase; letter-spacing: .03em; color: #616161; }
td.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
.badge { display: inline-block; min-width: 44px; text-align: center; padding: 1px 6px; border-radius: 3px; font-weight: 600; font-size: 12px; color: #fff; }
.badge.fail { background: #c62828; } .badge.warn { background: #b26a00; } .badge.pass { background: #2e7d32; } .badge.none { background: #9e9e9e; }
tr.fail td { background: #fdecea; } tr.warn td { background: #fff4e0; }
.name { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-weight: 600; }
.desc, .meaning, .meta { color: #616161; font-size: 12px; }
.none { color: #9e9e9e; }
footer { margin-top: 16px; color: #616161; font-size: 12px; }
`;

/**
 * The report as one self-contained HTML page: inline CSS and SVG, no script, and a Content Security
 * Policy that lets it load nothing (a browser opening it makes no request). Every value is escaped.
 */
export function renderHtml(r: DqReport): string {
  const s = r.summary;
  const title = `Data quality: ${s.fail} failing, ${s.warn} warning of ${s.checks} checks - healthetl`;
  const rows = r.checks.map((c) => {
    const cls = c.status ?? 'none';
    const failing =
      c.rows_checked === null
        ? '<span class="none">-</span>'
        : `<span class="failing">${escapeHtml(c.rows_failing)} of ${escapeHtml(c.rows_checked)}</span>` +
          (c.failing_ratio === null ? '' : ` <span class="ratio">(${escapeHtml(percent(c.failing_ratio))})</span>`);
    return (
      `<tr class="${cls}" data-check="${escapeHtml(c.check_name)}" data-status="${escapeHtml(c.status ?? 'none')}">` +
      `<td><span class="badge ${cls}">${escapeHtml(statusLabel(c))}</span></td>` +
      `<td><div class="name">${escapeHtml(c.check_name)}</div><div class="desc">${escapeHtml(c.description)}</div>` +
      `<div class="meta">${escapeHtml(c.dimension)} &middot; ${escapeHtml(c.severity)} severity &middot; ${escapeHtml(c.relation)}${c.enabled ? '' : ' &middot; disabled'}</div></td>` +
      `<td class="num">${failing}</td>` +
      `<td class="num measured">${c.status ? escapeHtml(formatMeasured(c)) : '-'}</td>` +
      `<td><div class="num threshold">${escapeHtml(formatThreshold(c))}</div><div class="meaning">${escapeHtml(c.threshold_meaning)}</div></td>` +
      `<td class="num since">${c.failing_since ? `<time datetime="${escapeHtml(c.failing_since)}">${escapeHtml(formatTime(c.failing_since))}</time>` : '-'}</td>` +
      `<td>${trendSvg(c)}</td></tr>`
    );
  });
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>${escapeHtml(title)}</title>
<style>${CSS}</style>
</head>
<body>
<header>
<h1>Data quality</h1>
<p class="asof">data as of ${r.data_as_of ? `<time datetime="${escapeHtml(r.data_as_of)}">${escapeHtml(formatTime(r.data_as_of))}</time>` : 'no batch transformed yet'}</p>
<p class="scope">${escapeHtml(scopeText(r))}</p>
<p class="totals"><span>${escapeHtml(s.checks)} checks</span><span class="fail">${escapeHtml(s.fail)} failed (error severity)</span><span class="warn">${escapeHtml(s.warn)} warned</span><span class="pass">${escapeHtml(s.pass)} passed</span>${s.not_run ? `<span class="none">${escapeHtml(s.not_run)} not run</span>` : ''}</p>
</header>
<main>
<table>
<thead><tr><th>Status</th><th>Check</th><th>Failing rows</th><th>Measured</th><th>Threshold</th><th>Failing since</th><th>Trend (last ${TREND_RUNS} runs)</th></tr></thead>
<tbody>
${rows.join('\n')}
</tbody>
</table>
</main>
<footer>Counts and ratios only. The failing rows are in dq.result_samples by surrogate key (patient_key, visit_key, ..., batch_id), never by value. Bars: one per run, oldest left; dashed line: the threshold.</footer>
</body>
</html>
`;
}
