// The HTML data-quality report (healthetl dq --format html) opened in a real headless browser with
// the network blocked: Debian's chromium driven by playwright-core (which drives an installed
// browser and downloads none). The report comes from a database where some checks fail, after a
// few runs so that the trends have bars; a check description planted with markup shows that every
// value is escaped. Skipped, saying why, where no chromium binary exists (CHROMIUM_PATH, else
// /usr/bin/chromium); .ci/run installs it, so CI never skips it.
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { chromium, type Browser } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { EXIT } from '../scripts/errors.ts';
import { useLogin, useTestDatabase } from './db.ts';
import { runCli } from './fault-helpers.ts';

const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const HAVE_CHROMIUM = existsSync(CHROMIUM);
if (!HAVE_CHROMIUM)
  process.stderr.write(
    `[healthetl tests] dq-html: SKIPPED: no chromium at ${CHROMIUM} (apt-get install chromium, or set CHROMIUM_PATH to a Chromium binary)\n`,
  );

const at = (url: string, ...args: string[]) => [...args, '--database-url', url];
const year = new Date().getUTCFullYear();
const PLANTED = `<script>window.pwned = 1</script><img src="https://example.invalid/x.png" onerror="window.pwned = 2">"quoted" & 'single'`;

function patient(id: string, birth: string, sex: string | undefined) {
  return {
    patient_id: id,
    source_system: 'dq-html-test',
    updated_at: '2024-06-01T00:00:00Z',
    name: { given: 'Html', family: `Report${id.replace(/[^0-9]/g, '')}` },
    birth_date: birth,
    ...(sex ? { sex } : {}),
    visits: [{ visit_id: `${id}-V`, visit_date: '2024-02-02', visit_type: 'outpatient', diagnoses: [{ code: 'I10' }] }],
  };
}

