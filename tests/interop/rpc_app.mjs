// An AnyCable HTTP RPC application written with @anycable/serverless-js's own classes (its
// Application, Channel and handler), served by node:http.  trio_cable calls it at
// http://127.0.0.1:<port>/api/anycable/{connect,command,disconnect}.
// Usage: node --import ./dir-imports.mjs rpc_app.mjs '<json options>'
// Options: broadcastUrl, broadcastKey, rpcSecret.  Prints JSON lines: listening (with the
// port), and one line per callback the application ran.
import http from 'node:http'
import { Application, Channel, broadcaster, handler, Status } from '@anycable/serverless-js'

const opts = JSON.parse(process.argv[2] || '{}')
const emit = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')
const broadcastTo = broadcaster(opts.broadcastUrl, opts.broadcastKey)

function cookies(header) {
  const out = {}
  for (const part of (header || '').split(';')) {
    const i = part.indexOf('=')
    if (i > 0) out[part.slice(0, i).trim()] = part.slice(i + 1).trim()
  }
  return out
}

class ChatApplication extends Application {
  async connect(handle) {
    // The user comes from the session cookie the web application set.
    const user = cookies(handle.env.headers && handle.env.headers.cookie).user
    emit({ event: 'connect', user: user || null, url: handle.env.url })
    if (!user) {
      handle.reject()
      return
    }
    handle.identifiedBy({ user })
  }

  async disconnect(handle) {
    emit({ event: 'disconnect', user: handle.identifiers && handle.identifiers.user })
  }
}

class ChatChannel extends Channel {
  async subscribed(handle, params) {
    emit({ event: 'subscribed', user: handle.identifiers.user, room: params && params.room })
    if (!params || !params.room || params.room === 'secret') {
      handle.reject()
      return
    }
    handle.streamFrom(`room:${params.room}`)
  }

  async unsubscribed(handle, params) {
    emit({ event: 'unsubscribed', user: handle.identifiers.user, room: params && params.room })
  }

  async speak(handle, params, data) {
    emit({ event: 'speak', user: handle.identifiers.user, text: data.text })
    handle.transmit({ you_said: data.text })
    await broadcastTo(`room:${params.room}`, { user: handle.identifiers.user, text: data.text })
  }
}

const app = new ChatApplication()
app.registerChannel('ChatChannel', new ChatChannel())

const server = http.createServer(async (req, res) => {
  const chunks = []
  for await (const chunk of req) chunks.push(chunk)
  if (opts.rpcSecret && req.headers.authorization !== `Bearer ${opts.rpcSecret}`) {
    res.writeHead(401).end()
    return
  }
  // The serverless handlers take a web Request (what Vercel or Next.js would pass).
  const request = new Request(`http://${req.headers.host}${req.url}`, {
    method: req.method,
    headers: req.headers,
    body: Buffer.concat(chunks),
  })
  let answer
  try {
    answer = await handler(request, app)
  } catch (err) {
    emit({ event: 'error', message: String(err && err.stack ? err.stack : err) })
    answer = { status: Status.ERROR, error_msg: 'Server error' }
  }
  const body = JSON.stringify(answer)
  res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) })
  res.end(body)
})

server.listen(0, '127.0.0.1', () => emit({ event: 'listening', port: server.address().port }))
