// Set: two clients add to and remove from one SyncSet; every client, a third one that only watches
// included, ends with the same members.
import { args, fail, finish, loadSdk, openAll, same, waitFor } from './lib.mjs'

const id = args.doc ?? 'e2e-set'

try {
  const [a, b, c] = await openAll(await loadSdk(), ['alice', 'bob', 'carol'], 'set', id)
  const members = () => [a, b, c].map((s) => [...s.values()].sort())
  await Promise.all([a.add('apple'), a.add('pear'), b.add('plum'), b.add('fig')])
  if (await waitFor('every client sees the four added', members, (m) => m.every((x) => same(x, ['apple', 'fig', 'pear', 'plum'])))) {
    await Promise.all([a.remove('plum'), b.remove('pear')])
    await waitFor('every client sees the removals', members, (m) => m.every((x) => same(x, ['apple', 'fig'])))
  }
} catch (error) {
  fail('scenario', error)
}
finish()
