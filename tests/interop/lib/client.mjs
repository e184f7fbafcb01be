// Helpers around the real y-websocket WebsocketProvider.
import * as Y from 'yjs'
import { WebsocketProvider, messageAuth, messageAwareness } from 'y-websocket'
import * as decoding from 'lib0/decoding'
import NodeWebSocket from 'ws'
import { waitFor } from './server.mjs'

// `ws` offers permessage-deflate by default, as browsers do: the suite runs with it.
// EASEL_WS_DEFLATE=0 runs it again with no offer (every frame raw).
const WebSocket = process.env.EASEL_WS_DEFLATE === '0'
  ? class extends NodeWebSocket {
    constructor (url, protocols, options = {}) {
      super(url, protocols, { ...options, perMessageDeflate: false })
    }
  }
  : NodeWebSocket

export { Y, WebsocketProvider, WebSocket }

/**
 * A WebsocketProvider on `server`'s whiteboard for session `sid`, with bookkeeping:
 * statuses, connection-close events, sockets used, auth (permission denied) messages.
 *
 * @param {object} server   from startServer()
 * @param {string} sid
 * @param {object} [opts]
 * @param {string} [opts.sub]    token subject (default random)
 * @param {string} [opts.role]   token role (default: none -> student)
 * @param {string} [opts.name]
 * @param {'params'|'subprotocol'|'header'} [opts.auth]  how the token is sent (default 'params')
 * @param {string} [opts.token]  use this token instead of minting one
 * @param {boolean} [opts.localAwarenessNull]  set the awareness local state to null before connecting
 * @param {Y.Doc} [opts.doc]
 */
export function makeClient (server, sid, opts = {}) {
  const {
    sub = 'u-' + Math.random().toString(36).slice(2, 10),
    role,
    name,
    auth = 'params',
    localAwarenessNull = false
  } = opts
  const claims = { sub, sid }
  if (role) claims.role = role
  if (name) claims.name = name
  const token = opts.token || server.token(claims)
  const doc = opts.doc || new Y.Doc()

  let WS = WebSocket
  let params = {}
  let protocols = []
  if (auth === 'params') {
    params = { token }
  } else if (auth === 'subprotocol') {
    protocols = ['easel', 'bearer.' + token]
  } else if (auth === 'header') {
    WS = class extends WebSocket {
      constructor (url, protos) {
        super(url, protos, { headers: { Authorization: 'Bearer ' + token } })
      }
    }
  } else {
    throw new Error('unknown auth mode ' + auth)
  }

  const provider = new WebsocketProvider(server.wsBase, sid + '/whiteboard', doc, {
    connect: false,
    params,
    protocols,
    WebSocketPolyfill: WS,
    // Node 20 has a global BroadcastChannel: without this, providers in this one process
    // would sync with each other directly and bypass the server.
    disableBc: true,
    maxBackoffTime: 500
  })
  const client = {
    sub,
    token,
    doc,
    provider,
    awareness: provider.awareness,
    statuses: [],
    closes: [],
    errors: [],
    sockets: [],
    authDenied: [],
    /** every frame received: { type, sub?, bytes } (sub for sync messages) */
    received: [],
    /** frames that were not exactly one well-formed y-websocket message */
    frameErrors: [],
    /** every awareness message received: [{clientID, clock, state}] per message */
    awarenessMessages: [],
    destroyed: false,
    /** Disconnect and free everything (idempotent). */
    destroy () {
      if (client.destroyed) return
      client.destroyed = true
      provider.destroy()
      doc.destroy() // also destroys the awareness (its interval timer)
    },
    synced () {
      return waitFor(() => provider.synced && provider.wsconnected, { what: `client ${sub} synced`, describe: () => client.describe() })
    },
    describe () {
      return {
        sub,
        statuses: client.statuses,
        closes: client.closes,
        errors: client.errors,
        synced: provider.synced,
        wsconnected: provider.wsconnected,
        sockets: client.sockets.length,
        content: snapshotDoc(doc)
      }
    }
  }
  provider.on('status', (e) => {
    client.statuses.push(e.status)
    if (e.status === 'connecting' && provider.ws) {
      const ws = provider.ws
      client.sockets.push(ws)
      // The stable y-websocket client reads only the first message of a frame: check that
      // every frame the server sends is exactly one well-formed message.
      ws.addEventListener('message', (event) => {
        if (typeof event.data === 'string') {
          client.frameErrors.push({ error: 'text frame', text: event.data.slice(0, 200) })
          return
        }
        const buf = new Uint8Array(event.data)
        try {
          const info = parseFrame(buf)
          client.received.push(info)
        } catch (err) {
          client.frameErrors.push({ error: String(err.message || err), head: Array.from(buf.slice(0, 16)), length: buf.length })
        }
      })
    }
  })
  provider.on('connection-close', (event) => {
    client.closes.push(event ? { code: event.code, reason: String(event.reason || '') } : null)
  })
  provider.on('connection-error', (event) => {
    client.errors.push(String(event?.message || event?.error || event?.type || event))
  })
  // Record "permission denied" auth messages instead of only console.warn-ing them.
  // messageHandlers is a per-provider copy, so this does not leak into other providers.
  provider.messageHandlers[messageAuth] = (_encoder, decoder) => {
    const kind = decoding.readVarUint(decoder)
    const reason = kind === 0 ? decoding.readVarString(decoder) : null
    client.authDenied.push({ kind, reason })
  }
  // Record raw awareness messages, then hand them to the normal handler.
  const origAwareness = provider.messageHandlers[messageAwareness]
  provider.messageHandlers[messageAwareness] = (encoder, decoder, prov, emitSynced, type) => {
    const copy = decoding.clone(decoder)
    try {
      client.awarenessMessages.push(decodeAwarenessUpdate(decoding.readVarUint8Array(copy)))
    } catch (e) {
      client.awarenessMessages.push({ error: String(e) })
    }
    origAwareness(encoder, decoder, prov, emitSynced, type)
  }
  if (localAwarenessNull) provider.awareness.setLocalState(null)
  if (opts.connect !== false) provider.connect()
  return client
}

