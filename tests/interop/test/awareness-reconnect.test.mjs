// The clock of the awareness removal the server relays when a connection closes (SPEC.md 3):
// y-protocols' removeAwarenessStates keeps the client's own clock, and so must the server.
// With a bumped clock the client's next awareness update after it reconnects carries a clock
// the server and the other clients already hold, and is ignored until the one after
// (a cursor or presence that stays invisible for up to ~30 s).
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { waitFor, sessionId } from '../lib/server.mjs'
import { sharedServer } from '../lib/harness.mjs'

let server
const client = sharedServer((s) => { server = s })

const statesOf = (c) => Object.fromEntries(Array.from(c.awareness.getStates().entries()))

test('a client whose socket dropped is seen again by the others as soon as it updates its awareness', async () => {
  const sid = sessionId('awreconnect')
  const a = client(sid)
  const b = client(sid)
  a.awareness.setLocalStateField('user', { name: 'Ada' })
  await a.synced()
  await b.synced()
  const aId = a.doc.clientID
  await waitFor(() => b.awareness.getStates().get(aId)?.user?.name === 'Ada', {
    what: 'b to see a', describe: () => statesOf(b)
  })
  const lastClock = a.awareness.meta.get(aId).clock

  // A's socket closes without the client's own goodbye (a network drop, a proxy restart):
  // the server removes a's state and relays the removal. The provider reconnects by itself.
  const socketsBefore = a.sockets.length
  a.provider.ws.close()
  const removal = await waitFor(() => b.awarenessMessages.flat().find((e) => e.clientID === aId && e.state === null), {
    timeout: 5000, what: 'the server-relayed removal of a', describe: () => b.awarenessMessages
  })
  assert.equal(removal.clock, lastClock, 'the removal must carry a\'s last clock, not a bumped one')
  await waitFor(() => !b.awareness.getStates().has(aId), { what: 'a removed at b', describe: () => statesOf(b) })
  await waitFor(() => a.sockets.length > socketsBefore && a.provider.wsconnected && a.provider.synced, {
    timeout: 5000, what: 'a reconnected', describe: () => a.describe()
  })

  // A's next awareness change (its clock + 1) must reach b at once.
  const t0 = Date.now()
  a.awareness.setLocalStateField('cursor', { x: 3, y: 4 })
  await waitFor(() => b.awareness.getStates().get(aId)?.cursor?.x === 3, {
    timeout: 3000, what: 'b to see a again after its reconnect', describe: () => statesOf(b)
  })
  assert.ok(Date.now() - t0 < 3000)
  assert.deepStrictEqual(b.awareness.getStates().get(aId), { user: { name: 'Ada' }, cursor: { x: 3, y: 4 } })
})

test('a joiner in a session of more than 16 clients is not refused for echoing its greeting', async () => {
  // y-websocket clients send back every awareness change they apply, the greeting included:
  // a joiner's echo names every other client. Those entries change nothing at the server;
  // they must not count against the per-connection limit of 16 (nor as refusals).
  const sid = sessionId('awecho')
  const others = []
  for (let i = 0; i < 18; i++) {
    const c = client(sid)
    c.awareness.setLocalStateField('user', { name: 'u' + i })
    others.push(c)
  }
  for (const c of others) await c.synced()
  const refusals = async () => {
    const text = await (await fetch(server.httpUrl + '/metrics')).text()
    const line = text.split('\n').find((l) => l.startsWith('easel_guard_refusals_total{reason="awareness"}'))
    return line ? Number(line.split(' ').pop()) : 0
  }
  const before = await refusals()

  const j = client(sid, { connect: false })
  const sent = []
  j.provider.on('status', ({ status }) => {
    if (status !== 'connecting' || !j.provider.ws) return
    const ws = j.provider.ws
    const send = ws.send.bind(ws)
    ws.send = (data) => {
      const buf = new Uint8Array(data)
      if (buf[0] === 1) sent.push(buf.length)
      return send(data)
    }
  })
  j.awareness.setLocalStateField('user', { name: 'joiner' })
  j.provider.connect()
  await j.synced()
  await waitFor(() => j.awareness.getStates().size === 19, { what: 'the joiner to see everyone', describe: () => statesOf(j) })
  // The joiner did send back a large awareness message (the echo of its greeting)...
  await waitFor(() => sent.some((n) => n > 18 * 10), { what: 'the joiner\'s echo of its greeting', describe: () => sent })
  // ...and everyone sees the joiner, and nothing was refused.
  await waitFor(() => others.every((c) => c.awareness.getStates().get(j.doc.clientID)?.user?.name === 'joiner'), {
    what: 'everyone to see the joiner'
  })
  assert.equal(await refusals(), before)
  assert.deepStrictEqual(j.closes, [])
})
