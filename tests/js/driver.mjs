#!/usr/bin/env node
// Drives an OFFICIAL Supabase Realtime JS client (@supabase/realtime-js, or @supabase/supabase-js)
// against a server, one command at a time, and reports everything that happens as JSON lines.
//
// Usage:
//   node driver.mjs --url ws://127.0.0.1:4000/realtime/v1 [--lib realtime-js|supabase-js]
//                   [--vsn 2.0.0|1.0.0] [--apikey KEY] [--heartbeat-ms N] [--timeout-ms N]
//                   [--max-seconds N]
//   (every flag can also be given as an env var: DRIVER_URL, DRIVER_LIB, DRIVER_VSN, ...)
//
// stdin:  one command per line, {"id": 1, "op": "subscribe", ...args}   (ops: see OPS below)
// stdout: one JSON object per line, each with a "t" (type):
//   ready     {lib, version, vsn}
//   result    {id, ok, value | error}          the answer to command `id`
//   status    {ch, status, error}              subscribe() callback (SUBSCRIBED, CHANNEL_ERROR, ...)
//   broadcast {ch, payload}                    a broadcast listener fired
//   presence  {ch, event, key?, state, ...}    presence sync / join / leave
//   system    {ch, payload}                    a `system` listener fired
//   postgres  {ch, binding, payload, ref}      a postgres_changes listener fired (binding = its index)
//   heartbeat {status, latency}                the client's heartbeatCallback
//   socket    {event: open|close|error, code?, reason?, message?}   the underlying `ws` socket
//   frame     {dir: in|out, binary, kind?, topic?, event?, text?}   every WebSocket message
//   fatal     {error}                          then exit 1 (or 2 on the --max-seconds deadline)
// Exit 0 after the `exit` command or when stdin closes.

import { RealtimeClient } from '@supabase/realtime-js'
import WebSocket from 'ws'
import { createRequire } from 'node:module'
import { createInterface } from 'node:readline'

const require = createRequire(import.meta.url)

function option(name, fallback) {
  const flag = `--${name}`
  const i = process.argv.indexOf(flag)
  if (i !== -1 && i + 1 < process.argv.length) return process.argv[i + 1]
  const env = process.env[`DRIVER_${name.toUpperCase().replace(/-/g, '_')}`]
  return env !== undefined && env !== '' ? env : fallback
}

const url = option('url')
const lib = option('lib', 'realtime-js')
const vsn = option('vsn', '2.0.0')
const apikey = option('apikey', 'anon-key')
const heartbeatMs = Number(option('heartbeat-ms', '0')) || undefined
const timeoutMs = Number(option('timeout-ms', '0')) || undefined
const maxSeconds = Number(option('max-seconds', '120'))

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n')
}

function fatal(error, code = 1) {
  emit({ t: 'fatal', error: String(error && error.stack ? error.stack : error) })
  process.exit(code)
}

if (!url) fatal('missing --url (the realtime URL, e.g. ws://127.0.0.1:4000/realtime/v1)')
if (!['realtime-js', 'supabase-js'].includes(lib)) fatal(`unknown --lib ${lib}`)

// Bound the whole run: a driver never outlives its test.
setTimeout(() => fatal(`driver deadline of ${maxSeconds}s reached`, 2), maxSeconds * 1000).unref()
process.on('unhandledRejection', (e) => fatal(e))
process.on('uncaughtException', (e) => fatal(e))

// --- a `ws` transport that reports every frame and socket event --------------------------------

const decoder = new TextDecoder()

function describeBinary(buf) {
  const b = new Uint8Array(buf.buffer ? buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength) : buf)
  const kind = b[0]
  const out = { binary: true, kind, size: b.length }
  try {
    if (kind === 3) {
      // client -> server user broadcast push
      const [jl, rl, tl, el, ml, enc] = b.slice(1, 7)
      let o = 7
      const take = (n) => decoder.decode(b.slice(o, (o += n)))
      out.join_ref = take(jl)
      out.ref = take(rl)
      out.topic = take(tl)
      out.event = take(el)
      out.meta = take(ml)
      out.encoding = enc
      out.payload = enc === 1 ? decoder.decode(b.slice(o)) : `<${b.length - o} bytes>`
    } else if (kind === 4) {
      // server -> client user broadcast
      const [tl, el, ml, enc] = b.slice(1, 5)
      let o = 5
      const take = (n) => decoder.decode(b.slice(o, (o += n)))
      out.topic = take(tl)
      out.event = take(el)
      out.meta = take(ml)
      out.encoding = enc
      out.payload = enc === 1 ? decoder.decode(b.slice(o)) : `<${b.length - o} bytes>`
    }
  } catch (e) {
    out.decode_error = String(e)
  }
  return out
}

