// The demo page in a real browser: Debian's chromium driven by playwright-core, against
// the real easel binary (env EASEL_BIN, an absolute path).
//
// Two pages open the demo as two users; page 1 draws a stroke, adds a sticky note, moves
// its cursor and posts a chat line; page 2 must show all of them. A bad token is explained.
// Screenshots go to tests/browser/test-output/. The restart scenarios are in
// reconnect.test.mjs; the shared harness is lib/harness.mjs.
//
//   apt-get install -y chromium        # once; or set CHROMIUM_PATH
//   npm ci && EASEL_BIN=/path/to/target/debug/easel node --test

import { test } from 'node:test'
import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { mkdirSync } from 'node:fs'
import { join } from 'node:path'
import { OUT, signToken, serverAndBrowser } from './lib/harness.mjs'

const ctx = serverAndBrowser()
const { open, until } = ctx

const connected = (page, who) => until(page, `${who} connected`, () =>
  document.querySelector('#status-board').dataset.state === 'connected' &&
  document.querySelector('#status-chat').dataset.state === 'connected')

// ------------------------------------------------------------------ tests

test('two users: a stroke, a note, a cursor and a chat line reach the other page', { timeout: 90000 }, async () => {
  const session = 'browser-' + randomBytes(4).toString('hex')
  const link = (sub, name) => `/?session=${session}&token=${ctx.server.token({ sub, name, sid: session })}`
  const alice = await open(link('alice', 'Alice'))
  const bob = await open(link('bob', 'Bob'))
  await connected(alice, 'Alice')
  await connected(bob, 'Bob')
  assert.equal(await bob.textContent('#session-name'), session)

  // Alice draws with the second pen color: down, a few moves, up.
  await alice.click('#colors button:nth-child(3)')
  const box = await alice.locator('#canvas').boundingBox()
  const path = [[120, 160], [180, 120], [260, 180], [340, 130], [420, 200], [480, 160]]
  await alice.mouse.move(box.x + path[0][0], box.y + path[0][1])
  await alice.mouse.down()
  for (const [x, y] of path.slice(1)) await alice.mouse.move(box.x + x, box.y + y, { steps: 6 })
  await alice.mouse.up()

  // A sticky note with text.
  await alice.click('#add-note')
  await alice.locator('.note textarea').fill('Remember: area = π r²')

  // Her cursor rests on the board; then a chat line.
  await alice.mouse.move(box.x + 560, box.y + 300, { steps: 4 })
  await alice.fill('#chat-input', 'Hello Bob, look at the curve')
  await alice.press('#chat-input', 'Enter')

  // Bob sees the stroke in the document, in the counter and as ink on his canvas.
  await until(bob, 'the stroke on page 2', () => {
    const s = window.__easel.doc.getArray('strokes')
    return s.length === 1 && s.get(0).get('points').length >= 2 * 6
  })
  const stroke = await bob.evaluate(() => window.__easel.doc.getArray('strokes').get(0).toJSON())
  assert.equal(stroke.by, 'alice')
  assert.equal(stroke.color, '#2563eb')
  assert.deepEqual(stroke.points.slice(0, 2), [120, 160])
  await until(bob, 'the stroke counter', () => document.querySelector('#stroke-count').textContent === '1')
  await until(bob, 'ink on the canvas', () => {
    const c = document.querySelector('#canvas')
    const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data
    let n = 0
    for (let i = 3; i < px.length; i += 4) if (px[i]) n++
    return n > 200
  })

  // The note, the cursor and the chat line.
  await until(bob, 'the note', () => document.querySelector('.note textarea')?.value === 'Remember: area = π r²')
  await until(bob, "Alice's cursor", () => [...document.querySelectorAll('.cursor span')].some((s) => s.textContent === 'Alice'))
  await until(bob, 'the chat line', () => [...document.querySelectorAll('#messages li.msg')]
    .some((li) => li.querySelector('.who').textContent === 'Alice' && li.querySelector('.text').textContent === 'Hello Bob, look at the curve'))
  assert.equal(await bob.locator('#messages li.msg').count(), 1)
  assert.match(await bob.textContent('#participants'), /2 here: .*Alice \(student\).*Bob \(student, you\)|2 here: .*Bob \(student, you\).*Alice \(student\)/)
  assert.equal(await bob.textContent('#status-board .words'), 'connected')
  assert.equal(await bob.textContent('#status-chat .words'), 'connected')

  // Bob answers; Alice sees it after her own line, in order.
  await bob.fill('#chat-input', 'Nice!')
  await bob.press('#chat-input', 'Enter')
  await until(alice, 'the answer on page 1', () => document.querySelectorAll('#messages li.msg').length === 2)
  assert.deepEqual(await alice.locator('#messages li.msg .text').allTextContents(), ['Hello Bob, look at the curve', 'Nice!'])

  // Alice drags the note by its bar; Bob sees it move.
  const before = await bob.evaluate(() => [...window.__easel.doc.getMap('notes').values()][0].toJSON())
  const bar = await alice.locator('.note-bar').boundingBox()
  await alice.mouse.move(bar.x + 20, bar.y + bar.height / 2)
  await alice.mouse.down()
  await alice.mouse.move(bar.x + 120, bar.y + bar.height / 2 + 60, { steps: 5 })
  await alice.mouse.up()
  await until(bob, 'the note moved', ({ x, y }) => {
    const n = [...window.__easel.doc.getMap('notes').values()][0]
    const e = document.querySelector('.note')
    return n.get('x') === x + 100 && n.get('y') === y + 60 && e.style.left === `${x + 100}px`
  }, before)

  mkdirSync(OUT, { recursive: true })
  await bob.screenshot({ path: join(OUT, 'browser-demo.png') })
  assert.deepEqual(ctx.pageErrors, [])
  await alice.close()
  await bob.close()
})

test('a page without a token explains how to get one; a bad token is reported', { timeout: 60000 }, async () => {
  const bare = await open('/')
  assert.equal(await bare.isVisible('#help'), true)
  assert.match(await bare.textContent('#help'), /easel token/)

  const bad = await open('/?session=demo&token=' + signToken('not-the-secret', { sub: 'eve', sid: 'demo' }))
  await until(bad, 'the refusal', () => document.querySelector('#status-chat').dataset.state === 'closed' &&
    !document.querySelector('#notice').hidden)
  assert.match(await bad.textContent('#notice'), /This link is no longer valid .* Ask your tutor for a new link\..*answered 401: token signature is invalid/)
  assert.equal(await bad.textContent('#status-board .words'), 'link refused')
  assert.equal(await bad.isVisible('#help'), false)
  mkdirSync(OUT, { recursive: true })
  await bad.screenshot({ path: join(OUT, 'browser-demo-refused.png') })
  // The refused upgrades are logged by the browser as console errors; nothing threw.
  assert.deepEqual(ctx.pageErrors.filter((e) => !e.startsWith('console:')), [])
  await bare.close()
  await bad.close()
})
