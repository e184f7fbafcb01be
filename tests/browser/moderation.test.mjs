// Correcting and moderating chat in the demo page (SPEC 4.1), in a real browser: a
// student edits and deletes their own line and the other pages follow; a tutor deletes
// anyone's line, mutes a student (everyone sees it; the muted page cannot type) and
// removes them (their page says so). The shared harness is lib/harness.mjs.
//
//   npm ci && EASEL_BIN=/path/to/target/debug/easel node --test

import { test } from 'node:test'
import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { mkdirSync } from 'node:fs'
import { join } from 'node:path'
import { OUT, serverAndBrowser } from './lib/harness.mjs'

const ctx = serverAndBrowser()
const { open, until } = ctx

const chatConnected = (page, who) => until(page, `${who}'s chat connected`, () =>
  document.querySelector('#status-chat').dataset.state === 'connected')

/** The chat lines of a page: text, and whether deleted/edited. */
const lines = (page) => page.evaluate(() => [...document.querySelectorAll('#messages li.msg')].map((li) => ({
  seq: Number(li.dataset.seq),
  text: li.querySelector('.text')?.textContent,
  deleted: li.classList.contains('deleted'),
  edited: !!li.querySelector('.edited')
})))

async function say (page, text) {
  await page.fill('#chat-input', text)
  await page.press('#chat-input', 'Enter')
  await until(page, `own line "${text}" confirmed`, (t) => [...document.querySelectorAll('#messages li.msg:not(.pending) .text')]
    .some((e) => e.textContent === t), text)
}

const line = (page, text) => page.locator('#messages li.msg', { has: page.locator('.text', { hasText: text }) })

test('a deleted line is gone on the other page; edits, a tutor delete and a mute are shown to everyone', { timeout: 120000 }, async () => {
  const session = 'moderation-' + randomBytes(4).toString('hex')
  const link = (sub, name, role) => `/?session=${session}&token=${ctx.server.token({ sub, name, sid: session, role })}`
  const alice = await open(link('alice', 'Alice', 'student'))
  const bob = await open(link('bob', 'Bob', 'student'))
  const tess = await open(link('tess', 'Tess', 'tutor'))
  await chatConnected(alice, 'Alice')
  await chatConnected(bob, 'Bob')
  await chatConnected(tess, 'Tess')

  await say(alice, 'my secret answer is 42')
  await say(alice, 'helo everyone')
  await say(bob, 'hi Alice')
  await until(bob, 'all three lines on page 2', () => document.querySelectorAll('#messages li.msg').length === 3)

  // Alice deletes her first line: it is gone from Bob's page (and Tess's), its text nowhere.
  assert.equal(await line(bob, 'my secret answer').locator('button.delete').count(), 0, 'no delete button on a line of someone else for a student')
  await line(alice, 'my secret answer').locator('button.delete').click()
  for (const [who, page] of [['Bob', bob], ['Tess', tess], ['Alice', alice]]) {
    await until(page, `the deleted line on ${who}'s page`, () => {
      const li = document.querySelector('#messages li.msg[data-seq="1"]')
      return li && li.classList.contains('deleted') && !document.querySelector('#messages').textContent.includes('my secret answer')
    })
  }
  assert.deepEqual((await lines(bob)).map((l) => l.text), ['message deleted', 'helo everyone', 'hi Alice'])

  // Alice fixes her typo in place; everyone sees the new text marked as edited.
  await line(alice, 'helo everyone').locator('button.edit').click()
  await alice.fill('#messages .edit-box', 'hello everyone')
  await alice.press('#messages .edit-box', 'Enter')
  for (const [who, page] of [['Bob', bob], ['Tess', tess]]) {
    await until(page, `the edit on ${who}'s page`, () => {
      const li = document.querySelector('#messages li.msg[data-seq="2"]')
      return li && li.querySelector('.text').textContent === 'hello everyone' && li.querySelector('.edited')
    })
  }

  // The tutor deletes Bob's line.
  await line(tess, 'hi Alice').locator('button.delete').click()
  await until(alice, "Bob's line deleted on Alice's page", () =>
    document.querySelector('#messages li.msg[data-seq="3"]')?.classList.contains('deleted'))

  // A page opened now shows the deletions and the edit from the history.
  const carol = await open(link('carol', 'Carol', 'student'))
  await chatConnected(carol, 'Carol')
  await until(carol, 'the history with deletions', () => document.querySelectorAll('#messages li.msg').length === 3)
  assert.deepEqual(await lines(carol), [
    { seq: 1, text: 'message deleted', deleted: true, edited: false },
    { seq: 2, text: 'hello everyone', deleted: false, edited: true },
    { seq: 3, text: 'message deleted', deleted: true, edited: false }
  ])

  // The tutor mutes Bob: everyone is told, and Bob's input is disabled.
  await until(tess, 'moderation tools for Bob', () => !!document.querySelector('.mod-tools[data-user="bob"] button.mute'))
  await tess.click('.mod-tools[data-user="bob"] button.mute')
  for (const [who, page] of [['Alice', alice], ['Tess', tess]]) {
    await until(page, `the mute on ${who}'s page`, () => [...document.querySelectorAll('#messages li.system')]
      .some((li) => li.textContent === 'Tess muted Bob'))
  }
  await until(bob, 'Bob told he is muted, input disabled', () =>
    [...document.querySelectorAll('#messages li.system')].some((li) => li.textContent === 'Tess muted you') &&
    document.querySelector('#chat-input').disabled)
  await until(alice, 'Bob marked muted in the participants', () => /Bob \(student, muted\)/.test(document.querySelector('#participants').textContent))
  mkdirSync(OUT, { recursive: true })
  await alice.screenshot({ path: join(OUT, 'browser-moderation.png') })
  assert.deepEqual(ctx.pageErrors, [])

  // The tutor removes Bob: his page says so and stops; the others are told.
  await tess.click('.mod-tools[data-user="bob"] button.remove')
  await until(alice, 'the removal announced', () => [...document.querySelectorAll('#messages li.system')]
    .some((li) => li.textContent === 'Tess removed Bob'))
  await until(bob, "Bob's page says he was removed", () => !document.querySelector('#notice').hidden &&
    /You were removed from this session/.test(document.querySelector('#notice').textContent))
  // Refused upgrades are logged by the browser as console errors; nothing threw.
  assert.deepEqual(ctx.pageErrors.filter((e) => !e.startsWith('console:')), [])
  for (const p of [alice, bob, tess, carol]) await p.close()
})