function describeText(text) {
  return { binary: false, text: text.length > 2000 ? text.slice(0, 2000) + '…' : text }
}

class TappedWebSocket extends WebSocket {
  constructor(address, protocols, options) {
    super(address, protocols, options)
    emit({ t: 'socket', event: 'connecting', url: String(address) })
    this.on('open', () => emit({ t: 'socket', event: 'open' }))
    this.on('close', (code, reason) => emit({ t: 'socket', event: 'close', code, reason: String(reason) }))
    this.on('error', (err) => emit({ t: 'socket', event: 'error', message: String(err && err.message) }))
    this.on('message', (data, isBinary) => {
      emit({ t: 'frame', dir: 'in', ...(isBinary ? describeBinary(data) : describeText(data.toString())) })
    })
  }

  send(data, ...rest) {
    const desc = typeof data === 'string' ? describeText(data) : describeBinary(Buffer.from(data))
    emit({ t: 'frame', dir: 'out', ...desc })
    return super.send(data, ...rest)
  }
}

// --- the client ----------------------------------------------------------------------------------

const heartbeatCallback = (status, latency) => emit({ t: 'heartbeat', status, latency: latency ?? null })
const realtimeOptions = {
  transport: TappedWebSocket,
  vsn,
  heartbeatCallback,
  ...(heartbeatMs ? { heartbeatIntervalMs: heartbeatMs } : {}),
  ...(timeoutMs ? { timeout: timeoutMs } : {}),
}

let supabase = null
let client
if (lib === 'supabase-js') {
  // supabase-js takes the project URL and derives <url>/realtime/v1 itself.
  const httpUrl = url.replace(/^ws/, 'http').replace(/\/realtime\/v1\/?$/, '')
  const { createClient } = await import('@supabase/supabase-js')
  supabase = createClient(httpUrl, apikey, {
    auth: { persistSession: false, autoRefreshToken: false, detectSessionInUrl: false },
    realtime: realtimeOptions,
  })
  client = supabase.realtime
} else {
  client = new RealtimeClient(url, { ...realtimeOptions, params: { apikey } })
}

const channels = new Map() // name -> RealtimeChannel

function getChannel(name) {
  const ch = channels.get(name)
  if (!ch) throw new Error(`no channel ${name}; call "channel" first`)
  return ch
}

// ArrayBuffer payloads (kind-4 binary broadcasts) are shown as {"$bytes": "<hex>"}.
function jsonable(payload) {
  if (payload && payload.payload instanceof ArrayBuffer) {
    return { ...payload, payload: { $bytes: Buffer.from(payload.payload).toString('hex') } }
  }
  return payload
}

function makeChannel({ ch: name, config = {}, broadcast = ['*'], presence = false, system = true, postgres = [] }) {
  const channel = supabase ? supabase.channel(name, { config }) : client.channel(name, { config })
  channels.set(name, channel)
  // postgres: [{event, schema, table?, filter?}, ...], one listener each (index = binding number).
  postgres.forEach((binding, index) => {
    // `ref`: the second argument realtime-js passes (the message ref: Tidings' position, when resuming).
    channel.on('postgres_changes', binding, (payload, ref) =>
      emit({ t: 'postgres', ch: name, binding: index, payload, ref: ref ?? null }),
    )
  })
  for (const event of broadcast) {
    channel.on('broadcast', { event }, (payload) => emit({ t: 'broadcast', ch: name, payload: jsonable(payload) }))
  }
  if (presence) {
    channel.on('presence', { event: 'sync' }, () =>
      emit({ t: 'presence', ch: name, event: 'sync', state: channel.presenceState() }),
    )
    channel.on('presence', { event: 'join' }, ({ key, newPresences }) =>
      emit({ t: 'presence', ch: name, event: 'join', key, presences: newPresences, state: channel.presenceState() }),
    )
    channel.on('presence', { event: 'leave' }, ({ key, leftPresences }) =>
      emit({ t: 'presence', ch: name, event: 'leave', key, presences: leftPresences, state: channel.presenceState() }),
    )
  }
  if (system) {
    channel.on('system', {}, (payload) => emit({ t: 'system', ch: name, payload }))
  }
  return channel
}

