// Test helpers: start/stop the real easel binary, mint tokens, wait for conditions.
//
// The server binary comes from env EASEL_BIN (an absolute path). Each server gets a fresh
// temporary data dir, a generated TOML config and a random EASEL_JWT_SECRET. Its stderr goes
// to <tmp>/server.log; the tail of that log is appended to every waitFor() timeout error.
//
// Set EASEL_INTEROP_KEEP=1 to keep the temporary directories (their paths are printed).

import { spawn } from 'node:child_process'
import { createHmac, randomBytes } from 'node:crypto'
import { mkdtempSync, writeFileSync, readFileSync, rmSync, openSync, closeSync, existsSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, isAbsolute } from 'node:path'
import { createInterface } from 'node:readline'

const LISTEN_PREFIX = 'easel listening on '

/** Servers still running; their log tails are shown in waitFor() timeouts. */
const liveServers = new Set()

export function easelBin () {
  const bin = process.env.EASEL_BIN
  if (!bin) throw new Error('EASEL_BIN is not set: it must be the absolute path of the easel binary (e.g. /repo/target/debug/easel)')
  if (!isAbsolute(bin)) throw new Error(`EASEL_BIN must be an absolute path, got ${JSON.stringify(bin)}`)
  if (!existsSync(bin)) throw new Error(`EASEL_BIN=${bin} does not exist (build it first: cargo build)`)
  return bin
}

const b64url = (buf) => Buffer.from(buf).toString('base64url')

/**
 * Mint an HS256 JWT.
 * @param {string} secret
 * @param {object} claims  merged over defaults { exp: now + 3600 }
 */
export function signToken (secret, claims) {
  const header = { alg: 'HS256', typ: 'JWT' }
  const payload = { exp: Math.floor(Date.now() / 1000) + 3600, ...claims }
  const signingInput = b64url(JSON.stringify(header)) + '.' + b64url(JSON.stringify(payload))
  const sig = createHmac('sha256', secret).update(signingInput).digest()
  return signingInput + '.' + b64url(sig)
}

/**
 * Poll `predicate` until it returns a truthy value, or fail after `timeout` ms.
 * @template T
 * @param {() => T | Promise<T>} predicate
 * @param {{ timeout?: number, interval?: number, what?: string, describe?: () => any }} [opts]
 * @returns {Promise<T>}
 */
export async function waitFor (predicate, { timeout = 10000, interval = 15, what = 'condition', describe } = {}) {
  const deadline = Date.now() + timeout
  let lastError
  for (;;) {
    try {
      const v = await predicate()
      if (v) return v
      lastError = undefined
    } catch (e) {
      if (e && e.fatal) throw e
      lastError = e
    }
    if (Date.now() >= deadline) {
      let msg = `timed out after ${timeout} ms waiting for ${what}`
      if (lastError) msg += `\nlast predicate error: ${lastError.stack || lastError}`
      if (describe) {
        let d
        try { d = describe() } catch (e) { d = `(describe failed: ${e})` }
        msg += `\nstate: ${typeof d === 'string' ? d : JSON.stringify(d, null, 2)}`
      }
      for (const s of liveServers) msg += `\n--- server log tail (${s.logPath}) ---\n${s.logTail(40)}`
      throw new Error(msg)
    }
    await new Promise((resolve) => setTimeout(resolve, interval))
  }
}

/** Wait until `emitter` emits `event` with args satisfying `filter` (a real event wait). */
export function waitForEvent (emitter, event, { timeout = 10000, filter = () => true, what } = {}) {
  return new Promise((resolve, reject) => {
    const on = emitter.on ? emitter.on.bind(emitter) : emitter.addEventListener.bind(emitter)
    const off = emitter.off ? emitter.off.bind(emitter) : emitter.removeEventListener.bind(emitter)
    const handler = (...args) => {
      if (!filter(...args)) return
      clearTimeout(timer)
      off(event, handler)
      resolve(args)
    }
    const timer = setTimeout(() => {
      off(event, handler)
      reject(new Error(`timed out after ${timeout} ms waiting for event ${JSON.stringify(event)}${what ? ' (' + what + ')' : ''}`))
    }, timeout)
    on(event, handler)
  })
}

/**
 * Start `easel serve` on 127.0.0.1:0.
 * @param {object} [opts]
 * @param {string} [opts.configToml]  content of the TOML config file (default: empty config)
 * @param {string} [opts.dataDir]     reuse a data dir (e.g. for restart tests); default: fresh tmp dir
 * @param {string} [opts.secret]      JWT secret; default: random
 * @param {number} [opts.startTimeout] ms to wait for the "listening" line (default 20000)
 * @param {object} [opts.env]          extra environment
 */
