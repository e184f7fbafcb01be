// The easel demo whiteboard: strokes and sticky notes in a Yjs document synced through
// the whiteboard endpoint (y-websocket), cursors from awareness, and a chat panel on the
// tutor endpoint (JSON, SPEC.md section 4). Opened as /?session=ID&token=JWT.
//
// Both connections say their state in words in the header (connecting…, connected,
// reconnecting…, offline — N edits will sync when back, link refused). Every failed
// (re)connect re-checks the link over HTTP, with backoff, because a browser reports a
// refused WebSocket upgrade (401/403) as a bare close: only the HTTP API can say why.
//
// Document layout:
//   strokes: Y.Array of Y.Map { points: Y.Array [x0, y0, x1, y1, ...], color, by }
//   notes:   Y.Map id -> Y.Map { x, y, text }
// Awareness: { user: { name, color }, cursor: { x, y } | null }
// Coordinates are CSS pixels from the top-left corner of the board.

import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'

const $ = (id) => document.getElementById(id)
const el = (tag, cls, text) => {
  const e = document.createElement(tag)
  if (cls) e.className = cls
  if (text != null) e.textContent = text
  return e
}

const params = new URLSearchParams(location.search)
const session = params.get('session') || 'demo'
const token = params.get('token') || ''
const wsOrigin = location.origin.replace(/^http/, 'ws')

/** The token's claims, read without verifying (the server does that): for the name. */
function claimsOf (jwt) {
  try {
    const b64 = jwt.split('.')[1].replace(/-/g, '+').replace(/_/g, '/')
    return JSON.parse(new TextDecoder().decode(Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))))
  } catch {
    return {}
  }
}

/** A stable color for a user id. */
function colorOf (id) {
  let h = 0
  for (const c of String(id)) h = (h * 31 + c.codePointAt(0)) >>> 0
  return `hsl(${h % 360} 65% 42%)`
}

const claims = claimsOf(token)
// The role is the token's until the server's welcome says it (for wording and the student-link button).
const me = { id: claims.sub || 'anonymous', name: claims.name || claims.sub || 'anonymous', role: claims.role || 'student' }
me.color = colorOf(me.id)

$('session-name').textContent = session
document.title = `easel · ${session}`
const showMe = () => { $('me').textContent = `you: ${me.name} (${me.role})` }
showMe()

/** Shows `n` in #NAME-count and the word NAME(s) after it. */
function count (name, n) {
  $(name + '-count').textContent = n
  $(name + '-word').textContent = n === 1 ? name : name + 's'
}

// ---------------------------------------------------------------- connection state

/** A lost connection is "reconnecting…" this long, then "offline" (it keeps retrying). */
const OFFLINE_AFTER_MS = 5000

const conns = {
  board: { label: 'Whiteboard', state: 'idle', detail: '', pending: 0, timer: 0, unit: ['edit will sync', 'edits will sync'] },
  chat: { label: 'Chat', state: 'idle', detail: '', pending: 0, timer: 0, unit: ['message will be sent', 'messages will be sent'] }
}
const WORDS = { idle: 'not started', connecting: 'connecting…', connected: 'connected', reconnecting: 'reconnecting…', offline: 'offline', closed: 'link refused' }

/**
 * Sets a connection's state: idle, connecting (never connected yet), connected,
 * reconnecting (lost), offline (lost for OFFLINE_AFTER_MS, or the browser is offline),
 * closed (final: the server refused the link or closed for good).
 */
function setStatus (which, state) {
  const c = conns[which]
  if (c.state === 'closed' || c.state === state) return
  clearTimeout(c.timer)
  c.state = state
  if (state === 'connecting' || state === 'reconnecting') {
    c.timer = setTimeout(() => { if (c.state === state) setStatus(which, 'offline') }, OFFLINE_AFTER_MS)
  }
  renderStatus(which)
}

/** Edits (or chat messages) made while not connected: they go out on reconnect. */
function setPending (which, n) {
  conns[which].pending = n
  renderStatus(which)
}

function renderStatus (which) {
  const c = conns[which]
  let words = WORDS[c.state]
  const n = c.pending
  if (c.state === 'closed') {
    if (n) words += ` — ${n} ${n === 1 ? 'change' : 'changes'} not synced`
  } else if (n && c.state !== 'connected') {
    words += ` — ${n} ${c.unit[n === 1 ? 0 : 1]} when back`
  } else if (c.state === 'offline') {
    words += ' — retrying'
  }
  const s = $('status-' + which)
  s.dataset.state = c.state
  s.querySelector('.words').textContent = words
  s.title = `${c.label}: ${words}${c.detail ? ` (${c.detail})` : ''}`
}

