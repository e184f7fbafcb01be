// One easel server per test file and the y-websocket clients the file's tests make on it:
// the before/afterEach/after hooks every interop test file needs, written once.
import { before, after, afterEach } from 'node:test'
import { startServer } from './server.mjs'
import { makeClient, destroyAll } from './client.mjs'

/**
 * Starts a server before the file's first test (handing it to `onStart`, so the file keeps
 * its own `server` variable), destroys each test's clients after it, and stops the server
 * after the last test. Returns `client(sid, opts)`, which makes a client that is destroyed
 * with the others.
 */
export function sharedServer (onStart, startOptions) {
  let server
  const clients = []
  before(async () => {
    server = await startServer(startOptions)
    onStart(server)
  })
  afterEach(() => {
    destroyAll(clients)
  })
  after(async () => {
    try {
      destroyAll(clients)
    } finally {
      if (server) await server.stop()
    }
  })
  return (sid, opts) => {
    const c = makeClient(server, sid, opts)
    clients.push(c)
    return c
  }
}
