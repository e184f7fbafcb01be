// Cluster mode (SPEC 9) with the real y-websocket client: three easel nodes on one real Redis,
// the clients of one session spread over them, no sticky sessions.
import { test, before, after, afterEach } from 'node:test'
import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { startServer, waitFor, sessionId } from '../lib/server.mjs'
import { makeClient, destroyAll } from '../lib/client.mjs'
import { startRedis } from '../lib/redis.mjs'

let redis
const nodes = []
const clients = []
const secret = randomBytes(32).toString('hex')

before(async () => {
  redis = await startRedis()
  for (let i = 0; i < 3; i++) {
    nodes.push(await startServer({ secret, env: { EASEL_REDIS_URL: redis.url, EASEL_NODE_ID: `node${i}` } }))
  }
})
afterEach(() => destroyAll(clients))
after(async () => {
  destroyAll(clients)
  for (const n of nodes) await n.stop()
  if (redis) await redis.stop()
})

const client = (node, sid, opts) => {
  const c = makeClient(nodes[node], sid, opts)
  clients.push(c)
  return c
}

const content = (doc) => ({
  map: doc.getMap('map').toJSON(),
  array: doc.getArray('array').toJSON(),
  text: doc.getText('text').toString()
})

async function converged (cs, expected) {
  await waitFor(() => cs.every((c) => {
    try { assert.deepStrictEqual(content(c.doc), expected); return true } catch { return false }
  }), { what: 'clients on every node to converge', describe: () => cs.map((c) => content(c.doc)) })
}

test('clients on three nodes converge (Map, Array, Text), and a late joiner on a third node gets it all', async () => {
  const sid = sessionId('cluster')
  const a = client(0, sid)
  const b = client(1, sid)
  await a.synced()
  await b.synced()
  a.doc.transact(() => {
    a.doc.getMap('map').set('from', 'a')
    a.doc.getArray('array').push(['a1'])
    a.doc.getText('text').insert(0, 'Hello')
  })
  b.doc.transact(() => {
    b.doc.getMap('map').set('also', 'b')
    b.doc.getArray('array').push(['b1'])
    b.doc.getText('text').insert(0, '>> ')
  })
  await waitFor(() => content(a.doc).text.length === 8 && content(b.doc).text.length === 8, { what: 'both texts merged' })
  const expected = content(a.doc)
  assert.deepStrictEqual(expected.map, { from: 'a', also: 'b' })
  await converged([a, b], expected)

  const late = client(2, sid)
  await late.synced()
  await converged([a, b, late], expected)
  late.doc.getArray('array').push(['c1'])
  await waitFor(() => a.doc.getArray('array').length === 3 && b.doc.getArray('array').length === 3,
    { what: 'the late joiner\'s write on every node' })
})

test('awareness crosses nodes, both ways', async () => {
  const sid = sessionId('cluster-aw')
  const a = client(0, sid)
  const b = client(1, sid)
  await a.synced()
  await b.synced()
  a.awareness.setLocalStateField('user', { name: 'Ada' })
  b.awareness.setLocalStateField('user', { name: 'Bob' })
  await waitFor(() => b.awareness.getStates().get(a.doc.clientID)?.user?.name === 'Ada', { what: 'Ada at node 1' })
  await waitFor(() => a.awareness.getStates().get(b.doc.clientID)?.user?.name === 'Bob', { what: 'Bob at node 0' })
  // A client on a node that had not loaded the session sees both.
  const c = client(2, sid)
  await c.synced()
  await waitFor(() => c.awareness.getStates().get(a.doc.clientID)?.user?.name === 'Ada' &&
    c.awareness.getStates().get(b.doc.clientID)?.user?.name === 'Bob', { what: 'both states at the late node' })
})
