// The viewer role: reads the whiteboard, cannot change it, keeps its connection and its cursor.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { waitFor, sessionId } from '../lib/server.mjs'
import { sharedServer } from '../lib/harness.mjs'

let server
const client = sharedServer((s) => { server = s })

const board = (doc) => ({
  notes: doc.getMap('notes').toJSON(),
  strokes: doc.getArray('strokes').toJSON()
})

test('a viewer receives edits, its own edits reach nobody, and it stays connected', async () => {
  const sid = sessionId('viewer')
  const writer = client(sid, { role: 'student' })
  const tutor = client(sid, { role: 'tutor' })
  const viewer = client(sid, { role: 'viewer' })
  await writer.synced()
  await tutor.synced()
  await viewer.synced()

  // 1. the viewer receives edits
  writer.doc.getMap('notes').set('n1', { text: 'from writer', x: 10, y: 20 })
  writer.doc.getArray('strokes').push([{ id: 's1', points: [0, 0, 5, 5] }])
  const afterWriter = {
    notes: { n1: { text: 'from writer', x: 10, y: 20 } },
    strokes: [{ id: 's1', points: [0, 0, 5, 5] }]
  }
  await waitFor(() => viewer.doc.getArray('strokes').length === 1 && viewer.doc.getMap('notes').has('n1'), {
    what: 'viewer to receive the writer\'s edits', describe: () => viewer.describe()
  })
  assert.deepStrictEqual(board(viewer.doc), afterWriter)

  // 2. the viewer edits: the server drops it and answers auth "permission denied: read-only"
  viewer.doc.getMap('notes').set('hacked', { text: 'from viewer' })
  viewer.doc.getArray('strokes').delete(0, 1)
  await waitFor(() => viewer.authDenied.length > 0, {
    what: 'auth message (permission denied, read-only) after the viewer\'s update', describe: () => viewer.describe()
  })
  assert.deepStrictEqual(viewer.authDenied[0], { kind: 0, reason: 'read-only' })

  // 3. the writer edits again; once this later edit reached everyone, the viewer's earlier
  //    edit would have too, had it been relayed
  tutor.doc.getMap('notes').set('n2', { text: 'from tutor' })
  const expected = {
    notes: { n1: { text: 'from writer', x: 10, y: 20 }, n2: { text: 'from tutor' } },
    strokes: [{ id: 's1', points: [0, 0, 5, 5] }]
  }
  await waitFor(() => writer.doc.getMap('notes').has('n2') && viewer.doc.getMap('notes').has('n2'), {
    what: 'tutor edit at writer and viewer'
  })
  assert.deepStrictEqual(board(writer.doc), expected)
  assert.deepStrictEqual(board(tutor.doc), expected)

  // a client joining now gets the server's document: without the viewer's edit
  const late = client(sid)
  await late.synced()
  assert.deepStrictEqual(board(late.doc), expected)

  // 4. the viewer's connection is still the same open socket; its awareness is relayed
  assert.equal(viewer.provider.wsconnected, true)
  assert.equal(viewer.sockets.length, 1, 'viewer reconnected')
  assert.deepStrictEqual(viewer.closes, [])
  assert.ok(!viewer.statuses.includes('disconnected'), JSON.stringify(viewer.statuses))
  viewer.awareness.setLocalStateField('cursor', { x: 3, y: 4 })
  await waitFor(() => writer.awareness.getStates().get(viewer.doc.clientID)?.cursor?.x === 3, {
    what: 'viewer cursor at writer'
  })

  // 5. the viewer keeps getting later edits and more viewer edits are still dropped
  viewer.doc.getText('t').insert(0, 'viewer text')
  writer.doc.getText('t').insert(0, 'writer text')
  await waitFor(() => viewer.doc.getText('t').toString().includes('writer text'), { what: 'writer text at viewer' })
  // fence: a query-awareness round trip on the viewer's socket is answered after the
  // server handled the viewer's update sent before it
  const seen = viewer.awarenessMessages.length
  viewer.provider.ws.send(new Uint8Array([3]))
  await waitFor(() => viewer.awarenessMessages.length > seen, { what: 'query awareness answer (fence)' })
  await waitFor(() => tutor.doc.getText('t').toString() === 'writer text', { what: 'writer text at tutor' })
  assert.equal(tutor.doc.getText('t').toString(), 'writer text')
  for (const d of viewer.authDenied) assert.deepStrictEqual(d, { kind: 0, reason: 'read-only' })
  assert.deepStrictEqual(viewer.closes, [])

  // the server is fine: a new writer still syncs everything
  const fresh = client(sid)
  await fresh.synced()
  assert.deepStrictEqual(board(fresh.doc), expected)
  assert.equal(fresh.doc.getText('t').toString(), 'writer text')
})

test('a viewer with offline edits connects, its edits are not taken, it still syncs down', async () => {
  const sid = sessionId('viewoff')
  const writer = client(sid)
  await writer.synced()
  writer.doc.getMap('notes').set('w', 1)

  const viewer = client(sid, { role: 'viewer', connect: false })
  viewer.doc.getMap('notes').set('offline-viewer', 1)
  viewer.provider.connect()
  await viewer.synced()
  await waitFor(() => viewer.doc.getMap('notes').get('w') === 1, { what: 'writer note at viewer' })

  const late = client(sid)
  await late.synced()
  assert.deepStrictEqual(late.doc.getMap('notes').toJSON(), { w: 1 })
  writer.doc.getMap('notes').set('w2', 2)
  await waitFor(() => viewer.doc.getMap('notes').get('w2') === 2, { what: 'later edit at viewer' })
  assert.deepStrictEqual(writer.doc.getMap('notes').toJSON(), { w: 1, w2: 2 })
  assert.deepStrictEqual(viewer.closes, [])
})
