// E2B's own npm SDK (`e2b`, pinned by package-lock.json) against hearth, configured
// only by the environment `hearth e2b env` prints. Run by crates/cli/tests/e2b_sdk.rs.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { Sandbox, CommandExitError } from 'e2b'

const run = process.env.HEARTH_E2B_RUN ?? 'node'

test('create, commands.run, files and kill', async () => {
  const sbx = await Sandbox.create({ metadata: { run, sdk: 'node' }, timeoutMs: 300_000 })
  try {
    const r = await sbx.commands.run("python3 -c 'print(6 * 7)'; echo err >&2")
    assert.equal(r.stdout, '42\n')
    assert.equal(r.stderr, 'err\n')
    assert.equal(r.exitCode, 0)
    await assert.rejects(sbx.commands.run('exit 5'), (e) => e instanceof CommandExitError && e.exitCode === 5)

    await sbx.files.write('/home/user/from-node.txt', 'written by node')
    assert.equal(await sbx.files.read('/home/user/from-node.txt'), 'written by node')
    const names = (await sbx.files.list('/home/user')).map((e) => e.name)
    assert.ok(names.includes('from-node.txt'), names.join(','))

    const listed = await Sandbox.list({ query: { metadata: { run, sdk: 'node' } } }).nextItems()
    assert.deepEqual(listed.map((s) => s.sandboxId), [sbx.sandboxId])
  } finally {
    await sbx.kill()
  }
  assert.equal(await sbx.isRunning(), false)
})
