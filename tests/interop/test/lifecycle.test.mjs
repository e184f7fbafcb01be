// Refusals, token expiry, shutdown and restart, seen from the real JS clients.
import { test, after } from 'node:test'
import assert from 'node:assert/strict'
import { startServer, waitFor, waitForEvent, sessionId, signToken } from '../lib/server.mjs'
import { makeClient, WebSocket, destroyAll } from '../lib/client.mjs'

const servers = []
const clients = []
after(async () => {
  try {
    destroyAll(clients)
  } finally {
    // newest first: a restarted server may use the data dir inside an older server's tmp dir
    for (const s of servers.slice().reverse()) await s.stop()
  }
})
async function server (opts) {
  const s = await startServer(opts)
  servers.push(s)
  return s
}
const client = (srv, sid, opts) => {
  const c = makeClient(srv, sid, opts)
  clients.push(c)
  return c
}

/** Open a raw `ws` WebSocket; resolve with {status, body} on refusal or {open: ws} on upgrade. */
function attempt (url, options = {}, protocols) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, protocols, options)
    const timer = setTimeout(() => { ws.terminate(); reject(new Error(`no answer from ${url}`)) }, 10000)
    ws.on('unexpected-response', (_req, res) => {
      let body = ''
      res.setEncoding('utf8')
      res.on('data', (d) => { body += d })
      res.on('end', () => {
        clearTimeout(timer)
        let json = null
        try { json = JSON.parse(body) } catch {}
        resolve({ status: res.statusCode, body, json, contentType: res.headers['content-type'] })
        ws.terminate()
      })
    })
    ws.on('open', () => {
      clearTimeout(timer)
      ws.close()
      resolve({ open: true, protocol: ws.protocol })
    })
    ws.on('error', () => {}) // the outcome is reported through the events above
  })
}

test('refusals before the upgrade: 401 / 403 / 400 with a JSON body', async () => {
  const s = await server()
  const sid = sessionId('refuse')
  const url = s.whiteboardUrl(sid)
  const now = Math.floor(Date.now() / 1000)

  const cases = [
    ['no token', url, 401, 'unauthorized'],
    ['bad signature', `${url}?token=${signToken('not-the-secret', { sub: 'u', sid })}`, 401, 'unauthorized'],
    ['expired (beyond the 30 s leeway)', `${url}?token=${s.token({ sub: 'u', sid, exp: now - 300 })}`, 401, 'unauthorized'],
    ['missing sub', `${url}?token=${s.token({ sid })}`, 401, 'unauthorized'],
    ['missing sid', `${url}?token=${s.token({ sub: 'u' })}`, 401, 'unauthorized'],
    ['garbage token', `${url}?token=abc.def.ghi`, 401, 'unauthorized'],
    ['sid for another session', `${url}?token=${s.token({ sub: 'u', sid: 'some-other-session' })}`, 403, 'forbidden'],
    ['sid list not covering', `${url}?token=${s.token({ sub: 'u', sid: ['x', 'y'] })}`, 403, 'forbidden'],
    ['bad session id', `${s.wsBase}/bad.id!/whiteboard?token=${s.token({ sub: 'u', sid: '*' })}`, 400, null]
  ]
  for (const [what, u, status, error] of cases) {
    const r = await attempt(u)
    assert.equal(r.status, status, `${what}: expected HTTP ${status}, got ${JSON.stringify(r)}`)
    assert.ok(r.json && typeof r.json.error === 'string' && typeof r.json.message === 'string',
      `${what}: body must be {"error","message"} JSON, got ${JSON.stringify(r.body)}`)
    if (error) assert.equal(r.json.error, error, `${what}: ${r.body}`)
  }
  // and the good one upgrades
  const ok = await attempt(`${url}?token=${s.token({ sub: 'u', sid })}`)
  assert.deepStrictEqual(ok, { open: true, protocol: '' })
  const okProto = await attempt(url, {}, ['easel', 'bearer.' + s.token({ sub: 'u', sid })])
  assert.deepStrictEqual(okProto, { open: true, protocol: 'easel' })
})

