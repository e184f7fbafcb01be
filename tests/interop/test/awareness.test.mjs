// Awareness (cursors, presence) between real y-websocket clients through the easel server.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { waitFor, sessionId } from '../lib/server.mjs'
import { sharedServer } from '../lib/harness.mjs'

let server
const client = sharedServer((s) => { server = s })

const statesOf = (c) => Object.fromEntries(Array.from(c.awareness.getStates().entries()))

test('a second client sees the first one\'s awareness state, and its removal on destroy()', async () => {
  const sid = sessionId('aw')
  const a = client(sid)
  const user = { name: 'Ada', color: '#ff0000' }
  a.awareness.setLocalStateField('user', user)
  await a.synced()

  const b = client(sid)
  await b.synced()
  // b joined after a set its state: the server's on-connect awareness message carries it
  await waitFor(() => b.awareness.getStates().has(a.doc.clientID), {
    what: 'b to see a\'s awareness state', describe: () => statesOf(b)
  })
  assert.deepStrictEqual(b.awareness.getStates().get(a.doc.clientID), { user })

  // live changes are relayed (cursor moves)
  a.awareness.setLocalStateField('cursor', { x: 10, y: 20 })
  await waitFor(() => b.awareness.getStates().get(a.doc.clientID)?.cursor?.x === 10, {
    what: 'b to see a\'s cursor', describe: () => statesOf(b)
  })
  assert.deepStrictEqual(b.awareness.getStates().get(a.doc.clientID), { user, cursor: { x: 10, y: 20 } })

  // and the other direction
  b.awareness.setLocalStateField('user', { name: 'Bob' })
  await waitFor(() => a.awareness.getStates().get(b.doc.clientID)?.user?.name === 'Bob', {
    what: 'a to see b\'s state', describe: () => statesOf(a)
  })

  const removed = []
  b.awareness.on('change', ({ removed: r }) => removed.push(...r))
  const aId = a.doc.clientID
  a.destroy()
  await waitFor(() => !b.awareness.getStates().has(aId), {
    what: 'a\'s awareness state to be removed at b', describe: () => statesOf(b)
  })
  assert.ok(removed.includes(aId))
  assert.ok(b.awareness.getStates().has(b.doc.clientID))
  assert.deepStrictEqual(b.closes, [])
})

test('when a client\'s socket drops without saying goodbye, the server removes its awareness state', async () => {
  const sid = sessionId('awdrop')
  const a = client(sid)
  const b = client(sid)
  a.awareness.setLocalStateField('user', { name: 'dropper' })
  await a.synced()
  await b.synced()
  const aId = a.doc.clientID
  await waitFor(() => b.awareness.getStates().get(aId)?.user?.name === 'dropper', {
    what: 'b to see a', describe: () => statesOf(b)
  })
  // Kill a's TCP connection without the client-side awareness removal that destroy() sends.
  // (The client's own 30 s outdated timeout is far beyond the wait below.)
  a.provider.shouldConnect = false
  a.provider.ws.terminate()
  const t0 = Date.now()
  await waitFor(() => !b.awareness.getStates().has(aId), {
    timeout: 10000, what: 'server-relayed removal of a\'s awareness after its socket dropped', describe: () => statesOf(b)
  })
  assert.ok(Date.now() - t0 < 10000)
})

test('the server answers a query-awareness message with every state', async () => {
  const sid = sessionId('awq')
  const a = client(sid)
  const b = client(sid)
  a.awareness.setLocalStateField('user', { name: 'A' })
  b.awareness.setLocalStateField('user', { name: 'B' })
  await a.synced()
  await b.synced()
  await waitFor(() => a.awareness.getStates().get(b.doc.clientID)?.user?.name === 'B', { what: 'a to see b' })

  // A third client with no state of its own sends query awareness (type 3) on its socket and
  // must get back one awareness message holding both states.
  const c = client(sid, { localAwarenessNull: true })
  await c.synced()
  await waitFor(() => c.awareness.getStates().size === 2, { what: 'c to get the on-connect awareness', describe: () => statesOf(c) })
  const seen = c.awarenessMessages.length
  c.provider.ws.send(new Uint8Array([3]))
  const answer = await waitFor(() => c.awarenessMessages.slice(seen).find((m) =>
    Array.isArray(m) && m.some((e) => e.clientID === a.doc.clientID) && m.some((e) => e.clientID === b.doc.clientID)), {
    what: 'an awareness message with both states after query awareness',
    describe: () => c.awarenessMessages
  })
  const byId = Object.fromEntries(answer.map((e) => [e.clientID, e.state]))
  assert.deepStrictEqual(byId[a.doc.clientID], { user: { name: 'A' } })
  assert.deepStrictEqual(byId[b.doc.clientID], { user: { name: 'B' } })
  assert.deepStrictEqual(c.closes, [])
})

test('awareness is relayed to its sender too (as the reference server does)', async () => {
  const sid = sessionId('awself')
  const a = client(sid)
  await a.synced()
  const seen = a.awarenessMessages.length
  a.awareness.setLocalStateField('cursor', { x: 1, y: 2 })
  const echo = await waitFor(() => a.awarenessMessages.slice(seen).find((m) =>
    Array.isArray(m) && m.some((e) => e.clientID === a.doc.clientID && e.state?.cursor?.x === 1)), {
    what: 'the sender\'s own awareness update relayed back to it', describe: () => a.awarenessMessages
  })
  assert.ok(echo)
  for (const m of a.awarenessMessages) assert.ok(Array.isArray(m), `undecodable awareness message: ${JSON.stringify(m)}`)
})