window.addEventListener('offline', () => {
  for (const which of ['board', 'chat']) if (conns[which].state !== 'connected') setStatus(which, 'offline')
})

// ---------------------------------------------------------------- a dead link

let refused = false // the server refused this link or closed for good: stop reconnecting
const stoppers = [] // how to stop each connection
let onBoardBack = () => {} // the chat's "retry now", once it runs
const isTutor = (role) => role === 'tutor' || role === 'admin'

/** Stops both connections and says why on the page, in words, above the board. */
function refuse (title, detail) {
  if (refused) return
  refused = true
  for (const stop of stoppers) stop()
  for (const which of ['board', 'chat']) {
    conns[which].detail = detail
    setStatus(which, 'closed')
  }
  const n = $('notice')
  n.textContent = ''
  n.append(el('strong', null, title), el('small', null, detail))
  n.hidden = false
}

/** What to do about a link that no longer works, by who holds it. */
function askForLink () {
  return isTutor(me.role)
    ? `Mint a new one with “easel token --sub ID --session ${session} --role tutor” (or use the link “easel serve” printed).`
    : 'Ask your tutor for a new link.'
}

/** Explains an HTTP refusal of this page's link; false if the answer is not one. */
function explainRefusal (status, body) {
  const said = `The server answered ${status}${body.message ? ': ' + body.message : ''}.`
  if (status === 401) {
    refuse(`This link is no longer valid (the server's secret changed or the token expired). ${askForLink()}`, said)
  } else if (status === 403 && body.reason === 'removed') {
    // SPEC 4.1: a tutor removed this user; the ban runs out by itself.
    refuse('You were removed from this session.', said)
  } else if (status === 403) {
    refuse(`This link does not give access to session “${session}”. ${askForLink()}`, said)
  } else if (status === 400) {
    refuse(`This link is malformed: “${session}” is not a valid session id.`, said)
  } else {
    return false
  }
  return true
}

// A refused WebSocket upgrade shows up in a browser as a bare close (1006), the same as a
// server that is down: after every failed (re)connect, ask the HTTP API about the link.
// The checks back off (1 s, 2 s, ... 15 s) while they fail and start over once a
// connection succeeds, so a long outage costs a request every 15 s, and a server that comes
// back with another secret is explained within one backoff step.
const check = { running: false, timer: 0, next: 0, delay: 1000 }

function recheckLink () {
  if (refused || check.running || check.timer || !token) return
  check.timer = setTimeout(runCheck, Math.max(0, check.next - Date.now()))
}

/** Resolves true when the HTTP API refused the link (and the page now says why). */
async function runCheck () {
  clearTimeout(check.timer)
  check.timer = 0
  if (refused) return true
  check.running = true
  check.next = Date.now() + check.delay
  check.delay = Math.min(15000, check.delay * 2)
  try {
    const r = await fetch(`/api/v2/session/${encodeURIComponent(session)}/snapshots?token=${encodeURIComponent(token)}`)
    const body = r.ok ? {} : await r.json().catch(() => ({}))
    return explainRefusal(r.status, body)
  } catch {
    return false // the server is unreachable: the status line already says so
  } finally {
    check.running = false
  }
}

/** A connection succeeded: the link works, and the next failure is checked at once. */
function linkWorks () {
  clearTimeout(check.timer) // a check put off by the outage's backoff is moot now
  check.timer = 0
  check.delay = 1000
  check.next = 0
}

/** The server closed a connection with "do not retry" (4400-4499): say why. */
async function closedForGood (which, code, reason) {
  while (check.running) await new Promise((resolve) => setTimeout(resolve, 50))
  check.next = 0
  if (await runCheck()) return
  const said = `The ${conns[which].label.toLowerCase()} connection was closed by the server (${code}${reason ? ' ' + reason : ''}).`
  if (code === 4403) refuse('You were removed from this session.', said)
  else if (code === 4401) refuse(`This link has expired. ${askForLink()}`, said)
  else refuse(`The server ended this connection for good. Reload the page; if that fails: ${askForLink()}`, said)
}

// ---------------------------------------------------------------- student link

