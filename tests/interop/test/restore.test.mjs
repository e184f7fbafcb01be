// Snapshots seen from the real JS clients: a live restore reaching connected
// WebsocketProviders without a reconnect (SPEC 5.3, 6), and exported snapshots
// (HTTP route, CLI through the server, CLI on the data dir) that Y.applyUpdate loads (SPEC 1, 6).
import { test, after } from 'node:test'
import assert from 'node:assert/strict'
import { execFile } from 'node:child_process'
import { readFileSync, existsSync, rmSync } from 'node:fs'
import { join } from 'node:path'
import { startServer, waitFor, sessionId, easelBin } from '../lib/server.mjs'
import { makeClient, Y, stateVector, destroyAll } from '../lib/client.mjs'

const servers = []
const clients = []
after(async () => {
  try {
    destroyAll(clients)
  } finally {
    for (const s of servers.slice().reverse()) {
      await s.stop({ keepDataDir: true })
      s.removeTmp() // once, also when a test stopped it earlier with keepDataDir
    }
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

/** The three root types these tests use, as plain JSON. */
const content = (doc) => ({
  board: doc.getMap('board').toJSON(),
  strokes: doc.getArray('strokes').toJSON(),
  notes: doc.getText('notes').toString()
})

/** A fresh Y.Doc loaded from Yjs v1 update bytes; its content. */
function contentOfUpdate (bytes) {
  const doc = new Y.Doc()
  Y.applyUpdate(doc, new Uint8Array(bytes))
  const c = content(doc)
  doc.destroy()
  return c
}

const deepEq = (a, b) => {
  try {
    assert.deepStrictEqual(a, b)
    return true
  } catch {
    return false
  }
}

/** Wait until every client shows `expected` (or, if null, the first client's content). */
async function converged (cs, expected = null, what = 'clients to converge', timeout = 10000) {
  await waitFor(() => {
    const want = expected || content(cs[0].doc)
    return cs.every((c) => deepEq(content(c.doc), want))
  }, { timeout, what, describe: () => cs.map((c) => ({ sub: c.sub, content: content(c.doc), statuses: c.statuses, closes: c.closes })) })
  for (const c of cs.slice(1)) assert.deepStrictEqual(content(c.doc), content(cs[0].doc))
  if (expected) assert.deepStrictEqual(content(cs[0].doc), expected)
}

/** fetch() against the server's HTTP API with a Bearer token; returns {status, body (Buffer), json, text}. */
async function api (srv, method, path, token) {
  const res = await fetch(srv.httpUrl + path, {
    method,
    headers: token ? { Authorization: 'Bearer ' + token } : {}
  })
  const body = Buffer.from(await res.arrayBuffer())
  const text = body.toString('utf8')
  let json = null
  try { json = JSON.parse(text) } catch {}
  return { status: res.status, contentType: res.headers.get('content-type'), body, text, json }
}
const show = (r) => `HTTP ${r.status} ${r.contentType || ''} ${r.text.length > 500 ? r.text.slice(0, 500) + '...' : r.text}`

/** Run the easel binary; resolve with {code, stdout (Buffer), stderr}; never rejects on exit code. */
function easel (args, { cwd, timeout = 30000 } = {}) {
  return new Promise((resolve, reject) => {
    const env = { ...process.env, EASEL_LOG: process.env.EASEL_LOG || 'warn' }
    delete env.EASEL_DATA_DIR
    execFile(easelBin(), args, { cwd, env, timeout, encoding: 'buffer', maxBuffer: 64 << 20 }, (err, stdout, stderr) => {
      if (err && typeof err.code !== 'number' && !err.killed) return reject(err)
      resolve({ code: err ? (typeof err.code === 'number' ? err.code : null) : 0, killed: !!(err && err.killed), stdout, stderr: stderr.toString('utf8') })
    })
  })
}
const showRun = (args, r) => `easel ${args.join(' ')} -> exit ${r.code}${r.killed ? ' (killed: timeout)' : ''}\nstdout: ${r.stdout.toString('utf8').slice(0, 1000)}\nstderr: ${r.stderr.slice(0, 2000)}`

/** Version-1 content, written by `doc` in one transaction. */
function writeVersion1 (doc) {
  doc.transact(() => {
    const board = doc.getMap('board')
    board.set('title', 'Fractions — lesson 1')
    const nested = new Y.Map()
    nested.set('bg', '#ffffff')
    nested.set('grid', true)
    nested.set('zoom', 1.25)
    nested.set('tags', ['maths', 'year 5'])
    board.set('settings', nested)
    board.set('pages', 3)
    const strokes = doc.getArray('strokes')
    const mk = (id, color, points) => {
      const m = new Y.Map()
      m.set('id', id)
      m.set('color', color)
      m.set('width', 2)
      m.set('points', points)
      return m
    }
    strokes.push([
      mk('s0', 'red', [[0, 0], [10, 10], [20, 5]]),
      mk('s1', 'blue', [[5, 5], [6, 7]]),
      mk('s2', 'green', [[100, 100], [120, 80], [140, 100]])
    ])
    doc.getText('notes').insert(0, 'Half of 8 is 4. ½ = 0.5 ✓')
  })
}

test('live restore: two connected clients return to the snapshot without reconnecting', async () => {
  const srv = await server()
  const sid = sessionId('restore')
  const tutorToken = srv.token({ sub: 'tutor-http', sid, role: 'tutor' })
  const a = client(srv, sid, { role: 'tutor', sub: 'tutor-a' })
  const b = client(srv, sid, { role: 'tutor', sub: 'tutor-b' })
  await a.synced()
  await b.synced()
  const wsA = a.provider.ws
  const wsB = b.provider.ws
  assert.ok(wsA && wsB)

  // version 1
  writeVersion1(a.doc)
  const v1 = content(a.doc)
  assert.equal(v1.strokes.length, 3)
  await converged([a, b], v1, 'version-1 content at b')

  const snap = await api(srv, 'POST', `/api/v2/session/${sid}/snapshots`, tutorToken)
  assert.equal(snap.status, 201, `POST snapshots: ${show(snap)}`)
  assert.ok(snap.json && Number.isInteger(snap.json.version) && snap.json.version >= 1, `POST snapshots body: ${show(snap)}`)
  const N = snap.json.version

  // the snapshot itself holds version 1
  const got = await api(srv, 'GET', `/api/v2/session/${sid}/snapshots/${N}`, tutorToken)
  assert.equal(got.status, 200, `GET snapshot ${N}: ${show(got)}`)
  assert.deepStrictEqual(contentOfUpdate(got.body), v1, `GET snapshot ${N} content`)

  // both edit
  a.doc.transact(() => {
    a.doc.getMap('board').set('title', 'Fractions — lesson 1 (edited)')
    a.doc.getArray('strokes').delete(1, 1) // s1 gone
    const m = new Y.Map()
    m.set('id', 's3')
    m.set('color', 'black')
    m.set('width', 4)
    m.set('points', [[1, 1]])
    a.doc.getArray('strokes').push([m])
    a.doc.getText('notes').insert(0, 'A wrote this. ')
  })
  b.doc.transact(() => {
    const m = new Y.Map()
    m.set('id', 's4')
    m.set('color', 'purple')
    m.set('width', 1)
    m.set('points', [[9, 9], [8, 8]])
    b.doc.getArray('strokes').push([m])
    const notes = b.doc.getText('notes')
    notes.insert(notes.length, ' B typed more.')
    b.doc.getMap('board').set('erasedBy', 'tutor-b')
  })
  await converged([a, b], null, 'edits after the snapshot to converge')
  const edited = content(a.doc)
  assert.notDeepStrictEqual(edited, v1)
  assert.deepStrictEqual(edited.strokes.map((s) => s.id).sort(), ['s0', 's2', 's3', 's4'])
  assert.equal(edited.board.erasedBy, 'tutor-b')
  assert.match(edited.notes, /A wrote this\./)
  assert.match(edited.notes, /B typed more\./)

  // references held before the restore (entries unchanged between version 1 and now)
  const refs = {}
  for (const [name, c] of [['a', a], ['b', b]]) {
    refs[name] = {
      settings: c.doc.getMap('board').get('settings'),
      stroke0: c.doc.getArray('strokes').get(0)
    }
    assert.ok(refs[name].settings instanceof Y.Map)
    assert.equal(refs[name].stroke0.get('id'), 's0')
  }
  const statusesBefore = { a: a.statuses.slice(), b: b.statuses.slice() }
  const seenStatus = { a: [], b: [] }
  const onA = (e) => seenStatus.a.push(e.status)
  const onB = (e) => seenStatus.b.push(e.status)
  a.provider.on('status', onA)
  b.provider.on('status', onB)

  // restore N
  const res = await api(srv, 'POST', `/api/v2/session/${sid}/snapshots/${N}/restore`, tutorToken)
  assert.equal(res.status, 200, `POST restore ${N}: ${show(res)}`)
  assert.ok(res.json && Number.isInteger(res.json.version), `POST restore body: ${show(res)}`)
  assert.ok(res.json.version > N, `restore must record a new version > ${N}: ${show(res)}`)
  const NEW = res.json.version

  await converged([a, b], v1, 'both clients to show version-1 content after the restore')
  assert.deepStrictEqual(stateVector(a.doc), stateVector(b.doc))

  // no reconnect: same socket objects, no status change, no close
  a.provider.off('status', onA)
  b.provider.off('status', onB)
  assert.strictEqual(a.provider.ws, wsA, 'a reconnected (provider.ws changed)')
  assert.strictEqual(b.provider.ws, wsB, 'b reconnected (provider.ws changed)')
  assert.deepStrictEqual(seenStatus, { a: [], b: [] }, 'status events during the restore')
  assert.deepStrictEqual({ a: a.statuses, b: b.statuses }, statusesBefore)
  assert.ok(!a.statuses.includes('disconnected') && !b.statuses.includes('disconnected'), JSON.stringify({ a: a.statuses, b: b.statuses }))
  assert.deepStrictEqual(a.closes, [])
  assert.deepStrictEqual(b.closes, [])
  assert.equal(a.sockets.length, 1)
  assert.equal(b.sockets.length, 1)
  assert.ok(a.provider.wsconnected && b.provider.wsconnected)

  // only the differing parts were applied: unchanged nested types are the same instances
  for (const [name, c] of [['a', a], ['b', b]]) {
    assert.ok(c.doc.getMap('board').get('settings') === refs[name].settings,
      `${name}: board.settings (unchanged between versions) was replaced by a new Y.Map`)
    assert.ok(c.doc.getArray('strokes').get(0) === refs[name].stroke0,
      `${name}: strokes[0] (s0, unchanged between versions) was replaced by a new Y.Map`)
  }

  // the new version holds version-1 content too
  const gotNew = await api(srv, 'GET', `/api/v2/session/${sid}/snapshots/${NEW}`, tutorToken)
  assert.equal(gotNew.status, 200, `GET snapshot ${NEW}: ${show(gotNew)}`)
  assert.deepStrictEqual(contentOfUpdate(gotNew.body), v1, `GET snapshot ${NEW} (the restore's version) content`)

  // editing goes on normally, both ways
  a.doc.transact(() => {
    a.doc.getMap('board').set('title', 'after restore')
    const m = new Y.Map()
    m.set('id', 's5')
    m.set('color', 'orange')
    a.doc.getArray('strokes').push([m])
    a.doc.getText('notes').insert(0, '>> ')
  })
  const afterA = content(a.doc)
  assert.deepStrictEqual(afterA, {
    board: { ...v1.board, title: 'after restore' },
    strokes: [...v1.strokes, { id: 's5', color: 'orange' }],
    notes: '>> ' + v1.notes
  })
  await converged([a, b], afterA, 'a\'s edit after the restore to reach b')
  b.doc.getMap('board').get('settings').set('grid', false)
  await waitFor(() => a.doc.getMap('board').get('settings').get('grid') === false, { what: 'b\'s edit after the restore to reach a' })
  await converged([a, b], null, 'final convergence')

  // a late joiner gets the same document from the server
  const late = client(srv, sid, { role: 'student', sub: 'late' })
  await late.synced()
  await converged([a, b, late], null, 'late joiner after the restore')
  assert.deepStrictEqual(a.closes, [])
  assert.deepStrictEqual(b.closes, [])
})

test('export: HTTP route, CLI through the server and CLI on the data dir all load with Y.applyUpdate', async () => {
  const srv = await server()
  const sid = sessionId('export')
  const tutorToken = srv.token({ sub: 'tutor-cli', sid, role: 'tutor' })
  const a = client(srv, sid, { role: 'tutor', sub: 'tutor-a' })
  await a.synced()
  writeVersion1(a.doc)
  a.doc.getArray('strokes').delete(1, 1)
  a.doc.getText('notes').insert(0, 'Edited: ')
  a.doc.getMap('board').set('meta', { plain: 'json object', n: [1, 2, 3], flag: null })
  const expected = content(a.doc)

  // the server has it once a second client sees it
  const b = client(srv, sid, { role: 'viewer', sub: 'viewer-b' })
  await b.synced()
  await converged([a, b], expected, 'content at a second client')

  const snap = await api(srv, 'POST', `/api/v2/session/${sid}/snapshots`, tutorToken)
  assert.equal(snap.status, 201, `POST snapshots: ${show(snap)}`)
  assert.ok(snap.json && Number.isInteger(snap.json.version), `POST snapshots body: ${show(snap)}`)
  const N = snap.json.version

  // 1. HTTP route
  const got = await api(srv, 'GET', `/api/v2/session/${sid}/snapshots/${N}`, tutorToken)
  assert.equal(got.status, 200, `GET snapshot ${N}: ${show(got)}`)
  assert.deepStrictEqual(contentOfUpdate(got.body), expected, 'GET /snapshots/N loaded with Y.applyUpdate')
  // ?token= works as well as the header
  const gotQ = await api(srv, 'GET', `/api/v2/session/${sid}/snapshots/${N}?token=${tutorToken}`)
  assert.equal(gotQ.status, 200, `GET snapshot ${N} with ?token=: ${show(gotQ)}`)
  assert.deepStrictEqual(contentOfUpdate(gotQ.body), expected)

  // 2. CLI through the server
  const viaServer = join(srv.tmp, 'via-server.update')
  const args1 = ['snapshot', 'export', sid, '--version', String(N), '--out', viaServer, '--server', srv.httpUrl, '--token', tutorToken]
  const r1 = await easel(args1, { cwd: srv.tmp })
  assert.equal(r1.code, 0, showRun(args1, r1))
  assert.ok(existsSync(viaServer), `no output file: ${showRun(args1, r1)}`)
  const bytes1 = readFileSync(viaServer)
  assert.deepStrictEqual(contentOfUpdate(bytes1), expected, 'CLI export --server loaded with Y.applyUpdate')

  // inspect of that file
  const args2 = ['snapshot', 'inspect', viaServer]
  const r2 = await easel(args2, { cwd: srv.tmp })
  assert.equal(r2.code, 0, showRun(args2, r2))
  let inspected
  try {
    inspected = JSON.parse(r2.stdout.toString('utf8'))
  } catch (e) {
    assert.fail(`inspect output is not JSON (${e.message}): ${showRun(args2, r2)}`)
  }
  assert.deepStrictEqual(inspected, expected, 'snapshot inspect FILE (via server)')

  // 3. stop the server (SIGTERM, exit 0), then the CLI on the data dir
  destroyAll(clients)
  const stopped = await srv.stop({ keepDataDir: true })
  assert.equal(stopped.code, 0, `server exit: ${JSON.stringify(stopped)}`)
  assert.equal(stopped.killed, false)

  const fromDir = join(srv.tmp, 'from-dir.update')
  const args3 = ['snapshot', 'export', sid, '--version', String(N), '--out', fromDir, '--data-dir', srv.dataDir]
  const r3 = await easel(args3, { cwd: srv.tmp })
  assert.equal(r3.code, 0, showRun(args3, r3))
  const bytes3 = readFileSync(fromDir)
  assert.deepStrictEqual(contentOfUpdate(bytes3), expected, 'CLI export --data-dir --version N loaded with Y.applyUpdate')

  // the current state (no --version) from the data dir: nothing changed since N
  const current = join(srv.tmp, 'current.update')
  const args4 = ['snapshot', 'export', sid, '--out', current, '--data-dir', srv.dataDir]
  const r4 = await easel(args4, { cwd: srv.tmp })
  assert.equal(r4.code, 0, showRun(args4, r4))
  assert.deepStrictEqual(contentOfUpdate(readFileSync(current)), expected, 'CLI export --data-dir (current state)')

  const args5 = ['snapshot', 'inspect', fromDir]
  const r5 = await easel(args5, { cwd: srv.tmp })
  assert.equal(r5.code, 0, showRun(args5, r5))
  let inspected2
  try {
    inspected2 = JSON.parse(r5.stdout.toString('utf8'))
  } catch (e) {
    assert.fail(`inspect output is not JSON (${e.message}): ${showRun(args5, r5)}`)
  }
  assert.deepStrictEqual(inspected2, {
    board: expected.board,
    strokes: expected.strokes,
    notes: expected.notes
  }, 'snapshot inspect FILE (from the data dir)')
  rmSync(fromDir, { force: true })
})
