// The demo page across server restarts, in Debian's chromium against the real easel binary
// (env EASEL_BIN). A tutor page and a student page draw and chat; the server is stopped and
// started again on the same port and data directory:
//   1. with the SAME secret (EASEL_JWT_SECRET set explicitly): both pages say
//      "reconnecting…", then "offline — N … when back" for what was done meanwhile, then
//      "connected"; the offline stroke and chat line arrive without a reload, a new stroke
//      syncs, presence was greyed while offline, and nobody "joined" twice;
//   2. with a DIFFERENT secret: both pages explain in words that the link is dead.
// One screenshot per state in tests/browser/test-output/reconnect-*.png.

import { test, after } from 'node:test'
import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { OUT, startServer, launchBrowser, newSecret, until as untilIn, statusWords } from './lib/harness.mjs'

let server
let browser
let dataDir
after(async () => {
  await browser?.close()
  await server?.stop()
  if (dataDir) rmSync(dataDir, { recursive: true, force: true })
})

const until = (page, what, fn, arg) => untilIn(page, what, fn, arg, () => server.logTail())
const words = (page, which) => page.textContent(`#status-${which} .words`)
const shot = (page, name) => page.screenshot({ path: join(OUT, `reconnect-${name}.png`) })
/** The chat panel's system lines ("Sam (student) joined", "reconnected", ...). */
const systemLines = (page) => page.locator('#messages li.system').allTextContents()

const bothWords = (page, who, re) => until(page, `${who}: both connections say ${re}`, (src) => {
  const re = new RegExp(src)
  return ['board', 'chat'].every((w) => re.test(document.querySelector(`#status-${w} .words`).textContent))
}, re.source)

async function draw (page, path) {
  const box = await page.locator('#canvas').boundingBox()
  await page.mouse.move(box.x + path[0][0], box.y + path[0][1])
  await page.mouse.down()
  for (const [x, y] of path.slice(1)) await page.mouse.move(box.x + x, box.y + y, { steps: 4 })
  await page.mouse.up()
}
const strokesAre = (page, what, n) => until(page, what, (n) => window.__easel.doc.getArray('strokes').length === n, n)
/** Presence reads "2 here: " then the names in the server's order; `want` in any order. */
const presenceIs = (page, who, want) => until(page, `${who}: presence "${want.join(', ')}"`, (want) => {
  const box = document.querySelector('#participants')
  const m = /^(\d+) here: (.*)$/.exec(box.textContent)
  return m && !box.classList.contains('stale') && Number(m[1]) === want.length &&
    m[2].split(/, (?=[A-Z])/).sort().join('|') === [...want].sort().join('|')
}, want)
const chat = async (page, text) => { await page.fill('#chat-input', text); await page.press('#chat-input', 'Enter') }

