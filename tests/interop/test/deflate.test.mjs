// permessage-deflate with the `ws` package y-websocket runs on in Node: the extension is
// negotiated (unless EASEL_WS_DEFLATE=0 turns the offer off) and a board large enough to
// go out compressed, written by one client (compressed by `ws`) and joined by another
// (compressed by the server), arrives whole.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { waitFor, sessionId } from '../lib/server.mjs'
import { sharedServer } from '../lib/harness.mjs'

const client = sharedServer(() => {})
const offered = process.env.EASEL_WS_DEFLATE !== '0'

test('a large board crosses compressed both ways when deflate is offered', async () => {
  const sid = sessionId('deflate')
  const a = client(sid)
  await a.synced()
  const ws = a.provider.ws
  assert.equal(ws.extensions, offered ? 'permessage-deflate' : '')
  const text = 'the quick brown fox jumps over the lazy dog '.repeat(20000) // ~880 kB
  a.doc.getText('text').insert(0, text)
  const b = client(sid)
  await b.synced()
  await waitFor(() => b.doc.getText('text').length === text.length, { what: 'the board to reach the joiner' })
  assert.equal(b.doc.getText('text').toString(), text)
  assert.equal(b.provider.ws.extensions, offered ? 'permessage-deflate' : '')
})
