// Presence across a reconnect.  Alice and Bob publish presence and see each other's; it does not
// expire while they stay connected, however quiet (the server runs with a short presence timeout:
// args.quietMs is well past it); when Bob's connection drops (a TCP proxy cuts it, no WebSocket
// close, no leave message) Alice is told at once that he left (state null), well before the
// timeout would have withdrawn his state; the SDK reconnects but does not
// send awareness_subscribe again, yet once Bob publishes again each sees the other's updates.
import { args, client, fail, finish, loadSdk, proxy, sleep, waitFor } from './lib.mjs'

const doc = args.doc ?? 'e2e-presence'

/** The presence state `viewer` holds for client `id` (null: none). */
const seen = (viewer, id) => () => viewer.aw.getState(id)?.state ?? null

/** Presence of one client, spaced as the SDK needs: it drops an update within 100 ms of the last. */
async function publish(who, state) {
  await sleep(Math.max(0, who.last + 150 - Date.now()))
  who.last = Date.now()
  await who.aw.setLocalState(state)
}

async function participant(sdk, url, name) {
  const kit = await client(sdk, url, name)
  const aw = kit.getAwareness(doc) // subscribes to the document's presence
  await aw.init()
  const who = { name, kit, aw, id: kit.getClientId(), last: 0, states: [] }
  kit.onNetworkStatusChange((status) => who.states.push(status.connectionState))
  return who
}

try {
  const sdk = await loadSdk()
  const link = await proxy(args.urls[0])
  const alice = await participant(sdk, args.urls[0], 'alice')
  const bob = await participant(sdk, link.url, 'bob')
  await publish(alice, { user: 'alice', n: 1 })
  await publish(bob, { user: 'bob', n: 1 })
  await waitFor('bob sees alice', seen(bob, alice.id), (s) => s?.n === 1)
  await waitFor('alice sees bob', seen(alice, bob.id), (s) => s?.n === 1)

  await sleep(args.quietMs ?? 2500)
  await waitFor('quiet but connected: bob still sees alice', seen(bob, alice.id), (s) => s?.n === 1, 0)
  await waitFor('quiet but connected: alice still sees bob', seen(alice, bob.id), (s) => s?.n === 1, 0)

  // A fresh state just before the drop, so that only the drop, not the timeout, can withdraw it in time.
  await publish(bob, { user: 'bob', n: 1.5 })
  await waitFor('alice sees bob\'s fresh state', seen(alice, bob.id), (s) => s?.n === 1.5)
  const before = bob.states.length
  link.cut()
  await waitFor('alice is told at once that bob left (state null)', seen(alice, bob.id), (s) => s === null, 700)
  const reconnected = (states) => states.some((s) => s !== 'connected') && states.at(-1) === 'connected'
  await waitFor('bob\'s SDK sees the drop and reconnects', () => bob.states.slice(before), reconnected, 5000)

  await publish(bob, { user: 'bob', n: 2 })
  await waitFor('alice sees bob again after his reconnect', seen(alice, bob.id), (s) => s?.n === 2)
  await publish(alice, { user: 'alice', n: 2 })
  await waitFor('reconnected bob sees alice\'s new presence', seen(bob, alice.id), (s) => s?.n === 2)
} catch (error) {
  fail('scenario', error)
}
finish()
