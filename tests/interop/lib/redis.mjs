// A real redis-server for the cluster tests (SPEC 9), on a free loopback port, with the
// durability the README recommends (AOF, fsync always) in a temporary directory. Never the
// system's service. redis-server comes from PATH or /usr/bin (scripts/test.sh installs it).
import { spawn } from 'node:child_process'
import { mkdtempSync, rmSync, existsSync } from 'node:fs'
import { createServer, connect } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { waitFor } from './server.mjs'

function freePort () {
  return new Promise((resolve, reject) => {
    const s = createServer()
    s.on('error', reject)
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address()
      s.close(() => resolve(port))
    })
  })
}

/** One PING over a fresh socket; resolves true on +PONG. */
function ping (port) {
  return new Promise((resolve) => {
    const sock = connect(port, '127.0.0.1')
    let got = ''
    const done = (v) => { sock.destroy(); resolve(v) }
    sock.on('connect', () => sock.write('PING\r\n'))
    sock.on('data', (d) => { got += d; if (got.includes('\r\n')) done(got.startsWith('+PONG')) })
    sock.on('error', () => done(false))
    setTimeout(() => done(false), 1000)
  })
}

export async function startRedis () {
  const bin = existsSync('/usr/bin/redis-server') ? '/usr/bin/redis-server' : 'redis-server'
  const dir = mkdtempSync(join(tmpdir(), 'easel-redis-'))
  const port = await freePort()
  const child = spawn(bin, ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'yes',
    '--appendfsync', 'always', '--dir', dir], { stdio: 'ignore' })
  let exited = false
  const exit = new Promise((resolve) => child.on('exit', () => { exited = true; resolve() }))
  await waitFor(async () => !exited && await ping(port), { timeout: 10000, what: 'redis-server to answer PING' })
  return {
    url: `redis://127.0.0.1:${port}`,
    async stop () {
      if (!exited) { child.kill('SIGKILL'); await exit }
      rmSync(dir, { recursive: true, force: true })
    }
  }
}