describe.skipIf(!HAVE_CHROMIUM)('the HTML report in a headless browser, network blocked', () => {
  const d = useTestDatabase();
  const loader = useLogin(d, 'healthetl_loader');
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'healthetl-dq-html-'));
  const report = path.join(tmp, 'dq report.html');
  let browser: Browser;

  beforeAll(async () => {
    // Batch 1: two patients, one without a sex (warn). Batch 2: one born next year (error: fail), whose
    // visit is then before the birth (error: fail) and whose age is below 0 (warn).
    writeFileSync(
      path.join(tmp, 'b1.ndjson'),
      [patient('H-1', '1970-01-01', 'female'), patient('H-2', '1980-01-01', undefined)].map((p) => JSON.stringify(p)).join('\n'),
    );
    writeFileSync(path.join(tmp, 'b2.ndjson'), JSON.stringify(patient('H-3', `${year + 1}-03-01`, 'male')));
    expect((await runCli(at(loader(), 'run', path.join(tmp, 'b1.ndjson')))).code).toBe(EXIT.OK);
    expect((await runCli(at(loader(), 'run', path.join(tmp, 'b2.ndjson')))).code).toBe(EXIT.DQ_FAILED);
    // Markup in a description (as the superuser: a check's text is data like any other).
    await d.query(`UPDATE dq.checks SET description = $1 WHERE check_name = 'patients_sex_present'`, [PLANTED]);
    // Two nightly runs more: four runs in every trend.
    expect((await runCli(at(loader(), 'dq', '--all'))).code).toBe(EXIT.DQ_FAILED);
    const r = await runCli(at(loader(), 'dq', '--all', '--format', 'html', '--output', report));
    expect(r.code, r.stderr).toBe(EXIT.DQ_FAILED);
    expect(r.stdout).toBe('');
    browser = await chromium.launch({ executablePath: CHROMIUM, headless: true });
  });
  afterAll(async () => {
    await browser?.close();
    rmSync(tmp, { recursive: true, force: true });
  });

  test('one self-contained file: no script, no external reference', () => {
    const html = readFileSync(report, 'utf8');
    expect(html).toMatch(/^<!doctype html>/);
    const tags = html.match(/<[a-zA-Z][^>]*>/g) ?? [];
    expect(tags.length).toBeGreaterThan(100);
    const names = new Set(tags.map((t) => t.slice(1).split(/[\s>]/)[0].toLowerCase()));
    for (const n of ['script', 'link', 'img', 'iframe', 'object', 'embed', 'image', 'use', 'foreignobject']) expect(names).not.toContain(n);
    for (const t of tags) expect(t).not.toMatch(/\s(?:src|href|xlink:href|on[a-z]+)=/i);
    expect(html).not.toMatch(/@import|url\(/i);
    expect(html).toContain('&lt;script&gt;window.pwned = 1&lt;/script&gt;');
  });

  test('renders with nothing but the file requested: every check, failing ones with status and counts, trends drawn', async () => {
    const page = await browser.newPage();
    const requested: string[] = [];
    const problems: string[] = [];
    page.on('request', (req) => requested.push(req.url()));
    page.on('console', (m) => m.type() === 'error' && problems.push(m.text()));
    page.on('pageerror', (e) => problems.push(e.message));
    await page.route('**/*', (r) => (r.request().url().startsWith('file:') ? r.continue() : r.abort()));
    const url = pathToFileURL(report).href;
    await page.goto(url);

    expect(requested).toEqual([url]);
    expect(problems).toEqual([]);
    expect(await page.title()).toBe('Data quality: 2 failing, 2 warning of 24 checks - healthetl');

    // "data as of" the last transformed batch.
    const [{ at: dataAsOf }] = await d.query(`SELECT max(transformed_at) AS at FROM etl.batches WHERE status = 'transformed'`);
    const iso = (dataAsOf as Date).toISOString();
    await expect(page.locator('header .asof').textContent()).resolves.toBe(`data as of ${iso.slice(0, 10)} ${iso.slice(11, 16)} UTC`);

    // Every check of dq.checks, once, by name as a person sees it.
    const names = (await d.query(`SELECT check_name FROM dq.checks ORDER BY 1`)).map((r) => r.check_name);
    expect(names).toHaveLength(24);
    expect((await page.locator('tbody tr .name').allInnerTexts()).sort()).toEqual(names);
    // Failing first.
    const order = { fail: 0, warn: 1, pass: 2, none: 3 } as Record<string, number>;
    const statuses = await page.locator('tbody tr').evaluateAll((rows) => rows.map((r) => r.getAttribute('data-status') ?? ''));
    expect(statuses.map((s) => order[s])).toEqual([...statuses.map((s) => order[s])].sort());
    expect(statuses.filter((s) => s === 'fail')).toHaveLength(2);

    // Each failing check: its status, failing rows and ratio as the database has them, since when, what its threshold means.
    const latest = await d.query(`SELECT * FROM dq.latest_results WHERE status <> 'pass' ORDER BY check_name`);
    expect(latest.map((l) => `${l.status} ${l.check_name}`)).toEqual([
      'warn patients_age_0_to_120',
      'fail patients_birth_date_not_future',
      'warn patients_sex_present',
      'fail visits_not_before_birth',
    ]);
    for (const l of latest) {
      const row = page.locator(`tr[data-check="${l.check_name}"]`);
      await expect(row.locator('.badge').innerText()).resolves.toBe(l.status.toUpperCase());
      await expect(row.locator('.failing').innerText()).resolves.toBe(`${l.rows_failing} of ${l.rows_checked}`);
      await expect(row.locator('.ratio').innerText()).resolves.toBe(`(${Number((Number(l.failing_ratio) * 100).toFixed(2))} %)`);
      const since = (l.failing_since as Date).toISOString();
      await expect(row.locator('.since time').getAttribute('datetime')).resolves.toBe(since);
      await expect(row.locator('.meaning').innerText()).resolves.toBe(l.threshold_meaning);
      expect(await row.locator('.badge').evaluate((e) => getComputedStyle(e).backgroundColor)).toBe(
        l.status === 'fail' ? 'rgb(198, 40, 40)' : 'rgb(178, 106, 0)',
      );
    }
    // 1 of 3 patients born next year; 1 of 3 without a sex.
    await expect(page.locator('tr[data-check="patients_birth_date_not_future"] .failing').innerText()).resolves.toBe('1 of 3');
    await expect(page.locator('tr[data-check="patients_sex_present"] .ratio').innerText()).resolves.toBe('(33.33 %)');

    // The trends: one chart per check, one bar per run (4 runs: 2 batches, 2 whole-database), each drawn with an area.
    const charts = page.locator('svg.trend');
    expect(await charts.count()).toBe(24);
    for (const box of await charts.evaluateAll((els) => els.map((e) => e.getBoundingClientRect().toJSON())))
      expect(box.width * box.height).toBeGreaterThan(0);
    const bars = await page
      .locator('svg.trend rect.bar')
      .evaluateAll((els) =>
        els.map((e) => ({ w: e.getBoundingClientRect().width, h: e.getBoundingClientRect().height, c: e.getAttribute('class') })),
      );
    expect(bars).toHaveLength(24 * 4);
    for (const b of bars) expect(b.w * b.h).toBeGreaterThan(0);
    const failBars = page.locator('tr[data-check="patients_birth_date_not_future"] svg rect.bar');
    expect(await failBars.evaluateAll((els) => els.map((e) => e.getAttribute('class')))).toEqual([
      'bar pass',
      'bar fail',
      'bar fail',
      'bar fail',
    ]);
    // The tallest bar of a failing check is taller than a passing check's.
    const heights = await failBars.evaluateAll((els) => els.map((e) => e.getBoundingClientRect().height));
    expect(Math.max(...heights)).toBeGreaterThan(10);

    // The planted markup is text: no script ran, no image element, shown as written.
    expect(await page.evaluate(() => (window as unknown as { pwned?: number }).pwned)).toBeUndefined();
    expect(await page.locator('img, script').count()).toBe(0);
    await expect(page.locator('tr[data-check="patients_sex_present"] .desc').innerText()).resolves.toBe(PLANTED);

    await page.screenshot({ path: path.join(tmp, 'report.png'), fullPage: true });
    await page.close();
  });
});