/** Plain JSON of the usual root types (used for comparisons and diagnostics). */
export function snapshotDoc (doc, roots = null) {
  const out = {}
  const names = roots || Array.from(doc.share.keys())
  for (const name of names) {
    const t = doc.share.get(name)
    if (!t) continue
    out[name] = t.toJSON()
  }
  return out
}

/** The state vector as a sorted plain object {clientId: clock}. */
export function stateVector (doc) {
  const sv = Y.decodeStateVector(Y.encodeStateVector(doc))
  return Object.fromEntries(Array.from(sv.entries()).sort((a, b) => a[0] - b[0]))
}

/** Decode an awareness update into [{ clientID, clock, state }]. */
export function decodeAwarenessUpdate (update) {
  const d = decoding.createDecoder(update)
  const n = decoding.readVarUint(d)
  const out = []
  for (let i = 0; i < n; i++) {
    const clientID = decoding.readVarUint(d)
    const clock = decoding.readVarUint(d)
    const state = JSON.parse(decoding.readVarString(d))
    out.push({ clientID, clock, state })
  }
  return out
}

/**
 * Parse one y-websocket frame and require that it holds exactly one message.
 * @returns {{ type: number, sub?: number, bytes: number }}
 */
export function parseFrame (buf) {
  if (typeof buf === 'string') throw new Error('text frame')
  const d = decoding.createDecoder(buf)
  const type = decoding.readVarUint(d)
  const info = { type, bytes: buf.length }
  if (type === 0) {
    info.sub = decoding.readVarUint(d)
    if (info.sub > 2) throw new Error(`unknown sync message type ${info.sub}`)
    decoding.readVarUint8Array(d)
  } else if (type === 1) {
    decodeAwarenessUpdate(decoding.readVarUint8Array(d))
  } else if (type === 2) {
    info.sub = decoding.readVarUint(d)
    info.reason = decoding.readVarString(d)
  } else if (type === 3) {
    // no payload
  } else {
    throw new Error(`unknown message type ${type}`)
  }
  if (decoding.hasContent(d)) throw new Error(`frame has ${buf.length - d.pos} bytes after the first message (type ${type})`)
  return info
}

/** Destroy all clients in `list` (emptying it); then fail if any got a malformed frame. */
export function destroyAll (list) {
  const bad = list.filter((c) => c.frameErrors.length).map((c) => ({ sub: c.sub, frameErrors: c.frameErrors.slice(0, 5) }))
  while (list.length) list.pop().destroy()
  if (bad.length) {
    throw new Error('the server sent frames that are not exactly one well-formed y-websocket message (the y-websocket client reads only the first): ' + JSON.stringify(bad))
  }
}
