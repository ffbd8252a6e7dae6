// The BI connection templates of bi/ (issue 13), checked as files: no database needed. The .pbids
// holds server and database only; each .tds is well-formed XML for Tableau's PostgreSQL connector
// with its reader login, its schema, SSL required and temporary tables off; no file in bi/ holds a
// password.
import { readdir, readFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, test } from 'vitest';

const BI_DIR = fileURLToPath(new URL('../bi/', import.meta.url));

const readBi = (name: string) => readFile(path.join(BI_DIR, name), 'utf8');

// Every key of a parsed JSON value, at any depth.
function allKeys(value: unknown): string[] {
  if (Array.isArray(value)) return value.flatMap(allKeys);
  if (value !== null && typeof value === 'object') {
    return Object.entries(value).flatMap(([k, v]) => [k, ...allKeys(v)]);
  }
  return [];
}

interface XmlElement {
  name: string;
  attrs: Record<string, string>;
  children: XmlElement[];
}

// A small XML reader, enough for a .tds: the declaration, comments, elements with quoted attributes
// and whitespace between them. It throws on anything it does not know and on tags that do not match,
// so a file it reads is well-formed.
function parseXml(text: string): XmlElement {
  const root: XmlElement = { name: '#document', attrs: {}, children: [] };
  const stack: XmlElement[] = [root];
  const token =
    /<\?xml[^?]*\?>|<!--(?:(?!--)[\s\S])*-->|<\/([A-Za-z_][\w.:-]*)\s*>|<([A-Za-z_][\w.:-]*)((?:\s+[^\s=/>]+\s*=\s*(?:'[^'<]*'|"[^"<]*"))*)\s*(\/?)>|([^<]+)/y;
  let m: RegExpExecArray | null;
  while (token.lastIndex < text.length) {
    const at = token.lastIndex;
    m = token.exec(text);
    if (!m) throw new Error(`not well-formed XML at offset ${at}: ${JSON.stringify(text.slice(at, at + 40))}`);
    const [whole, closing, opening, attrText, selfClosing, chars] = m;
    if (whole.startsWith('<?xml')) {
      if (at !== 0) throw new Error('XML declaration not at the start');
    } else if (whole.startsWith('<!--')) {
      // comment
    } else if (chars !== undefined) {
      if (stack.length === 1 && chars.trim() !== '') throw new Error(`text outside the root element: ${chars.trim()}`);
      if (/&(?!(?:amp|lt|gt|quot|apos|#\d+|#x[0-9a-fA-F]+);)/.test(chars)) throw new Error('bare & in text');
    } else if (closing !== undefined) {
      const open = stack.pop();
      if (!open || open === root || open.name !== closing) throw new Error(`</${closing}> does not close <${open?.name}>`);
    } else {
      const attrs: Record<string, string> = {};
      for (const a of (attrText ?? '').matchAll(/([^\s=/>]+)\s*=\s*(?:'([^']*)'|"([^"]*)")/g)) {
        if (a[1] in attrs) throw new Error(`duplicate attribute ${a[1]} on <${opening}>`);
        attrs[a[1]] = a[2] ?? a[3];
      }
      const element: XmlElement = { name: opening, attrs, children: [] };
      const parent = stack[stack.length - 1];
      if (parent === root && root.children.length > 0) throw new Error('more than one root element');
      parent.children.push(element);
      if (!selfClosing) stack.push(element);
    }
  }
  if (stack.length !== 1) throw new Error(`<${stack[stack.length - 1].name}> is not closed`);
  if (root.children.length !== 1) throw new Error('no root element');
  return root.children[0];
}

function descendants(e: XmlElement): XmlElement[] {
  return e.children.flatMap((c) => [c, ...descendants(c)]);
}

test('the XML reader rejects what is not well-formed', () => {
  expect(() => parseXml("<a><b x='1'></a>")).toThrow();
  expect(() => parseXml('<a><b>')).toThrow();
  expect(() => parseXml("<a x='1' x='2'/>")).toThrow();
  expect(() => parseXml('<a/><b/>')).toThrow();
  expect(() => parseXml('<a x=1/>')).toThrow();
  expect(parseXml("<?xml version='1.0' ?>\n<!-- c -->\n<a><b x='1' /></a>\n").children[0].attrs).toEqual({ x: '1' });
});

describe('bi/healthetl.pbids', () => {
  test('is a Power BI data source for PostgreSQL with server and database only', async () => {
    const pbids = JSON.parse(await readBi('healthetl.pbids'));
    expect(pbids.version).toBe('0.1');
    expect(pbids.connections).toHaveLength(1);
    const details = pbids.connections[0].details;
    expect(details.protocol).toBe('postgresql');
    expect(details.address.server).toEqual(expect.any(String));
    expect(details.address.server).not.toBe('');
    expect(details.address.database).toBe('healthetl');
    const keys = allKeys(pbids).map((k) => k.toLowerCase());
    for (const secret of ['password', 'pwd', 'user', 'username', 'userid', 'uid', 'credentials']) {
      expect(keys, `no "${secret}" field anywhere`).not.toContain(secret);
    }
    expect(keys.filter((k) => /pass|user/.test(k))).toEqual([]);
  });
});

describe.each([
  ['healthetl-analytics.tds', 'bi_reader', 'analytics'],
  ['healthetl-deid.tds', 'research_reader', 'deid'],
])('bi/%s', (file, username, schema) => {
  test(`is well-formed Tableau XML for PostgreSQL as ${username} on ${schema}, SSL required, temporary tables off`, async () => {
    const root = parseXml(await readBi(file));
    expect(root.name).toBe('datasource');
    const connections = root.children.filter((c) => c.name === 'connection');
    expect(connections).toHaveLength(1);
    const c = connections[0].attrs;
    expect(c).toMatchObject({ class: 'postgres', port: '5432', dbname: 'healthetl', username, schema, sslmode: 'require' });
    expect(c.server).toEqual(expect.any(String));
    expect(c.server).not.toBe('');
    expect(Object.keys(c).filter((k) => /pass/i.test(k))).toEqual([]);

    const customization = connections[0].children.find((e) => e.name === 'connection-customization');
    expect(customization?.attrs).toMatchObject({ class: 'postgres', enabled: 'true' });
    const caps = Object.fromEntries(
      descendants(customization!)
        .filter((e) => e.name === 'customization')
        .map((e) => [e.attrs.name, e.attrs.value]),
    );
    expect(caps).toMatchObject({ CAP_CREATE_TEMP_TABLES: 'no', CAP_SELECT_INTO: 'no' });
  });
});

test('no file in bi/ holds a password', async () => {
  const names = (await readdir(BI_DIR, { withFileTypes: true })).filter((d) => d.isFile()).map((d) => d.name);
  expect(names).toEqual(expect.arrayContaining(['healthetl.pbids', 'healthetl-analytics.tds', 'healthetl-deid.tds', 'README.md']));
  for (const name of names) {
    const text = await readBi(name);
    // password=... in a connection string; a password attribute or key with a value ('' is none).
    expect(text, `${name}: "password="`).not.toMatch(/(?<![A-Za-z])password=/i);
    expect(text, `${name}: a password attribute with a value`).not.toMatch(/(?<![A-Za-z])password\s*=\s*(?:'[^']+'|"[^"]+")/i);
    expect(text, `${name}: a password field with a value`).not.toMatch(/"password"\s*:\s*"[^"]+"/i);
  }
});