test('restart with the same secret: reconnecting…, offline edits sync, no duplicate joined; another secret: the dead link is explained',
  { timeout: 90000 }, async () => {
    const started = Date.now()
    mkdirSync(OUT, { recursive: true })
    dataDir = mkdtempSync(join(tmpdir(), 'easel-browser-data-'))
    const secret = newSecret()
    server = await startServer({ secret, dataDir })
    const { port } = server
    browser = await launchBrowser()

    const session = 'restart-' + randomBytes(4).toString('hex')
    const link = (sub, name, role) => `${server.url}/?session=${session}&token=${server.token({ sub, name, role, sid: session })}`
    // Two contexts, as two people's browsers: nothing reaches the other page but through the server.
    const tutor = await browser.open(link('tess', 'Tess', 'tutor'), { permissions: ['clipboard-read', 'clipboard-write'] })
    await bothWords(tutor, 'tutor', /^connected$/)
    const student = await browser.open(link('sam', 'Sam', 'student'))
    await bothWords(student, 'student', /^connected$/)

    // Roles and "(you)"; the tutor sees Sam join once.
    await presenceIs(tutor, 'tutor', ['Tess (tutor, you)', 'Sam (student)'])
    await presenceIs(student, 'student', ['Tess (tutor)', 'Sam (student, you)'])
    await until(tutor, '"Sam (student) joined"', () => [...document.querySelectorAll('#messages li.system')].some((li) => li.textContent === 'Sam (student) joined'))
    assert.deepEqual(await systemLines(student), [])

    // Only the tutor has "Copy student link": the server mints a student token for the
    // session and the page copies a link with it, which opens the board as a student.
    assert.equal(await student.isVisible('#copy-student-link'), false)
    await tutor.click('#copy-student-link')
    await until(tutor, 'the copy note', () => !document.querySelector('#copy-note').hidden)
    const copied = await tutor.getAttribute('#copy-note', 'data-link')
    assert.ok(copied.startsWith(`${server.url}/?session=${session}&token=`), copied)
    assert.match(await tutor.textContent('#copy-note'), /^Copied a student link .*valid 12 hours/)
    assert.equal(await tutor.evaluate(() => navigator.clipboard.readText()), copied)
    const minted = JSON.parse(Buffer.from(new URL(copied).searchParams.get('token').split('.')[1], 'base64url'))
    assert.equal(minted.role, 'student')
    assert.equal(minted.sid, session)

    // Connected: a stroke from each side.
    await draw(tutor, [[100, 100], [200, 150], [300, 100]])
    await strokesAre(student, 'the first stroke', 1)
    await chat(student, 'hello Tess')
    await until(tutor, 'the first chat line', () => document.querySelectorAll('#messages li.msg').length === 1)
    await shot(tutor, '1-connected-tutor')

    // ---- 1. stop; same secret again.
    // The pages see the 1012 close as the shutdown starts: they say "reconnecting…" while the
    // server is still stopping (and "offline" OFFLINE_AFTER_MS later), so look before waiting for the exit.
    let stopping = server.stop()
    for (const [page, who] of [[tutor, 'tutor'], [student, 'student']]) {
      await bothWords(page, who, /^reconnecting…$/)
      await until(page, `${who}: presence greyed`, () => document.querySelector('#participants').classList.contains('stale') &&
        document.querySelector('#participants').textContent.startsWith('offline — last seen here: '))
    }
    const stopped = await stopping
    assert.equal(stopped.code, 0, `easel exited with ${JSON.stringify(stopped)}`)
    await shot(student, '2-reconnecting-student')

    // Work done while the server is down is counted in the status line.
    await draw(tutor, [[100, 300], [250, 350], [400, 300]])
    await chat(student, 'are you still there?')
    await until(tutor, 'the pending stroke', () => /1 edit will sync when back$/.test(document.querySelector('#status-board .words').textContent))
    await until(student, 'the pending chat line', () => /1 message will be sent when back$/.test(document.querySelector('#status-chat .words').textContent))
    assert.equal(await student.textContent('#messages li.pending .state'), 'will be sent when back')
    // After OFFLINE_AFTER_MS (5 s) "reconnecting…" becomes "offline".
    await until(tutor, '"offline — 1 edit will sync when back"', () => document.querySelector('#status-board .words').textContent === 'offline — 1 edit will sync when back')
    await until(student, '"offline — 1 message will be sent when back"', () => document.querySelector('#status-chat .words').textContent === 'offline — 1 message will be sent when back')
    await shot(tutor, '3-offline-tutor')
    await shot(student, '3-offline-student')

    server = await startServer({ secret, port, dataDir })
    await bothWords(tutor, 'tutor', /^connected$/)
    await bothWords(student, 'student', /^connected$/)
    await strokesAre(student, 'the stroke drawn offline', 2)
    await until(tutor, 'the chat line typed offline', () => [...document.querySelectorAll('#messages li.msg .text')].some((t) => t.textContent === 'are you still there?'))
    await until(student, 'the offline line acknowledged', () => !document.querySelector('#messages li.pending'))
    // A new stroke after the reconnect, without a reload.
    await draw(student, [[500, 100], [550, 200], [600, 100]])
    await strokesAre(tutor, 'the stroke after the restart', 3)
    await presenceIs(tutor, 'tutor', ['Tess (tutor, you)', 'Sam (student)'])
    await presenceIs(student, 'student', ['Tess (tutor)', 'Sam (student, you)'])
    // "reconnected" once on each page; Sam "joined" once (before the restart), nobody left.
    assert.deepEqual(await systemLines(tutor), ['Sam (student) joined', 'connection lost — reconnecting…', 'reconnected'])
    assert.deepEqual(await systemLines(student), ['connection lost — reconnecting…', 'reconnected'])
    assert.deepEqual(await tutor.locator('#messages li.msg .text').allTextContents(), ['hello Tess', 'are you still there?'])
    await shot(tutor, '4-reconnected-tutor')

    // ---- 2. stop; a different secret: the links are dead.
    stopping = server.stop()
    await bothWords(tutor, 'tutor', /^reconnecting…$/)
    await bothWords(student, 'student', /^reconnecting…$/)
    assert.equal((await stopping).code, 0)
    server = await startServer({ secret: newSecret(), port, dataDir })
    for (const [page, who] of [[tutor, 'tutor'], [student, 'student']]) {
      await until(page, `${who}: the dead link explained`, () => !document.querySelector('#notice').hidden)
      assert.equal(await words(page, 'board'), 'link refused')
      assert.equal(await words(page, 'chat'), 'link refused')
    }
    assert.match(await student.textContent('#notice'),
      /^This link is no longer valid \(the server's secret changed or the token expired\)\. Ask your tutor for a new link\.The server answered 401: token signature is invalid\.$/)
    assert.match(await tutor.textContent('#notice'), /^This link is no longer valid .*Mint a new one with “easel token --sub ID --session restart-\w+ --role tutor”/)
    await shot(student, '5-dead-link-student')
    await shot(tutor, '5-dead-link-tutor')

    // Nothing threw; the only console errors are the browser's own reports of refused or
    // failed WebSocket and fetch attempts while the server was down or refusing.
    const unexpected = browser.pageErrors.filter((e) => !/^console: (WebSocket connection to .* failed|Failed to load resource)/.test(e))
    assert.deepEqual(unexpected, [], `status: ${await statusWords(tutor)}`)
    console.log(`reconnect scenario: ${((Date.now() - started) / 1000).toFixed(1)} s`)
  })
