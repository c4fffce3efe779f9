// One interop scenario: a real JavaScript Action Cable / AnyCable client against trio_cable.
// Usage: node scenario.mjs '<json options>'.  Prints one JSON object per line on stdout; the
// Python test (tests/test_interop.py) drives the server side and asserts on these lines.
// Options: client ("rails" | "anycable"), url, protocol (anycable: "actioncable-v1-json",
// "actioncable-v1-ext-json", "actioncable-v1-msgpack", "actioncable-v1-ext-msgpack"),
// concurrentSubscribes (anycable), signed (a signed stream name), mode ("basic" | "resume"),
// expect (resume: how many signed-stream messages to wait for), timeoutMs.
import WebSocket from 'ws'
import { encode, decode } from '@msgpack/msgpack'

const opts = JSON.parse(process.argv[2])
const emit = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')

// Hard timeout: a hanging client must fail the test, never hang it.
setTimeout(() => {
  emit({ event: 'timeout' })
  process.exit(2)
}, opts.timeoutMs || 15000).unref()

const received = { echo: [], signed: [] }

function finishWhen(check) {
  if (check()) {
    emit({ event: 'done' })
    setTimeout(() => process.exit(0), 50)
  }
}

function basicDone() {
  const echoData = received.echo
  return (
    echoData.some((d) => d && d.action === 'echo') &&
    echoData.some((d) => d && d.n === 1) &&
    received.signed.some((d) => d && d.n === 2)
  )
}

async function runRails() {
  // @rails/actioncable is written for browsers: give it the few globals it touches.
  globalThis.addEventListener = () => {}
  globalThis.removeEventListener = () => {}
  globalThis.document = { visibilityState: 'visible' }
  const { createConsumer, adapters } = await import('@rails/actioncable')
  adapters.WebSocket = WebSocket
  const consumer = createConsumer(opts.url)
  let confirmed = 0
  const onConfirmed = () => {
    confirmed += 1
    if (confirmed === 2) {
      echo.perform('echo', { text: 'hi from rails' })
      emit({ event: 'ready' })
    }
  }
  const echo = consumer.subscriptions.create(
    { channel: 'EchoChannel', stream: 'interop' },
    {
      connected() {
        emit({ event: 'subscribed', channel: 'echo' })
        onConfirmed()
      },
      rejected() {
        emit({ event: 'rejected', channel: 'echo' })
      },
      received(data) {
        emit({ event: 'message', channel: 'echo', data })
        received.echo.push(data)
        finishWhen(basicDone)
      },
    },
  )
  consumer.subscriptions.create(
    { channel: '$pubsub', signed_stream_name: opts.signed },
    {
      connected() {
        emit({ event: 'subscribed', channel: 'signed' })
        onConfirmed()
      },
      rejected() {
        emit({ event: 'rejected', channel: 'signed' })
      },
      received(data) {
        emit({ event: 'message', channel: 'signed', data })
        received.signed.push(data)
        finishWhen(basicDone)
      },
    },
  )
}

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

async function runAnyCable() {
  const { createCable } = await import('@anycable/core')
  const options = {
    websocketImplementation: WebSocket,
    protocol: opts.protocol,
    logLevel: 'error',
  }
  if (opts.protocol.endsWith('msgpack')) options.encoder = new MsgpackEncoder()
  if (opts.concurrentSubscribes !== undefined) options.concurrentSubscribes = opts.concurrentSubscribes
  const cable = createCable(opts.url, options)
  cable.on('connect', (ev) => emit({ event: 'connected', restored: ev.restored, reconnect: ev.reconnect }))
  cable.on('disconnect', (ev) => emit({ event: 'disconnected', reason: ev.reason }))
  cable.on('info', (ev) => emit({ event: 'info', type: ev.type }))

  const signed = cable.streamFromSigned(opts.signed)
  signed.on('message', (data, meta) => {
    emit({ event: 'message', channel: 'signed', data, offset: meta && meta.offset })
    received.signed.push(data)
    if (opts.mode === 'resume') finishWhen(() => received.signed.length >= opts.expect)
    else finishWhen(basicDone)
  })
  if (opts.mode === 'resume') {
    await signed.ensureSubscribed()
    emit({ event: 'subscribed', channel: 'signed' })
    emit({ event: 'ready' })
    return
  }
  const echo = cable.subscribeTo('EchoChannel', { stream: 'interop' })
  echo.on('message', (data) => {
    emit({ event: 'message', channel: 'echo', data })
    received.echo.push(data)
    finishWhen(basicDone)
  })
  await Promise.all([echo.ensureSubscribed(), signed.ensureSubscribed()])
  emit({ event: 'subscribed', channel: 'both' })
  await echo.perform('echo', { text: opts.echoText || 'hi from anycable' })
  emit({ event: 'ready' })
}

try {
  if (opts.client === 'rails') await runRails()
  else await runAnyCable()
} catch (err) {
  emit({ event: 'error', message: String(err && err.stack ? err.stack : err) })
  process.exit(1)
}
