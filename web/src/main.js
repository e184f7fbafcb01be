// The easel demo whiteboard: strokes and sticky notes in a Yjs document synced through
// the whiteboard endpoint (y-websocket), cursors from awareness, and a chat panel on the
// tutor endpoint (JSON, SPEC.md section 4). Opened as /?session=ID&token=JWT.
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
const me = { id: claims.sub || 'anonymous', name: claims.name || claims.sub || 'anonymous' }
me.color = colorOf(me.id)

$('session-name').textContent = session
document.title = `easel · ${session}`
$('me').textContent = `you: ${me.name}`

/** Shows `n` in #NAME-count and the word NAME(s) after it. */
function count (name, n) {
  $(name + '-count').textContent = n
  $(name + '-word').textContent = n === 1 ? name : name + 's'
}

/** Connection indicator; 'closed' is final (the server said not to retry). */
function setStatus (which, state, detail) {
  const s = $('status-' + which)
  if (s.dataset.state === 'closed') return
  s.dataset.state = state
  s.title = `${which}: ${detail || state}`
}

let diagnosed = false // diagnose() asked the server once
let refused = false // the server refused this link: stop reconnecting

if (!token) {
  $('help').hidden = false
} else {
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

  // Connection indicator: connected once the first sync is done.
  let status = 'connecting'
  const showStatus = () => setStatus('board', status === 'connected' && !provider.synced ? 'connecting' : status,
    status === 'connected' && !provider.synced ? 'syncing' : status)
  setStatus('board', 'connecting')
  provider.on('status', (e) => { status = e.status === 'disconnected' ? 'offline' : e.status; showStatus() })
  provider.on('sync', showStatus)
  provider.on('closed', (e) => setStatus('board', 'closed', `closed by the server (${e.code} ${e.reason || ''}): reload with a fresh token`))
  provider.on('connection-error', () => diagnose('board'))

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
    del.onclick = () => notes.delete(id)
    bar.append(del)
    const ta = el('textarea')
    ta.placeholder = 'Note…'
    ta.oninput = () => n.set('text', ta.value)
    e.append(bar, ta)
    // Drag by the bar.
    bar.addEventListener('pointerdown', (ev) => {
      if (ev.target !== bar) return
      bar.setPointerCapture(ev.pointerId)
      const [sx, sy] = [ev.clientX - (Number(n.get('x')) || 0), ev.clientY - (Number(n.get('y')) || 0)]
      const move = (m) => doc.transact(() => {
        n.set('x', Math.max(0, Math.round(m.clientX - sx)))
        n.set('y', Math.max(0, Math.round(m.clientY - sy)))
      })
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
  let myId = me.id

  const nearBottom = () => list.scrollHeight - list.scrollTop - list.clientHeight < 40
  function append (li) {
    const stick = nearBottom()
    list.append(li)
    if (stick) list.scrollTop = list.scrollHeight
  }
  function system (text) { append(el('li', 'system', text)) }

  function addMessage (m) {
    if (typeof m.seq !== 'number' || seen.has(m.seq)) return
    seen.add(m.seq)
    lastSeq = Math.max(lastSeq, m.seq)
    const from = m.from || {}
    const li = el('li', 'msg' + (from.id === myId ? ' mine' : ''))
    li.dataset.seq = m.seq
    const who = el('span', 'who', from.name || from.id || '?')
    who.style.color = colorOf(from.id)
    const t = new Date(m.ts)
    const time = el('time', null, isNaN(t) ? '' : t.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' }))
    time.dateTime = m.ts || ''
    li.append(who, time, el('div', 'text', m.text))
    // Keep seq order (history after a reconnect may interleave with live messages).
    const after = [...list.querySelectorAll('li.msg')].find((o) => Number(o.dataset.seq) > m.seq)
    if (after) list.insertBefore(li, after)
    else append(li)
    stopTyping(from.id)
  }

  function showParticipants (ps) {
    const box = $('participants')
    box.textContent = ''
    box.append(`${ps.length} here: `)
    ps.forEach((p, i) => {
      const b = el('b', null, p.name || p.id)
      b.style.color = colorOf(p.id)
      box.append(i ? ', ' : '', b)
    })
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
      case 'welcome':
        myId = m.user?.id ?? myId
        showParticipants(m.participants || [])
        break
      case 'history':
        for (const msg of m.messages || []) addMessage(msg)
        break
      case 'chat':
        addMessage(m)
        break
      case 'presence':
        showParticipants(m.participants || [])
        if (m.user?.id !== myId) system(`${m.user?.name || m.user?.id} ${m.event === 'joined' ? 'joined' : 'left'}`)
        if (m.event === 'left') stopTyping(m.user?.id)
        break
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
        system(`error (${m.code}): ${m.message || ''}`)
        break
    }
  }

  function connect () {
    if (refused) return
    let url = `${wsOrigin}/ws/v2/session/${encodeURIComponent(session)}?token=${encodeURIComponent(token)}`
    if (lastSeq) url += `&after_seq=${lastSeq}`
    setStatus('chat', 'connecting')
    const sock = new WebSocket(url)
    ws = sock
    sock.onopen = () => { attempt = 0; setStatus('chat', 'connected') }
    sock.onmessage = (e) => { try { handle(JSON.parse(e.data)) } catch (err) { console.warn('bad tutor message', err) } }
    sock.onclose = (e) => {
      if (ws !== sock) return
      typing.forEach((_, id) => stopTyping(id))
      if (e.code >= 4400 && e.code < 4500) {
        setStatus('chat', 'closed', `closed by the server (${e.code} ${e.reason}): reload with a fresh token`)
        system('The chat was closed by the server: reload the page with a fresh token.')
        return
      }
      setStatus('chat', 'offline')
      if (attempt === 0 && e.code === 1006) diagnose('chat')
      setTimeout(connect, Math.min(10000, 500 * 2 ** attempt++))
    }
  }
  connect()

  // Typing: announce at most every 2 s while keys are pressed; stop after 3 s idle.
  let typingSent = 0
  let idle = 0
  const send = (obj) => { if (ws && ws.readyState === WebSocket.OPEN) { ws.send(JSON.stringify(obj)); return true } return false }
  input.addEventListener('input', () => {
    if (Date.now() - typingSent > 2000 && input.value) { typingSent = Date.now(); send({ type: 'typing', active: true }) }
    clearTimeout(idle)
    idle = setTimeout(() => { if (typingSent) { typingSent = 0; send({ type: 'typing', active: false }) } }, 3000)
  })
  $('chat-form').addEventListener('submit', (e) => {
    e.preventDefault()
    const text = input.value.trim()
    if (!text) return
    if (!send({ type: 'chat', text, client_id: Math.random().toString(36).slice(2) })) {
      system('Not connected: the message was not sent.')
      return
    }
    input.value = ''
    clearTimeout(idle)
    typingSent = 0
  })
}

// ---------------------------------------------------------------- diagnosis

/** A refused WebSocket upgrade shows up in a browser as a bare close: ask the HTTP API why. */
async function diagnose (which) {
  if (diagnosed) return
  diagnosed = true
  try {
    const r = await fetch(`/api/v2/session/${encodeURIComponent(session)}/snapshots?token=${encodeURIComponent(token)}`)
    if (r.status === 401 || r.status === 403 || r.status === 400) {
      const body = await r.json().catch(() => ({}))
      const why = `refused (${r.status}): ${body.message || body.error || ''}`
      refused = true
      window.__easel?.provider.disconnect()
      setStatus('board', 'closed', why)
      setStatus('chat', 'closed', why)
      const help = $('help')
      help.querySelector('h1').textContent = 'The server refused this link'
      help.querySelector('p').textContent = why
      help.hidden = false
    }
  } catch {
    // the server is unreachable: the indicator already says offline
  }
}
