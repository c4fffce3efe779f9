// A real client (@rails/actioncable or @anycable/core) that logs in with a cookie through
// trio_cable to the serverless-js application of rpc_app.mjs: subscribes to a room (confirmed)
// and to 'secret' (rejected), speaks, and waits for its own transmission and the broadcast.
// Usage: node rpc_client.mjs '<json options>': client ("rails" | "anycable"), url, cookie,
// user, timeoutMs.  Prints JSON lines; 'done' when everything arrived.
import WebSocket from 'ws'

const opts = JSON.parse(process.argv[2])
const emit = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')
setTimeout(() => {
  emit({ event: 'timeout' })
  process.exit(2)
}, opts.timeoutMs || 15000).unref()

// The browser would send the session cookie with the WebSocket request: so does this.
class CookieWebSocket extends WebSocket {
  constructor(url, protocols) {
    super(url, protocols, { headers: opts.cookie ? { cookie: opts.cookie } : {} })
  }
}

const got = { transmission: false, broadcast: false, rejected: false }
function check() {
  if (got.transmission && got.broadcast && got.rejected) {
    emit({ event: 'done' })
    setTimeout(() => process.exit(0), 50)
  }
}
function received(data) {
  emit({ event: 'message', data })
  if (data && data.you_said === 'hello') got.transmission = true
  if (data && data.user === opts.user && data.text === 'hello') got.broadcast = true
  check()
}

async function runRails() {
  globalThis.addEventListener = () => {}
  globalThis.removeEventListener = () => {}
  globalThis.document = { visibilityState: 'visible' }
  const { createConsumer, adapters } = await import('@rails/actioncable')
  adapters.WebSocket = CookieWebSocket
  const consumer = createConsumer(opts.url)
  const room = consumer.subscriptions.create(
    { channel: 'ChatChannel', room: '42' },
    {
      connected() {
        emit({ event: 'subscribed', room: '42' })
        room.perform('speak', { text: 'hello' })
      },
      rejected() {
        emit({ event: 'rejected', room: '42' })
      },
      disconnected(info) {
        emit({ event: 'disconnected', info })
      },
      received,
    },
  )
  consumer.subscriptions.create(
    { channel: 'ChatChannel', room: 'secret' },
    {
      rejected() {
        emit({ event: 'rejected', room: 'secret' })
        got.rejected = true
        check()
      },
    },
  )
}

async function runAnyCable() {
  const { createCable } = await import('@anycable/core')
  const cable = createCable(opts.url, {
    websocketImplementation: CookieWebSocket,
    protocol: opts.protocol || 'actioncable-v1-ext-json',
    logLevel: 'error',
  })
  cable.on('connect', () => emit({ event: 'connected' }))
  cable.on('disconnect', (ev) => emit({ event: 'disconnected', reason: ev.reason }))
  cable.on('close', (ev) => emit({ event: 'closed', reason: ev && ev.reason }))
  const room = cable.subscribeTo('ChatChannel', { room: '42' })
  room.on('message', received)
  await room.ensureSubscribed()
  emit({ event: 'subscribed', room: '42' })
  const secret = cable.subscribeTo('ChatChannel', { room: 'secret' })
  try {
    await secret.ensureSubscribed()
    emit({ event: 'subscribed', room: 'secret' })
  } catch (err) {
    emit({ event: 'rejected', room: 'secret', error: String(err) })
    got.rejected = true
  }
  await room.perform('speak', { text: 'hello' })
  check()
}

try {
  if (opts.client === 'rails') await runRails()
  else await runAnyCable()
} catch (err) {
  emit({ event: 'error', message: String(err && err.stack ? err.stack : err) })
  process.exit(1)
}