/**
 * A tutor's "copy student link": the server mints a student token for this session
 * (`POST /api/v2/session/ID/student-link`, tutors and admins only) and the page copies the
 * link. Where the server cannot mint (it verifies tokens with a public key), the page copies
 * its address without its token and says how to add one.
 */
function showCopyButton () {
  const b = $('copy-student-link')
  b.hidden = !isTutor(me.role)
  b.onclick = async () => {
    let link = null
    let minted = false
    try {
      const r = await fetch(`${location.origin}/api/v2/session/${encodeURIComponent(session)}/student-link`,
        { method: 'POST', headers: { Authorization: `Bearer ${token}` } })
      if (r.ok) {
        const body = await r.json()
        link = new URL(body.path, location.href).href
        minted = true
      }
    } catch { /* offline or refused: the fallback below */ }
    if (!link) {
      const u = new URL(location.href)
      u.searchParams.delete('token')
      u.hash = ''
      link = u.href
    }
    let copied = false
    try { await navigator.clipboard.writeText(link); copied = true } catch { /* shown below, to copy by hand */ }
    const note = $('copy-note')
    note.textContent = ''
    if (minted) {
      note.append(copied ? 'Copied a student link ' : 'Copy this student link: ', el('code', null, link),
        ' — valid 12 hours (at most as long as yours).')
    } else {
      note.append(copied ? 'Copied ' : 'Copy this link: ', el('code', null, link),
        ' — add a student token before sending it (&token=…); this server cannot make one here. Mint it with ',
        el('code', null, `easel token --sub NAME --name Name --session ${session} --role student`), '.')
    }
    const close = el('button', 'dismiss', '×')
    close.type = 'button'
    close.title = 'dismiss'
    close.onclick = () => { note.hidden = true }
    note.append(' ', close)
    note.dataset.link = link
    note.hidden = false
  }
}

if (!token) {
  $('help').hidden = false
} else {
  showCopyButton()
  startBoard()
  startChat()
}

// ---------------------------------------------------------------- whiteboard

