// Late joiner: two clients write fields and see each other's; then a new client joins and sees
// them all.  args.lateSdk: the SDK the late joiner runs (default: the writers' own), e.g. the
// 0.1.1 package npm serves, which ignores sync_response's state and shows only per-field deltas.
import { args, client, fail, finish, loadSdk, openAll, same, waitFor } from './lib.mjs'

const doc = args.doc ?? 'e2e-late-joiner'
const fields = { title: 'Minutes', count: 3, tags: ['a', 'b'], nested: { x: 1, y: 'é' } }

try {
  const sdk = await loadSdk()
  const [a, b] = await openAll(sdk, ['alice', 'bob'], 'document', doc)
  await a.update({ title: fields.title, count: fields.count })
  await b.update({ tags: fields.tags, nested: fields.nested })
  for (const [name, d] of [['alice', a], ['bob', b]]) {
    await waitFor(`${name} sees every field`, () => d.get(), (s) => same(s, fields))
  }
  const lateSdk = args.lateSdk ? await loadSdk(args.lateSdk) : sdk
  const carol = await client(lateSdk, args.urls.at(-1), 'carol')
  const c = carol.document(doc) // 0.1.1 has no sync state to wait on: the fields are the signal
  await waitFor('the late joiner sees every field', () => c.get(), (s) => same(s, fields), 5000)
} catch (error) {
  fail('scenario', error)
}
finish()
