// Bytes on the wire for joining a ~20 MB board, with and without permessage-deflate; the
// second deflate join shows the compressed form reused. Not a test (node --test test/ skips
// it): EASEL_BIN=/abs/path/easel node measure-join.mjs
import { startServer, sessionId } from './lib/server.mjs'
import * as Y from 'yjs'
import WebSocket from 'ws'
import * as encoding from 'lib0/encoding'

const server = await startServer({ configToml: '[limits]\nmax_doc_bytes = 67108864\n' })
const sid = sessionId('measure')
const url = (sub) => `${server.whiteboardUrl(sid)}?token=${encodeURIComponent(server.token({ sub, sid }))}`
const open = (u, deflate) => new Promise((resolve, reject) => {
  const ws = new WebSocket(u, { perMessageDeflate: deflate })
  ws.binaryType = 'nodebuffer'
  ws.on('open', () => resolve(ws)); ws.on('error', reject)
})
const msgUpdate = (u) => { const e = encoding.createEncoder(); encoding.writeVarUint(e, 0); encoding.writeVarUint(e, 2); encoding.writeVarUint8Array(e, u); return encoding.toUint8Array(e) }

// A board of strokes: random-walk points, as a drawing app stores them.
const doc = new Y.Doc()
const strokes = doc.getArray('strokes')
const writer = await open(url('writer'), false)
let total = 0
let rnd = 12345
const rand = () => { rnd = (rnd * 1103515245 + 12345) & 0x7fffffff; return rnd }
while (total < 20e6) {
  let batch = null
  doc.once('update', (u) => { batch = u })
  doc.transact(() => {
    for (let s = 0; s < 500; s++) {
      const m = new Y.Map()
      let x = rand() % 1000; let y = rand() % 1000
      const pts = []
      for (let i = 0; i < 100; i++) { x += rand() % 7 - 3; y += rand() % 7 - 3; pts.push(x, y) }
      m.set('points', pts); m.set('color', ['#000', '#e33', '#36c'][rand() % 3]); m.set('width', 1 + rand() % 5)
      strokes.push([m])
    }
  })
  total += batch.length
  writer.send(msgUpdate(batch))
  await new Promise((r) => setTimeout(r, 200))
}
const full = Y.encodeStateAsUpdate(doc).length
console.log(`board: ${full} bytes as one update (${total} sent in batches)`)
await new Promise((r) => setTimeout(r, 3000))

for (const deflate of [false, true, true]) {
  const t0 = Date.now()
  const ws = await open(url('joiner'), deflate)
  const step2 = await new Promise((resolve) => {
    ws.on('message', (d) => { if (d[0] === 0 && d[1] === 1) resolve(d) })
    ws.send(Uint8Array.from([0, 0, 1, 0]))
  })
  console.log(`deflate=${deflate} negotiated='${ws.extensions}': step 2 ${step2.length} bytes, wire bytes read ${ws._socket.bytesRead}, ${Date.now() - t0} ms`)
  ws.close()
}
writer.close()
await server.stop()
