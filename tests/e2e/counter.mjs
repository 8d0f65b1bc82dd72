// Counter: two clients increment one SyncCounter at the same time; every client, a third one that
// only watches included, sees the sum, and keeps seeing it (an op echoed to its sender would count twice).
import { args, check, fail, finish, loadSdk, openAll, sleep, waitFor } from './lib.mjs'

const id = args.doc ?? 'e2e-counter'

try {
  const [a, b, c] = await openAll(await loadSdk(), ['alice', 'bob', 'carol'], 'counter', id)
  await Promise.all([a.increment(2), b.increment(3), a.increment(1), b.decrement(1)])
  const values = () => [a.value, b.value, c.value]
  if (await waitFor('every client sees the sum 5', values, (v) => v.every((x) => x === 5))) {
    await sleep(300)
    check('and still 5 a moment later (nothing counted twice)', values().every((x) => x === 5), values())
  }
} catch (error) {
  fail('scenario', error)
}
finish()