const OPS = {
  // Create a channel with listeners and subscribe; answers at the first subscribe status.
  async subscribe(args) {
    const channel = makeChannel(args)
    return await new Promise((resolve) => {
      let first = true
      channel.subscribe((status, err) => {
        emit({ t: 'status', ch: args.ch, status, error: err ? err.message : null })
        if (first) {
          first = false
          resolve({ status, error: err ? err.message : null })
        }
      })
    })
  },
  // Create a channel object without subscribing (REST-only use).
  async channel(args) {
    makeChannel(args)
    return null
  },
  // `bytes` (hex) sends a raw-binary payload (an ArrayBuffer).
  async send({ ch, event, payload, bytes, type = 'broadcast', timeout }) {
    const body = bytes !== undefined ? new Uint8Array(Buffer.from(bytes, 'hex')).buffer : payload
    return await getChannel(ch).send({ type, event, payload: body }, timeout ? { timeout } : {})
  },
  async sendMany({ ch, event, count }) {
    const channel = getChannel(ch)
    const results = []
    for (let i = 0; i < count; i++) results.push(channel.send({ type: 'broadcast', event, payload: { i } }))
    return await Promise.all(results)
  },
  // `bytes` (hex) sends a raw binary payload (application/octet-stream).
  async httpSend({ ch, event, payload, bytes }) {
    const body = bytes !== undefined ? new Uint8Array(Buffer.from(bytes, 'hex')) : payload
    return await getChannel(ch).httpSend(event, body)
  },
  async track({ ch, payload }) {
    return await getChannel(ch).track(payload)
  },
  async untrack({ ch }) {
    return await getChannel(ch).untrack()
  },
  async presenceState({ ch }) {
    return getChannel(ch).presenceState()
  },
  async unsubscribe({ ch }) {
    return await getChannel(ch).unsubscribe()
  },
  async removeChannel({ ch }) {
    const channel = getChannel(ch)
    channels.delete(ch)
    return await (supabase ? supabase.removeChannel(channel) : client.removeChannel(channel))
  },
  async setAuth({ token }) {
    await client.setAuth(token)
    return null
  },
  // One heartbeat round trip (only when no periodic one is pending: use a long --heartbeat-ms).
  async heartbeat({ timeout = 10000 }) {
    if (!client.isConnected()) return 'disconnected'
    return await new Promise((resolve) => {
      const done = (status) => {
        clearTimeout(timer)
        client.onHeartbeat(heartbeatCallback)
        resolve(status)
      }
      const timer = setTimeout(() => done('no reply (driver timeout)'), timeout)
      client.onHeartbeat((status, latency) => {
        heartbeatCallback(status, latency)
        if (status !== 'sent') done(status)
      })
      client.sendHeartbeat()
    })
  },
  async state({ ch }) {
    return {
      connection: client.connectionState(),
      connected: client.isConnected(),
      channel: ch && channels.has(ch) ? channels.get(ch).state : null,
      channels: client.getChannels().map((c) => ({ topic: c.topic, state: c.state })),
    }
  },
  async disconnect() {
    return await client.disconnect()
  },
  async exit() {
    setImmediate(() => process.exit(0))
    return null
  },
}

function pkgVersion(name) {
  try {
    return require(`${name}/package.json`).version
  } catch {
    return null
  }
}

emit({
  t: 'ready',
  lib,
  vsn,
  version: pkgVersion(lib === 'supabase-js' ? '@supabase/supabase-js' : '@supabase/realtime-js'),
  realtime_js: pkgVersion('@supabase/realtime-js'),
})

const rl = createInterface({ input: process.stdin })
rl.on('line', async (line) => {
  if (!line.trim()) return
  let cmd
  try {
    cmd = JSON.parse(line)
  } catch (e) {
    emit({ t: 'result', id: null, ok: false, error: `bad command: ${e}` })
    return
  }
  const { id, op, ...args } = cmd
  const fn = OPS[op]
  if (!fn) {
    emit({ t: 'result', id, ok: false, error: `unknown op ${op}` })
    return
  }
  try {
    const value = await fn(args)
    emit({ t: 'result', id, ok: true, value: value === undefined ? null : value })
  } catch (e) {
    emit({ t: 'result', id, ok: false, error: String(e && e.message ? e.message : e) })
  }
})
rl.on('close', () => process.exit(0))
