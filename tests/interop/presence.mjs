// Presence and whispers between two real @anycable/core clients against trio_cable.
// Usage: node presence.mjs '<json options>'.  Prints one JSON object per line on stdout
// (tests/test_interop.py asserts on them).  Options: url, protocols ([first, second]: ext
// protocols, json or msgpack), stream (a public stream name) or signed (a signed one),
// timeoutMs.
import WebSocket from 'ws'
import { encode, decode } from '@msgpack/msgpack'

const opts = JSON.parse(process.argv[2])
const emit = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')

setTimeout(() => {
  emit({ event: 'timeout' })
  process.exit(2)
}, opts.timeoutMs || 15000).unref()

class MsgpackEncoder {
  encode(msg) {
    return encode(msg)
  }

  decode(data) {
    try {
      return decode(data instanceof ArrayBuffer ? new Uint8Array(data) : data)
    } catch (_e) {
      return undefined
    }
  }
}

async function client(name, protocol) {
  const { createCable } = await import('@anycable/core')
  const options = { websocketImplementation: WebSocket, protocol, logLevel: 'error' }
  if (protocol.endsWith('msgpack')) options.encoder = new MsgpackEncoder()
  const cable = createCable(opts.url, options)
  const channel = opts.signed ? cable.streamFromSigned(opts.signed) : cable.streamFrom(opts.stream)
  const seen = { presence: [], messages: [] }
  const waiters = []
  const check = () => {
    for (const w of [...waiters]) {
      if (w.test()) {
        waiters.splice(waiters.indexOf(w), 1)
        w.resolve()
      }
    }
  }
  channel.on('presence', (msg) => {
    emit({ event: 'presence', client: name, message: msg })
    seen.presence.push(msg)
    check()
  })
  channel.on('message', (data) => {
    emit({ event: 'message', client: name, data })
    seen.messages.push(data)
    check()
  })
  await channel.ensureSubscribed()
  const until = (test) =>
    new Promise((resolve) => {
      waiters.push({ test, resolve })
      check()
    })
  return { cable, channel, seen, until }
}

const sawPresence = (c, type, id) => () =>
  c.seen.presence.some((m) => m.type === type && m.id === id)

try {
  const [p1, p2] = opts.protocols
  const a = await client('a', p1)
  const b = await client('b', p2)
  emit({ event: 'subscribed' })

  await a.channel.presence.join('a', { name: 'Alice' })
  await b.channel.presence.join('b', { name: 'Bob' })
  await Promise.all([a.until(sawPresence(a, 'join', 'b')), b.until(sawPresence(b, 'join', 'a'))])
  emit({ event: 'joined' })

  // info() asks the server (the state is empty until then), and keeps it up to date.
  emit({ event: 'info', client: 'a', state: await a.channel.presence.info() })
  emit({ event: 'info', client: 'b', state: await b.channel.presence.info() })

  // A whisper reaches the other, not its sender: a whispers, b answers once it got it; a's
  // own whisper would have reached a before b's answer (one fan-out, in order).
  await a.channel.whisper({ typing: 'a' })
  await b.until(() => b.seen.messages.length >= 1)
  await b.channel.whisper({ typing: 'b' })
  await a.until(() => a.seen.messages.length >= 1)
  emit({ event: 'whispers', a: a.seen.messages, b: b.seen.messages })

  await a.channel.presence.leave()
  await b.until(sawPresence(b, 'leave', 'a'))
  emit({ event: 'info', client: 'b-after-leave', state: await b.channel.presence.info() })
  a.cable.disconnect()
  b.cable.disconnect()
  emit({ event: 'done' })
  setTimeout(() => process.exit(0), 50)
} catch (err) {
  emit({ event: 'error', message: String(err && err.stack ? err.stack : err) })
  process.exit(1)
}