function startBoard () {
  const doc = new Y.Doc()
  const strokes = doc.getArray('strokes')
  const notes = doc.getMap('notes')
  const provider = new WebsocketProvider(wsOrigin + '/ws/v2/session', session + '/whiteboard', doc, { params: { token } })
  const awareness = provider.awareness
  window.__easel = { doc, provider, awareness }

  // Edits made while not synced, as the user sees them (a stroke, a note), for the status line.
  const touchedOffline = new Set()
  let strokeNo = 0
  const touched = (key) => {
    if (provider.wsconnected && provider.synced) return
    touchedOffline.add(key)
    setPending('board', touchedOffline.size)
  }

  // Connection state: connected once a sync is done; y-websocket retries on its own (backoff
  // up to 2.5 s) and says 'connecting' on every attempt, so only a loss changes the words.
  stoppers.push(() => provider.disconnect())
  setStatus('board', 'connecting')
  provider.on('status', (e) => { if (e.status === 'disconnected') setStatus('board', 'reconnecting') })
  provider.on('sync', (synced) => {
    if (!synced || !provider.wsconnected || refused) return
    touchedOffline.clear()
    setPending('board', 0)
    setStatus('board', 'connected')
    linkWorks()
    onBoardBack()
  })
  provider.on('connection-close', () => recheckLink())
  provider.on('closed', (e) => closedForGood('board', e.code, e.reason))
  window.addEventListener('online', () => { if (!refused) provider.connect() })

  awareness.setLocalStateField('user', { name: me.name, color: me.color })

  // Pen colors.
  const palette = ['#1f2937', '#dc2626', '#2563eb', '#16a34a', '#d97706']
  let pen = palette[0]
  for (const c of palette) {
    const b = el('button')
    b.type = 'button'
    b.style.background = c
    b.setAttribute('role', 'radio')
    b.setAttribute('aria-label', c)
    b.setAttribute('aria-checked', String(c === pen))
    b.onclick = () => {
      pen = c
      for (const o of $('colors').children) o.setAttribute('aria-checked', String(o === b))
    }
    $('colors').append(b)
  }

  // Canvas: redrawn whole, once per frame, whenever the strokes change.
  const stage = $('stage')
  const canvas = $('canvas')
  const ctx = canvas.getContext('2d')
  let frame = 0
  const schedule = () => { if (!frame) frame = requestAnimationFrame(draw) }
  function draw () {
    frame = 0
    const dpr = window.devicePixelRatio || 1
    const w = stage.clientWidth
    const h = stage.clientHeight
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr)
      canvas.height = Math.round(h * dpr)
    }
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0)
    ctx.clearRect(0, 0, w, h)
    ctx.lineWidth = 3
    ctx.lineCap = 'round'
    ctx.lineJoin = 'round'
    for (const s of strokes) {
      if (!(s instanceof Y.Map)) continue
      const raw = s.get('points')
      const p = raw instanceof Y.Array ? raw.toArray() : Array.isArray(raw) ? raw : []
      if (p.length < 2) continue
      ctx.strokeStyle = typeof s.get('color') === 'string' ? s.get('color') : '#1f2937'
      ctx.beginPath()
      ctx.moveTo(p[0], p[1])
      if (p.length === 2) ctx.lineTo(p[0] + 0.01, p[1])
      for (let i = 2; i + 1 < p.length; i += 2) ctx.lineTo(p[i], p[i + 1])
      ctx.stroke()
    }
    count('stroke', strokes.length)
  }
  strokes.observeDeep(schedule)
  new ResizeObserver(schedule).observe(stage)

  // Drawing: a stroke is created on pointer down; points are appended once per frame.
  const pos = (e) => {
    const r = stage.getBoundingClientRect()
    return [Math.round(e.clientX - r.left), Math.round(e.clientY - r.top)]
  }
  let current = null
  let pending = []
  let flushFrame = 0
  const flush = () => {
    flushFrame = 0
    if (current && pending.length) current.push(pending)
    pending = []
  }
  canvas.addEventListener('pointerdown', (e) => {
    if (e.button !== 0) return
    canvas.setPointerCapture(e.pointerId)
    const points = new Y.Array()
    points.push(pos(e))
    const stroke = new Y.Map()
    stroke.set('points', points)
    stroke.set('color', pen)
    stroke.set('by', me.id)
    strokes.push([stroke])
    current = points
    touched('stroke ' + ++strokeNo)
  })
  canvas.addEventListener('pointermove', (e) => {
    if (!current) return
    pending.push(...pos(e))
    if (!flushFrame) flushFrame = requestAnimationFrame(flush)
  })
  const end = () => {
    if (flushFrame) cancelAnimationFrame(flushFrame)
    flush()
    current = null
  }
  canvas.addEventListener('pointerup', end)
  canvas.addEventListener('pointercancel', end)

  // Sticky notes: one element per entry of `notes`, reconciled on every change.
  const noteEls = new Map()
  function renderNotes () {
    for (const [id, e] of noteEls) {
      if (!(notes.get(id) instanceof Y.Map)) { e.remove(); noteEls.delete(id) }
    }
    notes.forEach((n, id) => {
      if (!(n instanceof Y.Map)) return
      let e = noteEls.get(id)
      if (!e) { e = noteElement(id, n); noteEls.set(id, e); $('notes').append(e) }
      e.style.left = (Number(n.get('x')) || 0) + 'px'
      e.style.top = (Number(n.get('y')) || 0) + 'px'
      const ta = e.querySelector('textarea')
      const text = String(n.get('text') ?? '')
      if (ta.value !== text) {
        const at = ta.selectionStart
        ta.value = text
        if (document.activeElement === ta) ta.setSelectionRange(at, at)
      }
    })
    count('note', notes.size)
  }
  function noteElement (id, n) {
    const e = el('div', 'note')
    const bar = el('div', 'note-bar')
    const del = el('button', null, '×')
    del.type = 'button'
    del.title = 'delete note'
    del.onclick = () => { notes.delete(id); touched('note ' + id) }
    bar.append(del)
    const ta = el('textarea')
    ta.placeholder = 'Note…'
    ta.oninput = () => { n.set('text', ta.value); touched('note ' + id) }
    e.append(bar, ta)
    // Drag by the bar.
    bar.addEventListener('pointerdown', (ev) => {
      if (ev.target !== bar) return
      bar.setPointerCapture(ev.pointerId)
      const [sx, sy] = [ev.clientX - (Number(n.get('x')) || 0), ev.clientY - (Number(n.get('y')) || 0)]
      const move = (m) => {
        doc.transact(() => {
          n.set('x', Math.max(0, Math.round(m.clientX - sx)))
          n.set('y', Math.max(0, Math.round(m.clientY - sy)))
        })
        touched('note ' + id)
      }
      const up = () => { bar.removeEventListener('pointermove', move); bar.removeEventListener('pointerup', up) }
      bar.addEventListener('pointermove', move)
      bar.addEventListener('pointerup', up)
    })
    return e
  }
  notes.observeDeep(renderNotes)
  $('add-note').onclick = () => {
    const id = Math.random().toString(36).slice(2, 10)
    const n = new Y.Map()
    n.set('x', 40 + Math.round(Math.random() * Math.max(0, stage.clientWidth / 2 - 40)))
    n.set('y', 40 + Math.round(Math.random() * Math.max(0, stage.clientHeight / 2 - 40)))
    n.set('text', '')
    notes.set(id, n)
    touched('note ' + id)
    noteEls.get(id)?.querySelector('textarea').focus()
  }

  // Cursors: ours goes out through awareness (at most every 40 ms), others' are drawn.
  let lastCursor = 0
  let cursorTimer = 0
  let cursorAt = null
  const sendCursor = () => {
    cursorTimer = 0
    lastCursor = Date.now()
    awareness.setLocalStateField('cursor', cursorAt)
  }
  stage.addEventListener('pointermove', (e) => {
    const [x, y] = pos(e)
    cursorAt = { x, y }
    if (!cursorTimer) cursorTimer = setTimeout(sendCursor, Math.max(0, 40 - (Date.now() - lastCursor)))
  })
  stage.addEventListener('pointerleave', () => { cursorAt = null; if (!cursorTimer) sendCursor() })

  const cursorEls = new Map()
  awareness.on('change', () => {
    const states = awareness.getStates()
    for (const [client, e] of cursorEls) {
      const st = states.get(client)
      if (!st || !st.cursor) { e.remove(); cursorEls.delete(client) }
    }
    states.forEach((st, client) => {
      if (client === doc.clientID || !st.cursor || !st.user) return
      let e = cursorEls.get(client)
      if (!e) {
        e = el('div', 'cursor')
        e.innerHTML = '<svg width="14" height="20" viewBox="0 0 14 20"><path d="M1 1 L1 17 L5 13 L8 19 L10 18 L7 12 L13 12 Z" stroke="#fff" stroke-width="1.2"/></svg><span></span>'
        cursorEls.set(client, e)
        $('cursors').append(e)
      }
      const color = String(st.user.color || '#6b7280')
      e.querySelector('path').setAttribute('fill', color)
      const label = e.querySelector('span')
      label.textContent = String(st.user.name || 'someone')
      label.style.background = color
      e.style.transform = `translate(${Number(st.cursor.x) || 0}px, ${Number(st.cursor.y) || 0}px)`
    })
  })

  schedule()
  renderNotes()
}

