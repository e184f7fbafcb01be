// A lone, idle y-websocket client must stay connected (the client drops a connection on which
// nothing arrived for 30 s; the server sends a zero-client awareness message after
// whiteboard.keepalive_s = 15 s of silence). This file takes ~45 s.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { startServer, waitFor, sessionId } from '../lib/server.mjs'
import { makeClient, destroyAll } from '../lib/client.mjs'

const STAY_MS = 42000

let server
const clients = []

before(async () => {
  // keepalive_s is the default (15); written out so the test documents what it relies on
  server = await startServer({ configToml: '[whiteboard]\nkeepalive_s = 15\n' })
})
after(async () => {
  try {
    destroyAll(clients)
  } finally {
    if (server) await server.stop()
  }
})

test(`a lone idle client stays connected for ${STAY_MS / 1000} s without reconnecting`, { timeout: STAY_MS + 30000 }, async () => {
  const sid = sessionId('idle')
  // No local awareness state: the client itself then sends nothing periodically (the y-protocols
  // awareness renews only a non-null local state every 15 s), so only the server's keep-alive
  // can keep the client's 30 s "no message received" watchdog quiet.
  const c = makeClient(server, sid, { localAwarenessNull: true })
  clients.push(c)
  await c.synced()
  c.doc.getMap('m').set('before', 1)
  const ws = c.provider.ws
  assert.ok(ws)
  const sentFrames = []
  const origSend = ws.send.bind(ws)
  ws.send = (data, ...rest) => {
    sentFrames.push(Array.from(new Uint8Array(data.buffer ?? data, data.byteOffset ?? 0, data.byteLength ?? data.length)))
    return origSend(data, ...rest)
  }
  const start = Date.now()
  const seen = c.awarenessMessages.length

  // Condition wait: fail as soon as the client disconnects, finish after STAY_MS.
  await waitFor(() => {
    if (c.statuses.includes('disconnected') || c.provider.ws !== ws) {
      throw Object.assign(new Error('client disconnected'), { fatal: true })
    }
    return Date.now() - start >= STAY_MS
  }, { timeout: STAY_MS + 5000, interval: 250, what: 'the idle period to pass while connected', describe: () => c.describe() })
    .catch((e) => {
      throw new Error(`idle client lost its connection after ${Date.now() - start} ms; statuses ${JSON.stringify(c.statuses)}, closes ${JSON.stringify(c.closes)}, frames it sent while idle ${JSON.stringify(sentFrames)}\n${e.message}`)
    })

  assert.ok(!c.statuses.includes('disconnected'), `statuses: ${JSON.stringify(c.statuses)}`)
  assert.deepStrictEqual(c.statuses, ['connecting', 'connected'])
  assert.strictEqual(c.provider.ws, ws, 'the provider replaced its WebSocket (it reconnected)')
  assert.equal(ws.readyState, ws.OPEN)
  assert.deepStrictEqual(c.closes, [])
  assert.equal(c.sockets.length, 1)
  // the client really was idle: it sent nothing during the idle period
  assert.deepStrictEqual(sentFrames, [], 'the client sent frames while idle (the test would not prove the server keep-alive)')
  // keep-alives arrived: awareness messages with zero clients (bytes [1, 1, 0])
  const keepalives = c.awarenessMessages.slice(seen).filter((m) => Array.isArray(m) && m.length === 0)
  assert.ok(keepalives.length >= 2, `expected >= 2 zero-client awareness keep-alives in ${STAY_MS / 1000} s, got ${JSON.stringify(c.awarenessMessages.slice(seen))}`)

  // and the connection still works
  const other = makeClient(server, sid)
  clients.push(other)
  await other.synced()
  assert.deepStrictEqual(other.doc.getMap('m').toJSON(), { before: 1 })
  other.doc.getMap('m').set('after', 2)
  await waitFor(() => c.doc.getMap('m').get('after') === 2, { what: 'edit after the idle period' })
  assert.strictEqual(c.provider.ws, ws)
})
