// docs/data-dictionary.md is generated from the catalog (scripts/data-dictionary.ts): the committed
// file must be what the migrations give, byte for byte, on every server CI runs (PostgreSQL 15 and
// 18), and every analyst-facing view and column must say what it means.
import { readFile } from 'node:fs/promises';
import { expect, test } from 'vitest';
import { DICTIONARY_PATH, missingComments, readDictionary, renderDataDictionary } from '../scripts/data-dictionary.ts';
import { useTestDatabase } from './db.ts';

const db = useTestDatabase();

test('docs/data-dictionary.md is what the migrated catalog gives', async () => {
  const generated = await renderDataDictionary(db.url());
  const committed = await readFile(DICTIONARY_PATH, 'utf8').catch(() => '');
  expect(
    committed,
    'docs/data-dictionary.md is stale: regenerate it with `DATABASE_URL=<a migrated database> npm run data-dictionary` and commit it',
  ).toBe(generated);
});

test('every view and column in analytics and deid has a COMMENT', async () => {
  const views = await readDictionary(db.url());
  expect(views.map((v) => v.schema)).toEqual(expect.arrayContaining(['analytics', 'deid']));
  expect(missingComments(views), 'these have no COMMENT (add one in a new migration)').toEqual([]);
});
