#!/usr/bin/env node
// Records realistic Yjs update streams, exactly as the JS client emits them (doc.on('update'),
// Yjs v1 encoding), into ../../fixtures/. No server needed. Deterministic: fixed client ids and a
// seeded PRNG, so re-running it reproduces the same bytes (for the same yjs version).
//
//   cd tests/interop && npm ci && node record-fixtures.mjs     (or: npm run record-fixtures)
//
// For each fixture NAME it writes:
//   NAME.updates   the stream: [u32 big-endian length][update bytes], repeated
//   NAME.json      what the document must contain after applying every update in order
//   NAME.state.bin the final document as one Yjs v1 update (Y.encodeStateAsUpdate)
import * as Y from 'yjs'
import { writeFileSync, mkdirSync, readFileSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import assert from 'node:assert/strict'

const here = dirname(fileURLToPath(import.meta.url))
const outDir = process.argv[2] || join(here, '..', '..', 'fixtures')
const yjsVersion = JSON.parse(readFileSync(join(here, 'node_modules', 'yjs', 'package.json'), 'utf8')).version

/** mulberry32: a small seeded PRNG */
function prng (seed) {
  let a = seed >>> 0
  const next = () => {
    a = (a + 0x6D2B79F5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
  return {
    next,
    int: (lo, hi) => lo + Math.floor(next() * (hi - lo + 1)), // inclusive
    pick: (arr) => arr[Math.floor(next() * arr.length)],
    coord: () => Math.round(next() * 8000) / 10 // 0.0 .. 800.0, one decimal (float64 / float32 / int on the wire)
  }
}

const REMOTE = Symbol('remote')

/** A client doc with a fixed client id whose local updates go into `stream`. */
function clientDoc (clientID, stream) {
  const doc = new Y.Doc()
  doc.clientID = clientID
  doc.on('update', (update, origin) => {
    if (origin !== REMOTE) stream.push({ client: clientID, update })
  })
  return doc
}

/** Type `s` into `text` at `index`, one character (code point) per transaction, like a keyboard. */
function typeInto (doc, text, index, s, attrs) {
  for (const ch of s) {
    doc.transact(() => text.insert(index, ch, attrs))
    index += ch.length // Yjs indexes are UTF-16 code units
  }
  return index
}

/** Backspace `n` code units before `index`, one transaction per key press. */
function backspace (doc, text, index, n) {
  for (let i = 0; i < n; i++) {
    doc.transact(() => text.delete(index - 1, 1))
    index--
  }
  return index
}

/** Draw a stroke: one transaction to create it, then one per pointer move, then one to finish. */
function drawStroke (doc, strokes, rnd, { id, color, tool = 'pen', moves }) {
  const stroke = new Y.Map()
  const points = new Y.Array()
  doc.transact(() => {
    stroke.set('id', id)
    stroke.set('tool', tool)
    stroke.set('color', color)
    stroke.set('width', rnd.pick([1, 2, 2.5, 4]))
    stroke.set('points', points)
    strokes.push([stroke])
  })
  let x = rnd.coord()
  let y = rnd.coord()
  for (let i = 0; i < moves; i++) {
    x = Math.round((x + (rnd.next() - 0.4) * 40) * 10) / 10
    y = Math.round((y + (rnd.next() - 0.5) * 40) * 10) / 10
    doc.transact(() => points.push([x, y]))
  }
  doc.transact(() => stroke.set('done', true))
  return stroke
}

/** Create a sticky note (a Y.Map with a Y.Text body) and type its text. */
function addNote (doc, notes, { id, x, y, color, body }) {
  const note = new Y.Map()
  const text = new Y.Text()
  doc.transact(() => {
    note.set('x', x)
    note.set('y', y)
    note.set('color', color)
    note.set('author', { id: `u${doc.clientID}`, name: `User ${doc.clientID}` })
    note.set('text', text)
    notes.set(id, note)
  })
  typeInto(doc, text, 0, body)
  return note
}

/** Bring two docs up to date with each other, as a relay would (only what is missing). */
function exchange (a, b) {
  const ua = Y.encodeStateAsUpdate(a, Y.encodeStateVector(b))
  const ub = Y.encodeStateAsUpdate(b, Y.encodeStateVector(a))
  Y.applyUpdate(b, ua, REMOTE)
  Y.applyUpdate(a, ub, REMOTE)
}

// ---------------------------------------------------------------------------------------------

function whiteboardSession () {
  const stream = []
  const rnd = prng(1)
  const doc = clientDoc(1001, stream)
  const title = doc.getText('title')
  const strokes = doc.getArray('strokes')
  const notes = doc.getMap('notes')
  const meta = doc.getMap('meta')

  doc.transact(() => {
    meta.set('background', 'grid')
    meta.set('zoom', 1)
    meta.set('created_by', 'tutor-7')
  })
  let at = typeInto(doc, title, 0, 'Quadratic equatoins')
  at = backspace(doc, title, at, 5) // fix the typo
  typeInto(doc, title, at, 'tions — lesson 3')

  const colors = ['#1e1e1e', '#e03131', '#2f9e44', '#1971c2']
  for (let s = 0; s < 6; s++) {
    drawStroke(doc, strokes, rnd, { id: `stroke-${s}`, color: rnd.pick(colors), moves: rnd.int(8, 25) })
  }
  const n1 = addNote(doc, notes, { id: 'note-1', x: 120, y: 80.5, color: 'yellow', body: 'x = (-b ± √(b²-4ac)) / 2a' })
  addNote(doc, notes, { id: 'note-2', x: 420, y: 60, color: 'pink', body: 'Homework: p. 42, ex. 1-5' })
  addNote(doc, notes, { id: 'note-3', x: 300, y: 300, color: 'blue', body: 'temp' })
  // drag note-1 around: many small position updates
  for (let i = 0; i < 12; i++) {
    doc.transact(() => {
      n1.set('x', 120 + i * 7.5)
      n1.set('y', 80.5 + i * 3)
    })
  }
  // edit the note text: select "2a" and replace it
  const n1text = n1.get('text')
  const pos = n1text.toString().indexOf('2a')
  doc.transact(() => {
    n1text.delete(pos, 2)
    n1text.insert(pos, '(2a)')
  })
  // delete a note
  doc.transact(() => notes.delete('note-3'))
  // eraser removes stroke 2; undo brings it back (as new items); erase stroke 4 for good
  const undo = new Y.UndoManager(strokes, { captureTimeout: 0 })
  strokes.delete(2, 1)
  assert.equal(undo.undoStack.length, 1)
  undo.undo()
  doc.transact(() => strokes.delete(4, 1))
  // zoom changes and a highlighted region
  for (const z of [1.1, 1.25, 1.5]) doc.transact(() => meta.set('zoom', z))
  doc.transact(() => meta.set('highlight', { x: 100, y: 50, w: 300.5, h: 120, label: 'vertex form' }))
  drawStroke(doc, strokes, rnd, { id: 'stroke-6', color: '#f08c00', tool: 'highlighter', moves: 10 })

  return {
    name: 'whiteboard-session',
    description: 'One client (client id 1001) runs a whiteboard: a Y.Text title typed key by key with a typo fixed by backspace; strokes in a Y.Array of Y.Maps whose points grow by one Y.Array push per pointer move; sticky notes in a Y.Map of Y.Maps with a nested Y.Text body, dragged (repeated x/y sets), edited and one deleted; a stroke erased, undone (Y.UndoManager) and another erased for good; a meta Y.Map with JSON values.',
    docs: [doc],
    stream,
    roots: [['meta', 'map'], ['title', 'text'], ['strokes', 'array'], ['notes', 'map']]
  }
}

function textTyping () {
  const stream = []
  const doc = clientDoc(2002, stream)
  const text = doc.getText('notes')
  let at = typeInto(doc, text, 0, 'Lesson notes\n')
  at = typeInto(doc, text, at, 'Today we factor x² + 5x + 6 = (x + 2)(x + 3). ')
  at = typeInto(doc, text, at, 'Très bien! 👍🏽 ')
  at = typeInto(doc, text, at, '二次方程式\n')
  // make the heading bold, and the equation italic
  doc.transact(() => text.format(0, 'Lesson notes'.length, { bold: true }))
  const eq = text.toString().indexOf('x² + 5x + 6')
  doc.transact(() => text.format(eq, 'x² + 5x + 6 = (x + 2)(x + 3)'.length, { italic: true }))
  // a pasted paragraph (one transaction)
  doc.transact(() => text.insert(text.length, 'Check: (x + 2)(x + 3) = x² + 3x + 2x + 6 = x² + 5x + 6.\n'))
  // type in the middle with a formatting attribute (like typing inside bold text)
  const mid = text.toString().indexOf('Today')
  typeInto(doc, text, mid, '[important] ', { bold: true })
  // backspace over the emoji (👍 plus a skin-tone modifier 🏽: two code points, each a surrogate
  // pair): one key press per code point, each deleting 2 UTF-16 code units, as editors do
  const thumbEnd = text.toString().indexOf('👍🏽') + '👍🏽'.length
  doc.transact(() => text.delete(thumbEnd - 2, 2))
  doc.transact(() => text.delete(thumbEnd - 4, 2))
  // select-and-delete a range, then retype something else
  const from = text.toString().indexOf('Très bien! ')
  doc.transact(() => text.delete(from, 'Très bien! '.length))
  typeInto(doc, text, from, 'Great! ')
  // delete the last line partly
  const checkAt = text.toString().indexOf(' = x² + 3x')
  doc.transact(() => text.delete(checkAt, ' = x² + 3x + 2x + 6'.length))
  // remove a formatting attribute from part of the heading
  doc.transact(() => text.format(0, 6, { bold: null }))
  return {
    name: 'text-typing',
    description: 'One client (client id 2002) types a Y.Text "notes" character by character: non-ASCII (², è, emoji with a skin-tone modifier, CJK), bold/italic formatting, formatted typing, a paste, backspacing over an emoji one code point (2 UTF-16 units) at a time, range deletes, un-formatting.',
    docs: [doc],
    stream,
    roots: [['notes', 'text']],
    deltas: ['notes']
  }
}

function textSurrogateSplit () {
  // Edge case: Yjs offsets are UTF-16 code units, so a JS client can delete or insert *inside* a
  // surrogate pair. Yjs then replaces each orphaned half with U+FFFD (length kept at 1 unit).
  const stream = []
  const doc = clientDoc(4004, stream)
  const text = doc.getText('text')
  typeInto(doc, text, 0, 'smile 😀 thumbs 👍🏽 end')
  // delete one code unit in the middle of 😀 (splits the pair)
  const smile = text.toString().indexOf('😀')
  doc.transact(() => text.delete(smile + 1, 1))
  // backspace one code unit at a time over 👍🏽 (4 units: each press orphans half a pair)
  const thumbEnd = text.toString().indexOf('👍🏽') + '👍🏽'.length
  backspace(doc, text, thumbEnd, 3)
  // insert between the halves of a pair
  typeInto(doc, text, text.length, ' 🎉')
  doc.transact(() => text.insert(text.length - 1, 'x'))
  typeInto(doc, text, text.length, ' done')
  return {
    name: 'edge-text-surrogate-split',
    description: 'Edge case (one client, client id 4004): Y.Text edits at UTF-16 offsets inside surrogate pairs (deleting half of an emoji, backspacing one code unit at a time, inserting between the halves). Yjs keeps lengths by replacing orphaned halves with U+FFFD; a peer that does not do the same diverges from here on.',
    docs: [doc],
    stream,
    roots: [['text', 'text']]
  }
}

function concurrentClients () {
  const stream = []
  const rnd = prng(3)
  const a = clientDoc(3001, stream)
  const b = clientDoc(3002, stream)
  const docs = [a, b]
  // shared setup by a, delivered to b
  a.transact(() => {
    a.getMap('meta').set('title', 'Geometry')
    a.getText('text').insert(0, 'Triangle facts:\n')
  })
  exchange(a, b)
  let strokeNo = 0
  let noteNo = 0
  for (let step = 0; step < 60; step++) {
    const doc = rnd.pick(docs)
    const who = doc === a ? 'A' : 'B'
    const action = rnd.int(0, 5)
    const text = doc.getText('text')
    const strokes = doc.getArray('strokes')
    const notes = doc.getMap('notes')
    if (action === 0) {
      drawStroke(doc, strokes, rnd, { id: `${who}-stroke-${strokeNo++}`, color: who === 'A' ? '#e03131' : '#1971c2', moves: rnd.int(2, 6) })
    } else if (action === 1) {
      // both type at the same place (end, or after the heading)
      const at = rnd.next() < 0.5 ? text.length : 'Triangle facts:\n'.length
      typeInto(doc, text, at, `${who}${step} `)
    } else if (action === 2) {
      // conflicting writes to the same key
      doc.transact(() => doc.getMap('meta').set('color', `${who}-${step}`))
    } else if (action === 3) {
      addNote(doc, notes, { id: `${who}-note-${noteNo++}`, x: rnd.coord(), y: rnd.coord(), color: 'yellow', body: `angle sum ${step}` })
    } else if (action === 4 && strokes.length > 0) {
      // erase a stroke the client can see (maybe concurrently with the other moving it)
      const i = rnd.int(0, strokes.length - 1)
      doc.transact(() => strokes.delete(i, 1))
    } else if (action === 5 && text.length > 20) {
      const i = rnd.int(16, text.length - 3)
      doc.transact(() => text.delete(i, 2))
    } else {
      doc.transact(() => doc.getMap('meta').set(`touch-${who}`, step))
    }
    // the relay delivers in batches: sometimes both ways, sometimes one way, sometimes not yet
    const r = rnd.next()
    if (r < 0.2) exchange(a, b)
    else if (r < 0.3) Y.applyUpdate(b, Y.encodeStateAsUpdate(a, Y.encodeStateVector(b)), REMOTE)
    else if (r < 0.4) Y.applyUpdate(a, Y.encodeStateAsUpdate(b, Y.encodeStateVector(a)), REMOTE)
  }
  exchange(a, b)
  return {
    name: 'concurrent-clients',
    description: 'Two clients (client ids 3001 and 3002) edit the same whiteboard concurrently: strokes, sticky notes, typing at the same text positions, conflicting map keys, deleting strokes the other may be drawing; their local updates are delivered to each other in batches, so many updates are concurrent. The stream is every local update of both clients in the order they were made (what a relay receives); each update depends only on updates earlier in the stream.',
    docs,
    stream,
    roots: [['meta', 'map'], ['text', 'text'], ['strokes', 'array'], ['notes', 'map']]
  }
}

// ---------------------------------------------------------------------------------------------

const contentOf = (doc, roots) => {
  const out = {}
  for (const [name, kind] of roots) {
    if (kind === 'map') out[name] = doc.getMap(name).toJSON()
    else if (kind === 'array') out[name] = doc.getArray(name).toJSON()
    else if (kind === 'text') out[name] = doc.getText(name).toString()
    else throw new Error('unknown kind ' + kind)
  }
  return out
}

const stateVectorOf = (doc) => Object.fromEntries(
  Array.from(Y.decodeStateVector(Y.encodeStateVector(doc)).entries()).sort((x, y) => x[0] - y[0]).map(([k, v]) => [String(k), v]))

function writeFixture (fx) {
  const { name, description, docs, stream, roots } = fx
  const expected = contentOf(docs[0], roots)
  for (const d of docs.slice(1)) assert.deepStrictEqual(contentOf(d, roots), expected, `${name}: clients did not converge`)

  // replay check: the stream alone, applied in order to a fresh doc, gives the same content
  const replay = new Y.Doc()
  for (const { update } of stream) Y.applyUpdate(replay, update)
  assert.deepStrictEqual(contentOf(replay, roots), expected, `${name}: replay differs`)
  assert.equal(replay.store.pendingStructs, null, `${name}: replay left pending structs`)
  assert.equal(replay.store.pendingDs, null, `${name}: replay left a pending delete set`)

  const total = stream.reduce((n, { update }) => n + 4 + update.length, 0)
  const buf = Buffer.alloc(total)
  let off = 0
  for (const { update } of stream) {
    buf.writeUInt32BE(update.length, off)
    off += 4
    buf.set(update, off)
    off += update.length
  }
  writeFileSync(join(outDir, `${name}.updates`), buf)
  const state = Y.encodeStateAsUpdate(replay)
  writeFileSync(join(outDir, `${name}.state.bin`), state)

  const json = {
    name,
    description,
    generated_by: 'tests/interop/record-fixtures.mjs',
    yjs_version: yjsVersion,
    encoding: 'Yjs update v1 (Y.applyUpdate / yrs Update::decode_v1)',
    format: 'NAME.updates: repeated [u32 big-endian byte length][update bytes]; NAME.state.bin: the final document as one v1 update',
    update_count: stream.length,
    updates_file_bytes: total,
    client_ids: Array.from(new Set(stream.map((s) => s.client))),
    updates_per_client: Object.fromEntries(Array.from(new Set(stream.map((s) => s.client))).map((c) => [String(c), stream.filter((s) => s.client === c).length])),
    roots: roots.map(([n, kind]) => ({ name: n, kind })),
    state_vector: stateVectorOf(replay),
    expected
  }
  if (fx.deltas) {
    json.text_deltas = Object.fromEntries(fx.deltas.map((n) => [n, replay.getText(n).toDelta()]))
  }
  writeFileSync(join(outDir, `${name}.json`), JSON.stringify(json, null, 2) + '\n')
  console.log(`${name}: ${stream.length} updates, ${total} bytes (+ ${state.length} bytes state)`)
  return total + state.length
}

mkdirSync(outDir, { recursive: true })
let sum = 0
for (const make of [whiteboardSession, textTyping, concurrentClients, textSurrogateSplit]) sum += writeFixture(make())
console.log(`total binary ${sum} bytes in ${outDir}`)
