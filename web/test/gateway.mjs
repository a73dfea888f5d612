// Test harness for the JavaScript tests: runs the real gateway binary
// (built by `cargo build`/`cargo test`) in dev mode in a fresh temporary
// directory on 127.0.0.1, and mints tokens with the real `wsgate token`.
import { spawn, execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
export const BIN = process.env.WSGATE_BIN || path.join(repo, 'target', 'debug', 'wsgate');

/**
 * Starts a gateway. `env` adds WSGATE_* settings (e.g. short heartbeats).
 * Resolves once it listens, with its port, URLs, CA and helpers.
 */
export async function startGateway({ env = {}, dir = mkdtempSync(path.join(tmpdir(), 'wsgate-js-')), port = 0 } = {}) {
  const gw = {
    dir,
    port,
    caFile: path.join(dir, 'certs', 'ca.pem'),
    get url() { return `wss://localhost:${this.port}/ws`; },
    get origin() { return `https://localhost:${this.port}`; },
    get ca() { return readFileSync(this.caFile); },
    child: null,
    logs: '',
    /** The HTTP API's base URL (`serve --dev` serves it on loopback). */
    get apiUrl() { return `https://localhost:${this.apiPort}/api`; },
    apiPort: null,
    /** A token for `sub` with `roles` (and `aud`), from the real CLI. */
    token(sub, roles = [], ttl = '1h', aud = undefined) {
      const args = ['token', '--sub', sub, '--ttl', ttl, ...roles.flatMap((r) => ['--role', r]),
        ...(aud ? ['--aud', aud] : [])];
      return execFileSync(BIN, args, { cwd: dir, env: childEnv(env) }).toString().trim();
    },
    async stop() {
      const child = this.child;
      if (!child || child.exitCode !== null) return;
      const exited = new Promise((resolve) => child.once('exit', resolve));
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
      await exited;
      clearTimeout(timer);
    },
    /** Stops and starts again on the same port (same certs and key). */
    async restart() {
      await this.stop();
      await launch(this, env);
    },
    /** Stops and removes the temporary directory. */
    async dispose() {
      await this.stop();
      rmSync(dir, { recursive: true, force: true });
    },
  };
  await launch(gw, env);
  return gw;
}

function childEnv(env) {
  const out = { ...process.env, ...env };
  delete out.WSGATE_CONFIG;
  return out;
}

function launch(gw, env) {
  return new Promise((resolve, reject) => {
    const child = spawn(BIN, ['serve', '--dev', '--listen', `127.0.0.1:${gw.port}`], {
      cwd: gw.dir,
      env: childEnv(env),
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    gw.child = child;
    let out = '';
    const timer = setTimeout(() => reject(new Error(`gateway did not start:\n${out}\n${gw.logs}`)), 30_000);
    child.stderr.on('data', (d) => { gw.logs += d; });
    child.stdout.on('data', (d) => {
      out += d;
      const m = out.match(/WebSocket: wss:\/\/localhost:(\d+)\/ws/);
      const api = out.match(/HTTP API: https:\/\/localhost:(\d+)\/api/);
      if (m && api) {
        gw.apiPort = Number(api[1]);
        gw.port = Number(m[1]);
        clearTimeout(timer);
        resolve(gw);
      }
    });
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`gateway exited (${code}) before listening:\n${out}\n${gw.logs}`));
    });
  });
}
