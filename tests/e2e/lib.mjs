// What every end-to-end scenario shares: reading its arguments, loading a SyncKit SDK, making
// clients that meet only through the server, bounded waits, a TCP proxy that can cut a client's
// connection, and the one JSON line of results on stdout.
//
// A scenario runs as `node SCENARIO.mjs '<json>'`, the JSON holding at least `sdk` (the directory
// whose dist/index.mjs is the SDK) and `urls` (one ws:// URL per server).  It records named checks
// with check() or waitFor() and ends with finish(); it never throws out: a failed check is recorded
// and the scenario goes on where it can, so one run reports every check.  The SDK's own logging goes
// to stderr, so stdout carries nothing but the result line.

import net from 'node:net'
import path from 'node:path'
import { pathToFileURL } from 'node:url'

export const args = JSON.parse(process.argv[2] ?? '{}')
const checks = []
const started = Date.now()
let finished = false

// stdout is the result channel: the SDK's console output (0.1.1 logs every message) goes to stderr.
for (const name of ['log', 'info', 'debug', 'warn']) console[name] = (...a) => console.error(...a)

// Clients in one process would otherwise meet over BroadcastChannel (cross-tab sync), not the server.
globalThis.BroadcastChannel = class {
  postMessage() {}
  close() {}
  addEventListener() {}
  removeEventListener() {}
}

if (typeof globalThis.WebSocket === 'undefined') {
  fail('setup', 'this node has no global WebSocket (node 22+, or node 20/21 with --experimental-websocket)')
}

/** A check that passed or failed, with what was seen. */
export function check(name, ok, detail = undefined) {
  checks.push({ name, ok: Boolean(ok), ...(detail === undefined ? {} : { detail }) })
  return Boolean(ok)
}

/** Polls `probe` until `done(value)` holds or `timeoutMs` passes; records a check either way. */
export async function waitFor(name, probe, done, timeoutMs = 5000) {
  const deadline = Date.now() + timeoutMs
  let value
  for (;;) {
    try {
      value = await probe()
      if (done(value)) return check(name, true, value)
    } catch (error) {
      value = `probe threw: ${error}`
    }
    if (Date.now() >= deadline) return check(name, false, { timeoutMs, last: value })
    await sleep(25)
  }
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

/** Prints the result line and exits: 0 when every check passed. */
export function finish(extra = {}) {
  if (finished) return
  finished = true
  const result = { ok: checks.length > 0 && checks.every((c) => c.ok), checks, elapsedMs: Date.now() - started, ...extra }
  process.stdout.write(JSON.stringify(result) + '\n', () => process.exit(result.ok ? 0 : 1))
}

/** An unexpected error: report it as a failed check and stop. */
export function fail(name, error) {
  check(name, false, String(error?.stack ?? error))
  finish()
}

process.on('unhandledRejection', (error) => fail('unhandled rejection', error))
// The scenario's own bound: whatever hangs, the process reports what it has and ends.
setTimeout(() => fail('scenario deadline', `not finished within ${args.deadlineMs ?? 60000} ms`), args.deadlineMs ?? 60000).unref()

/** The SDK module in `dir` (the current build's copy, or the npm package). */
export async function loadSdk(dir = args.sdk) {
  return import(pathToFileURL(path.join(dir, 'dist', 'index.mjs')).href)
}

/**
 * An initialized SyncKit client of `url` with memory storage; reconnecting fast, so that a test
 * of a dropped connection does not wait the SDK's default second.
 */
export async function client(sdk, url, name) {
  const kit = new sdk.SyncKit({
    serverUrl: url,
    storage: 'memory',
    clientId: `${name}-${process.pid}-${Math.random().toString(36).slice(2, 8)}`,
    network: { reconnect: { initialDelay: 100, maxDelay: 500 } },
  })
  await kit.init()
  return kit
}

/** Waits until a client's WebSocket is open (init() returns before it is, when it had to retry). */
export function connected(name, kit, timeoutMs = 5000) {
  return waitFor(name, () => kit.getNetworkStatus()?.connectionState, (s) => s === 'connected', timeoutMs)
}

/** A document, text, counter or set of `kit`, once its subscription has been answered. */
export async function opened(kit, kind, id, timeoutMs = 5000) {
  const object = kit[kind](id) // starts its init(), which subscribes; calling init() again would subscribe twice
  await waitFor(`${kind} ${id} subscribed`, () => kit.getSyncState(id)?.state, (s) => s === 'synced', timeoutMs)
  return object
}

/** Clients named `names`, spread over args.urls in turn, each with the `kind` `id` open; those objects. */
export async function openAll(sdk, names, kind, id) {
  const kits = await Promise.all(names.map((name, i) => client(sdk, args.urls[i % args.urls.length], name)))
  return Promise.all(kits.map((kit) => opened(kit, kind, id)))
}

/** Deep equality of JSON-like values, key order ignored. */
export function same(a, b) {
  return JSON.stringify(canonical(a)) === JSON.stringify(canonical(b))
}

function canonical(value) {
  if (Array.isArray(value)) return value.map(canonical)
  if (value && typeof value === 'object') {
    return Object.fromEntries(Object.keys(value).sort().map((k) => [k, canonical(value[k])]))
  }
  return value
}

/**
 * A TCP proxy to the server of `url`: clients connect to `proxy.url`; `proxy.cut()` drops every
 * connection through it at once, without a WebSocket close, as a network failure would.  New
 * connections are relayed as before.
 */
export async function proxy(url) {
  const target = new URL(url)
  const sockets = new Set()
  const server = net.createServer((downstream) => {
    const upstream = net.connect(Number(target.port), target.hostname)
    for (const [a, b] of [[downstream, upstream], [upstream, downstream]]) {
      sockets.add(a)
      a.on('data', (data) => b.write(data))
      a.on('close', () => { sockets.delete(a); b.destroy() })
      a.on('error', () => a.destroy())
    }
  })
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve))
  server.unref()
  return {
    url: `ws://127.0.0.1:${server.address().port}${target.pathname}`,
    cut() {
      for (const socket of sockets) socket.destroy()
    },
  }
}
