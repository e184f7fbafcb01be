// Document sync between real y-websocket clients through the easel server.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { waitFor, sessionId } from '../lib/server.mjs'
import { Y, stateVector } from '../lib/client.mjs'
import { sharedServer } from '../lib/harness.mjs'

let server
const client = sharedServer((s) => { server = s })

/** Content of the root types these tests use. */
const content = (doc) => ({
  map: doc.getMap('map').toJSON(),
  array: doc.getArray('array').toJSON(),
  text: doc.getText('text').toString()
})

/** Wait until every client's content deep-equals `expected` (or, if null, each other). */
async function converged (cs, expected = null, timeout = 10000) {
  await waitFor(() => {
    const first = content(cs[0].doc)
    const want = expected || first
    return cs.every((c) => {
      try {
        assert.deepStrictEqual(content(c.doc), want)
        return true
      } catch {
        return false
      }
    })
  }, { timeout, what: 'clients to converge', describe: () => cs.map((c) => ({ sub: c.sub, content: content(c.doc), closes: c.closes, statuses: c.statuses })) })
  for (const c of cs.slice(1)) {
    assert.deepStrictEqual(content(c.doc), content(cs[0].doc))
    assert.deepStrictEqual(stateVector(c.doc), stateVector(cs[0].doc))
  }
  if (expected) assert.deepStrictEqual(content(cs[0].doc), expected)
}

test('two clients: Y.Map, Y.Array and Y.Text edits reach each other', async () => {
  const sid = sessionId('sync')
  const a = client(sid)
  const b = client(sid)
  await a.synced()
  await b.synced()

  a.doc.transact(() => {
    a.doc.getMap('map').set('color', 'red')
    a.doc.getMap('map').set('size', 3)
    a.doc.getArray('array').push(['one', 'two'])
    a.doc.getText('text').insert(0, 'Hello')
  })
  await converged([a, b], {
    map: { color: 'red', size: 3 },
    array: ['one', 'two'],
    text: 'Hello'
  })

  // and back the other way, including a nested type and a delete
  b.doc.transact(() => {
    const nested = new Y.Map()
    nested.set('x', 1.5)
    nested.set('tags', ['a', 'b'])
    b.doc.getMap('map').set('nested', nested)
    b.doc.getMap('map').delete('size')
    b.doc.getArray('array').insert(1, [{ k: true }])
    b.doc.getText('text').insert(5, ', world')
  })
  await converged([a, b], {
    map: { color: 'red', nested: { x: 1.5, tags: ['a', 'b'] } },
    array: ['one', { k: true }, 'two'],
    text: 'Hello, world'
  })

  // text deletion and formatting, non-ASCII (UTF-16 surrogate pairs in Yjs offsets)
  a.doc.getText('text').delete(5, 1)
  a.doc.getText('text').insert(0, '👋 ')
  a.doc.getText('text').format(0, 2, { bold: true })
  a.doc.getText('text').insert(a.doc.getText('text').length, ' — ünïcödé 漢字')
  await converged([a, b], {
    map: { color: 'red', nested: { x: 1.5, tags: ['a', 'b'] } },
    array: ['one', { k: true }, 'two'],
    text: '👋 Hello world — ünïcödé 漢字'
  })
  assert.deepStrictEqual(b.doc.getText('text').toDelta(), a.doc.getText('text').toDelta())
  // no reconnects happened
  for (const c of [a, b]) {
    assert.deepStrictEqual(c.closes, [], `client ${c.sub} saw connection closes`)
    assert.equal(c.sockets.length, 1)
  }
})

