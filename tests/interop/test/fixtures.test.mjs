// Replays the recorded fixture streams (fixtures/*.updates) through the server on a raw
// y-websocket connection, and checks what real JS clients get back (live relay and late join).
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { readFileSync, readdirSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import * as encoding from 'lib0/encoding'
import { waitFor, sessionId } from '../lib/server.mjs'
import { WebSocket, stateVector } from '../lib/client.mjs'
import { sharedServer } from '../lib/harness.mjs'

const fixturesDir = join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..', 'fixtures')

function readUpdates (path) {
  const buf = readFileSync(path)
  const out = []
  let off = 0
  while (off < buf.length) {
    const len = buf.readUInt32BE(off)
    off += 4
    assert.ok(off + len <= buf.length, `truncated record in ${path}`)
    out.push(new Uint8Array(buf.buffer, buf.byteOffset + off, len))
    off += len
  }
  return out
}

const contentOf = (doc, roots) => {
  const out = {}
  for (const { name, kind } of roots) {
    if (kind === 'map') out[name] = doc.getMap(name).toJSON()
    else if (kind === 'array') out[name] = doc.getArray(name).toJSON()
    else if (kind === 'text') out[name] = doc.getText(name).toString()
  }
  return out
}

let server
const client = sharedServer((s) => { server = s })

const names = readdirSync(fixturesDir).filter((f) => f.endsWith('.updates')).map((f) => f.slice(0, -'.updates'.length)).sort()

test('fixtures exist', () => {
  assert.ok(names.length >= 3, `fixtures in ${fixturesDir}: ${names}`)
})

// `edge-*` fixtures probe corner cases (see fixtures/README.md); they are tested like the others.
for (const name of names) {
  test(`fixture ${name}: replayed through the server, JS clients see the expected content`, async () => {
    const meta = JSON.parse(readFileSync(join(fixturesDir, `${name}.json`), 'utf8'))
    const updates = readUpdates(join(fixturesDir, `${name}.updates`))
    assert.equal(updates.length, meta.update_count)
    const sid = sessionId('fx')

    // a live client that watches the relay
    const watcher = client(sid, { localAwarenessNull: true })
    await watcher.synced()

    // the replaying "client": a raw socket sending one sync-update message per frame
    const token = server.token({ sub: 'replayer', sid })
    const ws = new WebSocket(`${server.whiteboardUrl(sid)}?token=${encodeURIComponent(token)}`)
    const closed = []
    ws.on('close', (code, reason) => closed.push({ code, reason: reason.toString() }))
    await new Promise((resolve, reject) => { ws.once('open', resolve); ws.once('error', reject) })
    for (const u of updates) {
      const e = encoding.createEncoder()
      encoding.writeVarUint(e, 0) // sync
      encoding.writeVarUint(e, 2) // update
      encoding.writeVarUint8Array(e, u)
      ws.send(encoding.toUint8Array(e))
    }
    await waitFor(() => {
      try { assert.deepStrictEqual(contentOf(watcher.doc, meta.roots), meta.expected); return true } catch { return false }
    }, { timeout: 15000, what: `${name}: relayed content at the watcher`, describe: () => ({ got: contentOf(watcher.doc, meta.roots), closed }) })
    assert.deepStrictEqual(stateVector(watcher.doc), Object.fromEntries(Object.entries(meta.state_vector).map(([k, v]) => [Number(k), v])))
    assert.deepStrictEqual(closed, [], 'the server closed the replaying connection')
    ws.close()

    // a late joiner gets the same from the server's document
    const late = client(sid)
    await late.synced()
    assert.deepStrictEqual(contentOf(late.doc, meta.roots), meta.expected)
    if (meta.text_deltas) {
      for (const [n, delta] of Object.entries(meta.text_deltas)) assert.deepStrictEqual(late.doc.getText(n).toDelta(), delta)
    }
    assert.deepStrictEqual(watcher.closes, [])
  })
}
