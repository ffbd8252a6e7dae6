// Schema snapshot: the catalog of the healthetl schemas after all migrations, rendered as text and
// compared with the committed test/__snapshots__/schema.sql, so that a schema change is a diff to
// review. One file serves PostgreSQL 15 and 18 (see renderSchema for what it leaves out).
// Regenerate it with a migration that changes the schema: README, "Tests".
import { expect, test } from 'vitest';
import { useTestDatabase } from './db.ts';
import { catalogSnapshot, renderSchema } from './schema-catalog.ts';

const db = useTestDatabase();

test('the migrated schema matches test/__snapshots__/schema.sql', async () => {
  const text = renderSchema(await catalogSnapshot(db.url()));
  await expect(text).toMatchFileSnapshot('./__snapshots__/schema.sql');
});

// Left out of the snapshot because it depends on how the server was built, not on the migrations.
test('column compression: lz4 on the landing payload where the server has lz4, the default everywhere else', async () => {
  const [{ lz4 }] = await db.query(`SELECT 'lz4' = ANY(enumvals) AS lz4 FROM pg_settings WHERE name = 'default_toast_compression'`);
  const compressed = (await catalogSnapshot(db.url())).columns
    .filter((c) => c.attcompression)
    .map((c) => `${c.nspname}.${c.relname}.${c.attname} ${c.attcompression}`);
  expect(compressed).toEqual(lz4 ? ['landing.raw_documents.payload l'] : []);
});