test('token expiry closes a live connection with 4401; the client stops, and resumes with a fresh token', { timeout: 40000 }, async () => {
  const s = await server({ configToml: '[auth]\nleeway_s = 0\n' })
  const sid = sessionId('expiry')
  const exp = Math.floor(Date.now() / 1000) + 3
  const c = client(s, sid, { token: s.token({ sub: 'short', sid, exp }) })
  const closedEvent = waitForEvent(c.provider, 'closed', { timeout: 20000, what: '4401 close' })
  await c.synced()
  const [info] = await closedEvent
  assert.equal(info.code, 4401, `close: ${JSON.stringify(info)}`)
  assert.deepStrictEqual(c.closes.map((x) => x && x.code), [4401])
  assert.ok(Date.now() / 1000 >= exp - 1, 'closed well before exp')
  assert.equal(c.provider.shouldConnect, false, 'y-websocket treats 44xx as final')

  // an edit made while disconnected, then a refreshed token: the client reconnects and syncs
  c.doc.getMap('m').set('while-expired', true)
  c.provider.params = { token: s.token({ sub: 'short', sid }) }
  c.provider.connect()
  await c.synced()
  const other = client(s, sid)
  await other.synced()
  await waitFor(() => other.doc.getMap('m').get('while-expired') === true, { what: 'edit after token refresh', describe: () => other.describe() })
})

test('SIGTERM closes clients with 1012 and exits 0; a restarted server has the document', { timeout: 60000 }, async () => {
  const s1 = await server()
  const sid = sessionId('restart')
  const a = client(s1, sid)
  const b = client(s1, sid)
  await a.synced()
  await b.synced()
  a.doc.getArray('strokes').push([{ id: 1, points: [1, 2, 3, 4] }])
  a.doc.getText('title').insert(0, 'Algebra')
  b.doc.getMap('notes').set('n1', { text: 'remember x', color: 'yellow' })
  const expected = {
    strokes: [{ id: 1, points: [1, 2, 3, 4] }],
    title: 'Algebra',
    notes: { n1: { text: 'remember x', color: 'yellow' } }
  }
  const board = (doc) => ({ strokes: doc.getArray('strokes').toJSON(), title: doc.getText('title').toString(), notes: doc.getMap('notes').toJSON() })
  await waitFor(() => { try { assert.deepStrictEqual(board(a.doc), expected); assert.deepStrictEqual(board(b.doc), expected); return true } catch { return false } },
    { what: 'a and b to converge before shutdown', describe: () => [board(a.doc), board(b.doc)] })

  const exit = await s1.stop({ keepDataDir: true, timeout: 15000 })
  assert.deepStrictEqual({ code: exit.code, signal: exit.signal, killed: exit.killed }, { code: 0, signal: null, killed: false },
    `easel must exit 0 on SIGTERM: ${JSON.stringify(exit)}`)
  for (const c of [a, b]) {
    await waitFor(() => c.closes.length > 0, { what: `close event at ${c.sub}` })
    assert.equal(c.closes[0]?.code, 1012, `${c.sub} closes: ${JSON.stringify(c.closes)}`)
  }
  a.destroy()
  b.destroy()

  const s2 = await server({ dataDir: s1.dataDir, secret: s1.secret })
  const late = client(s2, sid)
  await late.synced()
  assert.deepStrictEqual(board(late.doc), expected)
})

test('durability "sync": after SIGKILL, a restarted server has every update that was relayed', { timeout: 60000 }, async () => {
  const s1 = await server({ configToml: '[persist]\ndurability = "sync"\n' })
  const sid = sessionId('kill9')
  const a = client(s1, sid)
  const b = client(s1, sid)
  await a.synced()
  await b.synced()
  for (let i = 0; i < 20; i++) a.doc.getArray('strokes').push([{ i }])
  a.doc.getText('title').insert(0, 'crash test')
  // b has seen everything: with durability "sync" it was on disk before it was relayed
  await waitFor(() => b.doc.getArray('strokes').length === 20 && b.doc.getText('title').toString() === 'crash test', {
    what: 'relay to b', describe: () => b.describe()
  })
  const killed = await s1.kill()
  assert.equal(killed.signal, 'SIGKILL')
  a.destroy()
  b.destroy()

  const s2 = await server({ dataDir: s1.dataDir, secret: s1.secret, configToml: '[persist]\ndurability = "sync"\n' })
  const late = client(s2, sid)
  await late.synced()
  assert.deepStrictEqual(late.doc.getArray('strokes').toJSON(), Array.from({ length: 20 }, (_, i) => ({ i })))
  assert.equal(late.doc.getText('title').toString(), 'crash test')
})