test('three clients: concurrent edits converge', async () => {
  const sid = sessionId('conc')
  const cs = [client(sid), client(sid), client(sid)]
  for (const c of cs) await c.synced()

  // Seed some shared structure first so concurrent edits hit the same positions.
  cs[0].doc.transact(() => {
    cs[0].doc.getText('text').insert(0, 'base')
    cs[0].doc.getArray('array').push(['seed'])
    cs[0].doc.getMap('map').set('shared', 'initial')
  })
  await converged(cs)

  // All three edit in the same tick: none can have seen the others' edits.
  cs.forEach((c, i) => {
    c.doc.transact(() => {
      c.doc.getMap('map').set('shared', `by-${i}`) // conflicting key
      c.doc.getMap('map').set(`own-${i}`, i) // distinct keys
      c.doc.getArray('array').insert(0, [`head-${i}`])
      c.doc.getArray('array').push([`tail-${i}`])
      c.doc.getText('text').insert(0, `[${i}]`)
      c.doc.getText('text').insert(c.doc.getText('text').length, `(${i})`)
    })
  })
  // Several rounds of interleaved concurrent edits
  for (let round = 0; round < 5; round++) {
    cs.forEach((c, i) => {
      const t = c.doc.getText('text')
      t.insert(Math.floor(t.length / 2), `r${round}c${i}`)
      c.doc.getArray('array').push([{ round, client: i }])
    })
  }
  await converged(cs)

  const got = cs[0].doc
  const map = got.getMap('map').toJSON()
  assert.ok(['by-0', 'by-1', 'by-2'].includes(map.shared), `shared=${map.shared}`)
  assert.deepStrictEqual({ ...map, shared: undefined }, { shared: undefined, 'own-0': 0, 'own-1': 1, 'own-2': 2 })
  const arr = got.getArray('array').toJSON()
  assert.equal(arr.length, 1 + 3 + 3 + 15)
  const sortedStrings = arr.filter((x) => typeof x === 'string').sort()
  assert.deepStrictEqual(sortedStrings, ['head-0', 'head-1', 'head-2', 'seed', 'tail-0', 'tail-1', 'tail-2'])
  const objs = arr.filter((x) => typeof x === 'object').map((o) => `${o.round}:${o.client}`).sort()
  assert.deepStrictEqual(objs, Array.from({ length: 15 }, (_, k) => `${Math.floor(k / 3)}:${k % 3}`))
  // every inserted character is there exactly once (inserts may interleave, so compare multisets)
  const text = got.getText('text').toString()
  let inserted = 'base'
  for (let i = 0; i < 3; i++) {
    inserted += `[${i}](${i})`
    for (let r = 0; r < 5; r++) inserted += `r${r}c${i}`
  }
  const sorted = (s) => Array.from(s).sort().join('')
  assert.equal(text.length, inserted.length, text)
  assert.equal(sorted(text), sorted(inserted), text)
})

test('a late joiner receives the full state', async () => {
  const sid = sessionId('late')
  const a = client(sid)
  const b = client(sid)
  await a.synced()
  await b.synced()
  for (let i = 0; i < 50; i++) {
    const c = i % 2 ? a : b
    c.doc.getArray('array').push([i])
    c.doc.getText('text').insert(c.doc.getText('text').length, String(i % 10))
    if (i % 5 === 0) c.doc.getMap('map').set(`k${i}`, { i, even: i % 2 === 0 })
  }
  a.doc.getText('text').delete(0, 10)
  await converged([a, b])
  const expected = content(a.doc)
  assert.equal(expected.array.length, 50)

  const late = client(sid)
  await late.synced()
  await converged([a, b, late], expected)

  // the first clients leave; a joiner after that still gets everything from the server
  a.destroy()
  b.destroy()
  const later = client(sid)
  await later.synced()
  assert.deepStrictEqual(content(later.doc), expected)
})

test('a client that edited offline sends its changes when it connects', async () => {
  const sid = sessionId('offline')
  const a = client(sid)
  await a.synced()
  a.doc.getMap('map').set('online', true)

  const b = client(sid, { connect: false })
  b.doc.getMap('map').set('offline', 'edit')
  b.doc.getText('text').insert(0, 'typed while offline')
  b.provider.connect()
  await b.synced()
  await converged([a, b], { map: { online: true, offline: 'edit' }, array: [], text: 'typed while offline' })
})

test('token in the subprotocol list (easel, bearer.<jwt>) syncs too', async () => {
  const sid = sessionId('subproto')
  const a = client(sid, { auth: 'subprotocol' })
  const b = client(sid) // params
  await a.synced()
  await b.synced()
  assert.equal(a.provider.ws.protocol, 'easel', 'server must answer the subprotocol "easel"')
  a.doc.getText('text').insert(0, 'via subprotocol')
  b.doc.getArray('array').push(['via params'])
  await converged([a, b], { map: {}, array: ['via params'], text: 'via subprotocol' })
})

test('token in the Authorization header syncs too', async () => {
  const sid = sessionId('header')
  const a = client(sid, { auth: 'header' })
  const b = client(sid)
  await a.synced()
  await b.synced()
  a.doc.getMap('map').set('auth', 'bearer')
  await converged([a, b], { map: { auth: 'bearer' }, array: [], text: '' })
})