// ---------------------------------------------------------------- chat

function startChat () {
  const list = $('messages')
  const input = $('chat-input')
  const seen = new Set()
  const typing = new Map() // user id -> { name, timer }
  let ws = null
  let lastSeq = 0
  let attempt = 0
  let retryTimer = 0
  let welcomed = false // a welcome arrived on some connection: the next one is a reconnect
  let live = false // a welcome arrived on the current connection
  let myId = me.id
  // Chat typed while not connected: sent, in order, once the next welcome arrives.
  const queue = [] // { text, client_id }
  const waiting = new Map() // client_id -> its greyed line, until the server's echo
  // Presence across an outage: who was here when the connection was lost. Those who come
  // back within REJOIN_GRACE_MS are not announced again ("joined" twice, no "left"); the
  // others are announced as left when it passes.
  const REJOIN_GRACE_MS = 10000
  let participants = []
  const away = new Map() // id -> participant
  let graceTimer = 0
  // A "left" is announced LEAVE_HOLD_MS late: a server shutting down closes its sockets one
  // by one, so the others' "left" often arrives just before our own connection drops; such
  // a leave is part of the outage (the user goes to `away`). A tab reloaded within the hold
  // is neither "left" nor "joined".
  const LEAVE_HOLD_MS = 1500
  const leaving = new Map() // id -> { user, timer }

  const nearBottom = () => list.scrollHeight - list.scrollTop - list.clientHeight < 40
  function append (li) {
    const stick = nearBottom()
    list.append(li)
    if (stick) list.scrollTop = list.scrollHeight
  }
  function system (text) { append(el('li', 'system', text)) }
  const nameOf = (p) => p?.name || p?.id || 'someone'
  const labelOf = (p) => `${nameOf(p)}${p?.role ? ` (${p.role})` : ''}` // "Sam (student)"

  const lineOf = (seq) => list.querySelector(`li.msg[data-seq="${seq}"]`)

  /** A line's body: who, when, the text (or "message deleted"), and its edit/delete buttons. */
  function fillLine (li, m) {
    li.replaceChildren()
    if (m.deleted) {
      li.classList.add('deleted')
      li.append(el('div', 'text', 'message deleted'))
      return
    }
    const from = m.from || {}
    li.dataset.from = from.id || ''
    const who = el('span', 'who', from.name || from.id || '?')
    who.style.color = colorOf(from.id)
    const t = new Date(m.ts)
    const time = el('time', null, isNaN(t) ? '' : t.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' }))
    time.dateTime = m.ts || ''
    li.append(who, time)
    if (m.edited_at) li.append(el('span', 'edited', '(edited)'))
    // SPEC 4.1: your own lines can be edited and deleted; a tutor deletes any line.
    const actions = el('span', 'actions')
    if (from.id === myId) actions.append(button('edit', 'edit', () => startEdit(li, m)))
    if (from.id === myId || isTutor(me.role)) actions.append(button('delete', 'delete', () => send({ type: 'delete', seq: m.seq })))
    li.append(actions, el('div', 'text', m.text))
  }
  function button (cls, label, onclick) {
    const b = el('button', cls, label)
    b.type = 'button'
    b.onclick = onclick
    return b
  }
  /** Edits a line in place: Enter saves, Escape (or an empty text) cancels. */
  function startEdit (li, m) {
    const box = el('input', 'edit-box')
    box.value = m.text
    box.maxLength = 8000
    li.querySelector('.text').replaceWith(box)
    box.focus()
    let finished = false // removing the box blurs it: finish once
    const done = (save) => {
      if (finished) return
      finished = true
      const text = box.value.trim()
      if (save && text && text !== m.text) send({ type: 'edit', seq: m.seq, text })
      fillLine(li, li.msg || m) // as it is now: a change may have arrived meanwhile
    }
    box.addEventListener('keydown', (e) => {
      if (e.key === 'Enter') { e.preventDefault(); done(true) }
      if (e.key === 'Escape') done(false)
    })
    box.addEventListener('blur', () => { if (box.isConnected) done(false) })
  }
  /** `chat_edited` / `chat_deleted`, live or after a resume (idempotent). */
  function changeMessage (m) {
    const li = lineOf(m.seq)
    if (!li || !li.msg) return
    li.msg = m.type === 'chat_deleted'
      ? { seq: m.seq, deleted: true, deleted_at: m.deleted_at }
      : { ...li.msg, text: m.text, edited_at: m.edited_at }
    fillLine(li, li.msg)
  }

  function addMessage (m) {
    if (typeof m.seq !== 'number' || seen.has(m.seq)) return
    seen.add(m.seq)
    lastSeq = Math.max(lastSeq, m.seq)
    if (m.client_id && waiting.has(m.client_id)) { waiting.get(m.client_id).remove(); waiting.delete(m.client_id) }
    const from = m.from || {}
    const li = el('li', 'msg' + (from.id === myId ? ' mine' : ''))
    li.dataset.seq = m.seq
    li.msg = m
    fillLine(li, m)
    // Keep seq order (history after a reconnect may interleave with live messages); lines
    // still waiting to be sent stay last.
    const after = [...list.querySelectorAll('li.msg, li.pending')].find((o) => o.classList.contains('pending') || Number(o.dataset.seq) > m.seq)
    if (after) list.insertBefore(li, after)
    else append(li)
    stopTyping(from.id)
  }

  /** "2 here: Tess (tutor, you), Sam (student)"; greyed and marked while offline. */
  function showParticipants (stale) {
    const box = $('participants')
    box.textContent = ''
    box.classList.toggle('stale', stale)
    box.append(stale ? 'offline — last seen here: ' : `${participants.length} here: `)
    participants.forEach((p, i) => {
      const b = el('b', null, nameOf(p))
      b.style.color = colorOf(p.id)
      const role = [p.role, p.id === myId ? 'you' : null, p.muted ? 'muted' : null].filter(Boolean).join(', ')
      box.append(i ? ', ' : '', b)
      if (role) box.append(' ', el('span', 'role', `(${role})`))
    })
    showModTools(stale)
  }
  /** SPEC 4.1: a tutor's or admin's mute and remove buttons for each other participant, in a
   * panel under the participants line (which stays plain text). */
  function showModTools (stale) {
    let panel = $('mod-panel')
    if (!panel) {
      panel = el('div', 'mod-panel')
      panel.id = 'mod-panel'
      $('participants').after(panel)
    }
    panel.replaceChildren()
    const others = participants.filter((p) => p.id !== myId)
    panel.hidden = stale || !isTutor(me.role) || !others.length
    if (panel.hidden) return
    for (const p of others) {
      const tools = el('span', 'mod-tools')
      tools.dataset.user = p.id
      tools.append(el('b', null, nameOf(p)),
        button('mute', p.muted ? 'unmute' : 'mute', () => send({ type: 'mute', user: p.id, until: p.muted ? new Date(0).toISOString() : null })),
        button('remove', 'remove', () => send({ type: 'remove', user: p.id })))
      panel.append(tools)
    }
  }
  /** A `moderation` announcement: a line for everyone, and the muted marks. */
  function moderation (m) {
    const who = participants.find((p) => p.id === m.user)
    const name = who ? nameOf(who) : m.user
    const by = nameOf(m.by)
    const until = m.until ? ` until ${new Date(m.until).toLocaleTimeString()}` : ''
    if (m.action === 'mute') system(m.user === myId ? `${by} muted you${until}` : `${by} muted ${name}${until}`)
    else if (m.action === 'unmute') system(m.user === myId ? `${by} unmuted you` : `${by} unmuted ${name}`)
    else if (m.action === 'remove') system(m.user === myId ? `${by} removed you from this session` : `${by} removed ${name}`)
    if (m.user === myId && (m.action === 'mute' || m.action === 'unmute')) {
      input.disabled = m.action === 'mute'
      input.placeholder = m.action === 'mute' ? 'You are muted' : 'Say something…'
    }
    if (who && (m.action === 'mute' || m.action === 'unmute')) {
      who.muted = m.action === 'mute'
      showParticipants(false)
    }
  }
  function setParticipants (ps) {
    participants = Array.isArray(ps) ? ps : []
    showParticipants(false)
  }

  function showTyping () {
    const names = [...typing.values()].map((t) => t.name)
    $('typing').textContent = names.length ? `${names.join(', ')} ${names.length > 1 ? 'are' : 'is'} typing…` : ''
  }
  function stopTyping (id) {
    const t = typing.get(id)
    if (t) { clearTimeout(t.timer); typing.delete(id); showTyping() }
  }

  function handle (m) {
    switch (m.type) {
      case 'welcome': {
        myId = m.user?.id ?? myId
        if (m.user?.role) { me.role = m.user.role; showMe(); showCopyButton() }
        const ps = m.participants || []
        if (welcomed) {
          system('reconnected')
          // Who was here before is not news; who came meanwhile joined.
          for (const p of ps) if (!away.delete(p.id) && p.id !== myId) system(`${labelOf(p)} joined`)
          clearTimeout(graceTimer)
          graceTimer = setTimeout(() => {
            for (const p of away.values()) system(`${labelOf(p)} left`)
            away.clear()
          }, REJOIN_GRACE_MS)
        }
        welcomed = true
        live = true
        attempt = 0
        setParticipants(ps)
        {
          const muted = ps.some((p) => p.id === myId && p.muted)
          input.disabled = muted
          input.placeholder = muted ? 'You are muted' : 'Say something…'
        }
        setStatus('chat', 'connected')
        linkWorks()
        // Messages typed while offline go out now, oldest first.
        while (queue.length) {
          const msg = queue.shift()
          waiting.get(msg.client_id)?.querySelector('.state').replaceChildren('sending…')
          send({ type: 'chat', ...msg })
        }
        setPending('chat', 0)
        break
      }
      case 'history':
        for (const msg of m.messages || []) addMessage(msg)
        break
      case 'chat':
        addMessage(m)
        break
      case 'chat_edited':
      case 'chat_deleted':
        changeMessage(m)
        break
      case 'moderation':
        moderation(m)
        break
      case 'presence': {
        setParticipants(m.participants)
        const id = m.user?.id
        if (m.event === 'left') stopTyping(id)
        if (id === myId) break
        const label = labelOf(m.user)
        if (m.event === 'joined') {
          const held = leaving.get(id)
          if (held) { clearTimeout(held.timer); leaving.delete(id) } // back within the hold
          if (away.delete(id) || held) break // back after the same outage: not news
          system(`${label} joined`)
        } else if (m.event === 'left' && !leaving.has(id)) {
          away.delete(id)
          leaving.set(id, {
            user: m.user,
            timer: setTimeout(() => { leaving.delete(id); system(`${label} left`) }, LEAVE_HOLD_MS)
          })
        }
        break
      }
      case 'typing': {
        const id = m.from?.id
        if (!id || id === myId) break
        stopTyping(id)
        if (m.active) {
          typing.set(id, { name: m.from.name || id, timer: setTimeout(() => stopTyping(id), 5000) })
          showTyping()
        }
        break
      }
      case 'error':
        if (m.reason === 'muted') system('you are muted in this session')
        else system(`error (${m.code}): ${m.message || ''}`)
        break
    }
  }

  function connect () {
    clearTimeout(retryTimer)
    retryTimer = 0
    if (refused) return
    let url = `${wsOrigin}/ws/v2/session/${encodeURIComponent(session)}?token=${encodeURIComponent(token)}`
    if (lastSeq) url += `&after_seq=${lastSeq}`
    if (!welcomed) setStatus('chat', 'connecting')
    const sock = new WebSocket(url)
    ws = sock
    sock.onmessage = (e) => { try { handle(JSON.parse(e.data)) } catch (err) { console.warn('bad tutor message', err) } }
    sock.onclose = (e) => {
      if (ws !== sock) return
      ws = null
      typing.forEach((_, id) => stopTyping(id))
      if (live) {
        // Lost: presence is unknown until the next welcome.
        live = false
        for (const p of participants) if (p.id !== myId) away.set(p.id, p)
        for (const [id, held] of leaving) { clearTimeout(held.timer); away.set(id, held.user) }
        leaving.clear()
        clearTimeout(graceTimer)
        showParticipants(true)
        setStatus('chat', 'reconnecting')
        system('connection lost — reconnecting…')
        // Sent but not echoed: the history after the reconnect shows whether it arrived.
        for (const [id, li] of waiting) if (!queue.some((q) => q.client_id === id)) li.querySelector('.state').textContent = 'not confirmed'
      }
      if (refused) return
      if (e.code >= 4400 && e.code < 4500) { closedForGood('chat', e.code, e.reason); return }
      recheckLink()
      retryTimer = setTimeout(connect, Math.min(5000, 500 * 2 ** attempt++))
    }
  }
  stoppers.push(() => {
    const s = ws
    ws = null
    clearTimeout(retryTimer)
    s?.close()
    for (const li of waiting.values()) li.querySelector('.state').textContent = 'not sent'
    queue.length = 0
  })
  // The whiteboard came back (or the browser is online again): the server is up, retry now.
  const retryNow = () => { if (!ws && !refused) connect() }
  onBoardBack = retryNow
  window.addEventListener('online', retryNow)
  connect()

  // Typing: announce at most every 2 s while keys are pressed; stop after 3 s idle.
  let typingSent = 0
  let idle = 0
  const send = (obj) => { if (live && ws && ws.readyState === WebSocket.OPEN) { ws.send(JSON.stringify(obj)); return true } return false }
  input.addEventListener('input', () => {
    if (Date.now() - typingSent > 2000 && input.value) { typingSent = Date.now(); send({ type: 'typing', active: true }) }
    clearTimeout(idle)
    idle = setTimeout(() => { if (typingSent) { typingSent = 0; send({ type: 'typing', active: false }) } }, 3000)
  })
  $('chat-form').addEventListener('submit', (e) => {
    e.preventDefault()
    const text = input.value.trim()
    if (!text || refused) return
    const msg = { text, client_id: Math.random().toString(36).slice(2) }
    // Shown greyed until the server's echo (its acknowledgement) replaces it.
    const li = el('li', 'msg mine pending')
    const who = el('span', 'who', me.name)
    who.style.color = colorOf(myId)
    li.append(who, el('span', 'state', 'sending…'), el('div', 'text', text))
    waiting.set(msg.client_id, li)
    append(li)
    if (!send({ type: 'chat', ...msg })) {
      li.querySelector('.state').textContent = 'will be sent when back'
      queue.push(msg)
      setPending('chat', queue.length)
    }
    input.value = ''
    clearTimeout(idle)
    typingSent = 0
  })
}