export async function startServer ({ configToml = '', dataDir, secret, startTimeout = 20000, env = {} } = {}) {
  const bin = easelBin()
  const tmp = mkdtempSync(join(tmpdir(), 'easel-interop-'))
  dataDir = dataDir || join(tmp, 'data')
  secret = secret || randomBytes(32).toString('hex')
  const configPath = join(tmp, 'easel.toml')
  writeFileSync(configPath, configToml)
  const logPath = join(tmp, 'server.log')
  const logFd = openSync(logPath, 'a')

  const child = spawn(bin, ['serve', '--listen', '127.0.0.1:0', '--data-dir', dataDir, '--config', configPath], {
    env: {
      ...process.env,
      EASEL_LOG: process.env.EASEL_LOG || 'info',
      ...env,
      EASEL_JWT_SECRET: secret
    },
    stdio: ['ignore', 'pipe', logFd]
  })
  closeSync(logFd)

  let exited = false
  let exitInfo = null
  const exitPromise = new Promise((resolve) => {
    child.on('exit', (code, signal) => {
      exited = true
      exitInfo = { code, signal }
      resolve(exitInfo)
    })
  })
  const stdoutLines = []

  const server = {
    child,
    tmp,
    dataDir,
    secret,
    configPath,
    logPath,
    port: 0,
    host: '127.0.0.1',
    get exited () { return exited },
    get exitInfo () { return exitInfo },
    stdoutLines,
    logTail (n = 40) {
      try {
        const lines = readFileSync(logPath, 'utf8').split('\n')
        return lines.slice(-n - 1).join('\n')
      } catch (e) {
        return `(no log: ${e.message})`
      }
    },
    get httpUrl () { return `http://${this.host}:${this.port}` },
    /** Base URL for WebsocketProvider: room name is `${sid}/whiteboard`. */
    get wsBase () { return `ws://${this.host}:${this.port}/ws/v2/session` },
    whiteboardUrl (sid) { return `${this.wsBase}/${sid}/whiteboard` },
    token (claims) { return signToken(secret, claims) },
    /**
     * SIGTERM, then wait (up to `timeout` ms) for exit; SIGKILL after that.
     * @returns {Promise<{code: number|null, signal: string|null, killed: boolean}>}
     */
    async stop ({ timeout = 15000, keepDataDir = false } = {}) {
      let killed = false
      if (!exited) {
        child.kill('SIGTERM')
        let timer
        const t = new Promise((resolve) => { timer = setTimeout(() => resolve('timeout'), timeout) })
        const r = await Promise.race([exitPromise, t])
        clearTimeout(timer)
        if (r === 'timeout') {
          killed = true
          child.kill('SIGKILL')
          await exitPromise
        }
      }
      liveServers.delete(server)
      if (!keepDataDir) server.removeTmp()
      return { ...exitInfo, killed }
    },
    /** Delete this server's temporary directory (config, log, and its own data dir). */
    removeTmp () {
      if (process.env.EASEL_INTEROP_KEEP) {
        console.error(`[interop] kept ${tmp}`)
      } else {
        rmSync(tmp, { recursive: true, force: true })
      }
    },
    /** SIGKILL immediately (for crash tests). */
    async kill () {
      if (!exited) {
        child.kill('SIGKILL')
        await exitPromise
      }
      liveServers.delete(server)
      return exitInfo
    }
  }
  liveServers.add(server)

  // Read stdout lines until the listening line appears (or the process dies, or time runs out).
  const rl = createInterface({ input: child.stdout })
  const portPromise = new Promise((resolve, reject) => {
    rl.on('line', (line) => {
      stdoutLines.push(line)
      if (line.startsWith(LISTEN_PREFIX) && !server.port) {
        const addr = line.slice(LISTEN_PREFIX.length).trim()
        const m = /:(\d+)$/.exec(addr)
        if (!m) return reject(new Error(`cannot parse listening line: ${JSON.stringify(line)}`))
        server.host = addr.slice(0, addr.length - m[0].length).replace(/^\[|\]$/g, '')
        server.port = Number(m[1])
        resolve(server.port)
      }
    })
    exitPromise.then((info) => reject(new Error(
      `easel exited before listening (code ${info.code}, signal ${info.signal}); stdout: ${JSON.stringify(stdoutLines)}\n--- log ---\n${server.logTail(60)}`)))
  })
  let timer
  const timeoutPromise = new Promise((resolve, reject) => {
    timer = setTimeout(() => reject(new Error(
      `easel did not print "${LISTEN_PREFIX}..." within ${startTimeout} ms; stdout: ${JSON.stringify(stdoutLines)}\n--- log ---\n${server.logTail(60)}`)), startTimeout)
  })
  try {
    await Promise.race([portPromise, timeoutPromise])
  } catch (e) {
    await server.kill()
    server.removeTmp()
    throw e
  } finally {
    clearTimeout(timer)
  }
  // keep draining stdout so the child never blocks on a full pipe
  return server
}

/** A fresh, valid, unique session id. */
export function sessionId (prefix = 's') {
  return `${prefix}-${randomBytes(6).toString('hex')}`
}