test('a token whose sid is "*" or a list covering the session works', async () => {
  const sid = sessionId('sidlist')
  const star = client(sid, { token: server.token({ sub: 'star', sid: '*' }) })
  const list = client(sid, { token: server.token({ sub: 'list', sid: ['other', sid] }) })
  await star.synced()
  await list.synced()
  star.doc.getMap('map').set('from', 'star')
  await converged([star, list], { map: { from: 'star' }, array: [], text: '' })
})

test('sessions are isolated from each other', async () => {
  const s1 = sessionId('iso')
  const s2 = sessionId('iso')
  const a = client(s1)
  const b = client(s2)
  const a2 = client(s1)
  await a.synced()
  await b.synced()
  await a2.synced()
  a.doc.getMap('map').set('session', 1)
  b.doc.getMap('map').set('session', 2)
  await converged([a, a2], { map: { session: 1 }, array: [], text: '' })
  // b's session got b's edit only; a fresh client of s2 proves what the server holds for s2
  const b2 = client(s2)
  await b2.synced()
  await converged([b, b2], { map: { session: 2 }, array: [], text: '' })
})

test('a large update (~1 MB of text) syncs', async () => {
  const sid = sessionId('large')
  const a = client(sid)
  const b = client(sid)
  await a.synced()
  await b.synced()
  const big = 'lorem ipsum dolor sit amet '.repeat(40000) // ~1.08 MB
  a.doc.getText('text').insert(0, big)
  await waitFor(() => b.doc.getText('text').length === big.length, { timeout: 20000, what: 'big text at b' })
  assert.equal(b.doc.getText('text').toString(), big)
  assert.deepStrictEqual(b.closes, [])
})

test('updates are not echoed to their sender; every frame holds one message', async () => {
  const sid = sessionId('echo')
  const a = client(sid)
  const b = client(sid)
  await a.synced()
  await b.synced()
  const syncUpdatesAt = (c) => c.received.filter((m) => m.type === 0 && m.sub === 2).length
  const before = syncUpdatesAt(a)
  for (let i = 0; i < 3; i++) a.doc.getArray('array').push([i])
  await waitFor(() => b.doc.getArray('array').length === 3, { what: 'b to get a\'s 3 updates' })
  // fence: the server answers a query-awareness on a's socket after it handled a's updates
  const seen = a.received.length
  a.provider.ws.send(new Uint8Array([3]))
  await waitFor(() => a.received.slice(seen).some((m) => m.type === 1), { what: 'query-awareness answer at a' })
  assert.equal(syncUpdatesAt(a) - before, 0, `a got its own updates back: ${JSON.stringify(a.received)}`)
  assert.ok(syncUpdatesAt(b) >= 1)
  // the server opened with sync step 1 and answered the client's step 1 with step 2
  for (const c of [a, b]) {
    assert.deepStrictEqual(c.frameErrors, [])
    assert.ok(c.received.some((m) => m.type === 0 && m.sub === 0), `${c.sub} got no sync step 1: ${JSON.stringify(c.received)}`)
    assert.ok(c.received.some((m) => m.type === 0 && m.sub === 1), `${c.sub} got no sync step 2`)
  }
})

test('a client whose socket drops reconnects by itself and resyncs both ways', async () => {
  const sid = sessionId('reconnect')
  const a = client(sid)
  const b = client(sid)
  await a.synced()
  await b.synced()
  a.doc.getMap('map').set('before', 1)
  await waitFor(() => b.doc.getMap('map').get('before') === 1, { what: 'first edit at b' })

  // drop a's TCP connection (no close frame); y-websocket reconnects on its own
  const firstSocket = a.provider.ws
  firstSocket.terminate()
  await waitFor(() => !a.provider.wsconnected, { what: 'a to notice the drop' })
  // edits on both sides while a is away
  a.doc.getText('text').insert(0, 'offline a')
  b.doc.getArray('array').push(['while a was away'])
  await waitFor(() => a.provider.synced && a.provider.wsconnected && a.provider.ws !== firstSocket, {
    what: 'a to reconnect and sync', describe: () => a.describe()
  })
  await converged([a, b], { map: { before: 1 }, array: ['while a was away'], text: 'offline a' })
  assert.equal(a.sockets.length, 2)
  assert.deepStrictEqual(b.closes, [])
})
