// Field convergence.  First a later write by another client replaces an earlier one on every
// client; then three clients write fields at the same time, each its own and the same shared
// ones, and all three end with the same state, holding every field.  Clients are spread over
// args.urls (one server, or several instances sharing the document).
//
// Values are chosen so that the value that must win sorts lowest: the SDK breaks ties between
// equal stamps by comparing values, and a test whose last writer also had the greatest value
// would pass whether or not the server's last word reached every client.
import { args, check, client, fail, finish, loadSdk, openAll, opened, same, sleep, waitFor } from './lib.mjs'

const doc = args.doc ?? 'e2e-fields'
const names = ['carol', 'bob', 'alice'] // in sending order: the last writer's values sort lowest
const rounds = 5
const everyone = (docs, field) => () => docs.map((d) => d.get()[field])

try {
  const sdk = await loadSdk()
  const docs = await openAll(sdk, names, 'document', doc)

  await docs[0].set('title', 'b')
  await waitFor('every client sees a write', everyone(docs, 'title'), (v) => v.every((x) => x === 'b'))
  await docs[1].set('title', 'a')
  await waitFor('a later write by another client replaces it everywhere', everyone(docs, 'title'), (v) => v.every((x) => x === 'a'))

  for (let round = 0; round < rounds; round++) {
    // Each round is its own message (the SDK batches a document's writes for 50 ms), racing the others'.
    if (round) await sleep(60)
    await Promise.all(docs.map((d, i) => d.update({ [`shared${round}`]: `${names[i]}-${round}`, last: `${names[i]}-${round}`, [`own_${names[i]}`]: round })))
  }
  const expected = ['last', 'title', ...names.map((n) => `own_${n}`), ...Array.from({ length: rounds }, (_, r) => `shared${r}`)].sort()
  const converged = await waitFor(
    'after concurrent writes all clients converge on one state with every field',
    () => docs.map((d) => d.get()),
    (states) => states.every((s) => same(s, states[0])) && same(Object.keys(states[0]).sort(), expected),
    10000,
  )
  if (converged) {
    const state = docs[0].get()
    const written = Array.from({ length: rounds }, (_, r) => names.some((n) => state[`shared${r}`] === `${n}-${r}`))
    check('each shared field holds a value written to it', written.every(Boolean), state)
    // What the servers hold: the clients may agree with each other and not with them.
    const late = await Promise.all(args.urls.map((url, i) => client(sdk, url, `late${i}`)))
    const lateDocs = await Promise.all(late.map((kit) => opened(kit, 'document', doc)))
    // Compared with what the clients hold when the joiners look, not with the first agreement:
    // the SDK hides a client's own write until the server's echo, so the clients can agree for
    // a moment on the previous round while the last round's broadcasts are still on their way.
    await waitFor('clients joining afterwards, on every server, see that state', () => [...lateDocs, ...docs].map((d) => d.get()),
      (states) => states.every((s) => same(s, states[0])))
  }
} catch (error) {
  fail('scenario', error)
}
finish()
