// Shared by the browser tests: the real easel binary (env EASEL_BIN, an absolute path) on
// 127.0.0.1, tokens signed with its secret, and Debian's chromium driven by playwright-core.
// Not a test file itself (node --test picks up *.test.mjs only).

import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { createHmac, randomBytes } from 'node:crypto'
import { mkdtempSync, rmSync, existsSync, openSync, closeSync, readFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, isAbsolute } from 'node:path'
import { createInterface } from 'node:readline'
import { fileURLToPath } from 'node:url'
import { before, after } from 'node:test'
import { chromium } from 'playwright-core'

export const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium'
/** Screenshots: tests/browser/test-output/ (git-ignored by tests/browser/.gitignore). */
export const OUT = fileURLToPath(new URL('../test-output/', import.meta.url))
export const WAIT = 15000

// ------------------------------------------------------------------ server

function b64url (x) { return Buffer.from(x).toString('base64url') }

export function signToken (secret, claims) {
  const head = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }))
  const body = b64url(JSON.stringify({ exp: Math.floor(Date.now() / 1000) + 3600, ...claims }))
  const sig = createHmac('sha256', secret).update(`${head}.${body}`).digest()
  return `${head}.${body}.${b64url(sig)}`
}

/** A fresh 32-byte secret, hex (64 characters): over the server's 32-byte minimum. */
export const newSecret = () => randomBytes(32).toString('hex')

/**
 * Starts `easel serve` with `EASEL_JWT_SECRET` = `secret` (set explicitly) on
 * 127.0.0.1:`port` (0: any) with its data in `dataDir` (default: a new temporary one).
 * `stop()` removes the temporary directory (log, and data unless `dataDir` was given).
 */
export async function startServer ({ secret = newSecret(), port = 0, dataDir } = {}) {
  const bin = process.env.EASEL_BIN
  if (!bin || !isAbsolute(bin) || !existsSync(bin)) {
    throw new Error(`EASEL_BIN must be the absolute path of a built easel binary (got ${JSON.stringify(bin)})`)
  }
  const tmp = mkdtempSync(join(tmpdir(), 'easel-browser-'))
  const data = dataDir || join(tmp, 'data')
  const logPath = join(tmp, 'server.log')
  const logFd = openSync(logPath, 'a')
  const child = spawn(bin, ['serve', '--listen', `127.0.0.1:${port}`, '--data-dir', data], {
    env: { ...process.env, EASEL_LOG: process.env.EASEL_LOG || 'info', EASEL_JWT_SECRET: secret },
    stdio: ['ignore', 'pipe', logFd]
  })
  closeSync(logFd)
  const exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })))
  const logTail = () => { try { return readFileSync(logPath, 'utf8').split('\n').slice(-40).join('\n') } catch { return '' } }

  const lines = createInterface({ input: child.stdout })
  const bound = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`easel did not say "easel listening on" within 20 s\n${logTail()}`)), 20000)
    lines.on('line', (line) => {
      const m = /^easel listening on 127\.0\.0\.1:(\d+)\s*$/.exec(line)
      if (m) { clearTimeout(timer); resolve(Number(m[1])) }
    })
    exited.then((e) => { clearTimeout(timer); reject(new Error(`easel exited (${JSON.stringify(e)})\n${logTail()}`)) })
  }).catch(async (e) => { child.kill('SIGKILL'); rmSync(tmp, { recursive: true, force: true }); throw e })

  return {
    url: `http://127.0.0.1:${bound}`,
    port: bound,
    dataDir: data,
    token: (claims) => signToken(secret, claims),
    logTail,
    /** SIGTERM (SIGKILL after 15 s); resolves to the exit status. */
    async stop () {
      child.kill('SIGTERM')
      const t = setTimeout(() => child.kill('SIGKILL'), 15000)
      const r = await exited
      clearTimeout(t)
      rmSync(tmp, { recursive: true, force: true }) // a caller's dataDir is the caller's to remove
      return r
    }
  }
}

// ------------------------------------------------------------------ browser

/**
 * A headless chromium. Every `open` gets a browser context of its own (its own storage,
 * like a separate browser profile): two users in one context would sync their Yjs
 * documents and awareness through y-websocket's BroadcastChannel, around the server.
 */
export async function launchBrowser () {
  if (!existsSync(CHROMIUM)) {
    throw new Error(`no chromium at ${CHROMIUM}: install Debian's package (apt-get install -y chromium) or set CHROMIUM_PATH`)
  }
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
    timeout: 60000
  })
  const pageErrors = []
  return {
    pageErrors,
    /** Opens `url` in a new context; uncaught errors and console errors land in `pageErrors`. */
    async open (url, { permissions = [] } = {}) {
      const context = await browser.newContext({ viewport: { width: 1200, height: 720 }, permissions })
      const page = await context.newPage()
      page.on('pageerror', (e) => pageErrors.push(`${page.url()}: ${e.stack || e}`))
      page.on('console', (m) => { if (m.type() === 'error') pageErrors.push(`console: ${m.text()}`) })
      page.on('close', () => { context.close().catch(() => {}) })
      await page.goto(url)
      return page
    },
    async close () {
      await browser.close().catch(() => {})
    }
  }
}

/** Waits until `fn` (run in the page) is truthy; a timeout says what was awaited. */
export async function until (page, what, fn, arg, logTail = () => '') {
  try {
    await page.waitForFunction(fn, arg, { timeout: WAIT, polling: 50 })
  } catch (e) {
    throw new Error(`waiting for ${what} (up to ${WAIT} ms): ${String(e.message).split('\n')[0]}\n--- page status: ${await statusWords(page).catch(() => '?')}\n--- presence: ${await page.textContent('#participants').catch(() => '?')}\n--- server log ---\n${logTail()}`, { cause: e })
  }
}

/** The words of the page's status line, e.g. "Whiteboard: connected Chat: connected". */
export const statusWords = (page) => page.evaluate(() => document.querySelector('#status-line').textContent.replace(/\s+/g, ' ').trim())

/**
 * One server and one browser for a whole test file: started before its first test,
 * closed after its last (the server must exit 0). Returns the live handles and the file's
 * `open(path)` and `until(page, what, fn, arg)` (with the server's log on a timeout).
 */
export function serverAndBrowser () {
  const ctx = {
    server: undefined,
    browser: undefined,
    pageErrors: [],
    open: (path) => ctx.browser.open(ctx.server.url + path),
    until: (page, what, fn, arg) => until(page, what, fn, arg, ctx.server.logTail)
  }
  before(async () => {
    ctx.server = await startServer()
    ctx.browser = await launchBrowser()
    ctx.pageErrors = ctx.browser.pageErrors
  })
  after(async () => {
    await ctx.browser?.close()
    const exit = await ctx.server?.stop()
    if (exit) assert.equal(exit.code, 0, `easel exited with ${JSON.stringify(exit)}`)
  })
  return ctx
}
