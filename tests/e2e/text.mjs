// Text: two clients edit one SyncText concurrently (one prepends "X", the other appends "Y" to
// "Hello World"); both converge, and a third client that joins later sees the merged text.
// Clients are spread over args.urls.  With args.expect, only joins and waits for that text (after
// the server restarted, say).
import { args, client, fail, finish, loadSdk, openAll, opened, waitFor } from './lib.mjs'

const id = args.doc ?? 'e2e-text'

try {
  const sdk = await loadSdk()
  if (args.expect === undefined) {
    const [a, b] = await openAll(sdk, ['alice', 'bob'], 'text', id)
    await a.insert(0, 'Hello World')
    if (await waitFor('bob sees alice\'s text', () => b.get(), (t) => t === 'Hello World')) {
      await Promise.all([a.insert(0, 'X'), b.insert(b.get().length, 'Y')])
      for (const [name, t] of [['alice', a], ['bob', b]]) {
        await waitFor(`${name} converges on the merged text`, () => t.get(), (s) => s === 'XHello WorldY')
      }
    }
  }
  const carol = await client(sdk, args.urls.at(-1), 'carol')
  const c = await opened(carol, 'text', id)
  const expected = args.expect ?? 'XHello WorldY'
  await waitFor('a client joining later sees the merged text', () => c.get(), (s) => s === expected)
} catch (error) {
  fail('scenario', error)
}
finish()
