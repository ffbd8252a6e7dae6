// Output: JSON lines (pino) for schedulers and log shippers, readable lines and a progress bar
// for people at a terminal. Nothing here ever prints a document's content.
import { Writable } from 'node:stream';
import cliProgress from 'cli-progress';
import pino from 'pino';
import type { LoadProgress } from './stage.ts';

export type LogFormat = 'json' | 'pretty';

export type Output = {
  log: pino.Logger;
  format: LogFormat;
  progress: (p: LoadProgress) => void;
  stopProgress: () => void;
  /** Human-readable text for a person at a terminal (suppressed in JSON mode). */
  print: (text: string) => void;
  /** Plain text on stdout in any format: what a command prints as its result for a person (the demo's summary). */
  text: (text: string) => void;
};

/** Where JSON log lines go: stdout for a scheduler; stderr when stdout carries a command's text. */
export type LogStream = 'stdout' | 'stderr';

export function chooseFormat(requested: string | undefined): LogFormat {
  if (requested === 'json' || requested === 'pretty') return requested;
  return process.stdout.isTTY && !process.env.CI ? 'pretty' : 'json';
}

/**
 * Control characters made visible (C0, DEL and C1, so ESC sequences too): a file name or a server
 * message shown at a terminal cannot move the cursor, recolour it or fake a second line.
 */
export function visible(text: string): string {
  // eslint-disable-next-line no-control-regex -- matching control characters is the point
  return text.replace(/[\u0000-\u001f\u007f-\u009f]/g, (c) =>
    c === '\n' ? '\\n' : c === '\r' ? '\\r' : c === '\t' ? '\\t' : `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`,
  );
}

const LEVEL_NAMES: Record<number, string> = { 10: 'trace', 20: 'debug', 30: 'info', 40: 'warn', 50: 'error', 60: 'fatal' };

/** pino destination that writes `level message key=value` lines to stderr. */
function prettyStream(): Writable {
  return new Writable({
    write(chunk: Buffer, _enc, cb) {
      for (const line of chunk.toString('utf8').split('\n')) {
        if (!line) continue;
        const { level, msg, time: _t, pid: _p, hostname: _h, app: _a, ...rest } = JSON.parse(line);
        const extras = Object.entries(rest)
          .map(([k, v]) => `${k}=${typeof v === 'string' ? v : JSON.stringify(v)}`)
          .join(' ');
        const tag = level >= 40 ? `${LEVEL_NAMES[level]}: ` : '';
        process.stderr.write(`${tag}${visible(`${msg}${extras ? `  ${extras}` : ''}`)}\n`);
      }
      cb();
    },
  });
}

export function createOutput(format: LogFormat, verbose: boolean, logStream: LogStream = 'stdout'): Output {
  const log = pino(
    { base: { app: 'healthetl' }, level: verbose ? 'debug' : 'info', timestamp: pino.stdTimeFunctions.isoTime },
    format === 'json' ? pino.destination({ fd: logStream === 'stderr' ? 2 : 1, sync: true }) : prettyStream(),
  );
  let bar: cliProgress.SingleBar | null = null;
  let started = 0;
  // cli-progress hides the cursor while its bar runs; Ctrl-C (or a kill) must not leave it hidden.
  const interrupted = (signal: NodeJS.Signals) => {
    bar?.stop();
    process.stderr.write('\u001b[?25h\n');
    process.exit(signal === 'SIGINT' ? 130 : 143);
  };
  return {
    log,
    format,
    progress(p) {
      if (format !== 'pretty' || !process.stderr.isTTY) return;
      if (!bar) {
        started = Date.now();
        bar = new cliProgress.SingleBar(
          { format: '{bar} {percentage}% | files {files} | documents {documents} | {mbps} MB/s', stream: process.stderr, hideCursor: true },
          cliProgress.Presets.shades_classic,
        );
        bar.start(Math.max(p.totalBytes, 1), 0, { files: 0, documents: 0, mbps: '0.0' });
        process.once('SIGINT', interrupted).once('SIGTERM', interrupted);
      }
      const secs = Math.max((Date.now() - started) / 1000, 0.001);
      bar.setTotal(Math.max(p.totalBytes, p.bytes, 1));
      bar.update(p.bytes, { files: p.files, documents: p.documents, mbps: (p.bytes / 1e6 / secs).toFixed(1) });
    },
    stopProgress() {
      if (!bar) return;
      bar.stop();
      bar = null;
      process.off('SIGINT', interrupted).off('SIGTERM', interrupted);
    },
    print(text) {
      if (format === 'pretty') process.stdout.write(`${visible(text.replace(/\n$/, ''))}\n`);
    },
    text(text) {
      process.stdout.write(text.endsWith('\n') ? text : `${text}\n`);
    },
  };
}
