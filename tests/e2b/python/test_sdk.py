"""E2B's own Python SDK (the `e2b` package, pinned in requirements.txt) against hearth.

Nothing here knows it talks to hearth: the SDK is configured only by the environment
`hearth e2b env` prints (E2B_API_URL, E2B_SANDBOX_URL, E2B_API_KEY). Run by
crates/cli/tests/e2b_sdk.rs against a real stack (real VMs); HEARTH_E2B_RUN names
this run so that the metadata filters see only its sandboxes.
"""

import os
import threading
import time
import urllib.request
import uuid

import pytest

from e2b import CommandExitException, Sandbox
from e2b.exceptions import (
    AuthenticationException,
    SandboxException,
    TimeoutException,
)
from e2b.sandbox.commands.command_handle import PtySize
from e2b.sandbox.filesystem.filesystem import FileType, WriteEntry
from e2b.sandbox.sandbox_api import SandboxQuery

RUN = os.environ.get("HEARTH_E2B_RUN") or uuid.uuid4().hex[:12]


def eventually(check, timeout=20.0, interval=0.2):
    """Poll `check` until it returns something truthy; return it, or fail."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except Exception as e:  # the thing polled for may not be up yet
            last = e
        time.sleep(interval)
    pytest.fail(f"not true within {timeout}s (last: {last!r})")


@pytest.fixture(scope="module")
def sbx():
    s = Sandbox.create(
        metadata={"suite": "hearth-e2b", "run": RUN},
        envs={"HEARTH_FROM_CREATE": "hello-env"},
        timeout=600,
    )
    yield s
    s.kill()


# ---------------------------------------------------------------- create


def test_create_with_metadata_and_env_vars(sbx):
    info = sbx.get_info()
    assert info.metadata == {"suite": "hearth-e2b", "run": RUN}
    assert info.state.value == "running"
    assert sbx.commands.run("echo $HEARTH_FROM_CREATE").stdout == "hello-env\n"
    # `base` (the SDK's default template) is a Debian with python3, as the user `user`.
    r = sbx.commands.run("python3 -c 'print(6 * 7)'; whoami; pwd")
    assert r.stdout.split() == ["42", "user", "/home/user"]


# ---------------------------------------------------------------- commands


def test_stdout_stderr_and_exit_codes(sbx):
    r = sbx.commands.run("echo out; echo err >&2")
    assert (r.stdout, r.stderr, r.exit_code) == ("out\n", "err\n", 0)
    with pytest.raises(CommandExitException) as e:
        sbx.commands.run("echo failing >&2; exit 7")
    assert e.value.exit_code == 7
    assert e.value.stderr == "failing\n"


def test_on_stdout_callbacks_stream(sbx):
    seen = []
    sbx.commands.run(
        "for i in 1 2 3; do echo line-$i; sleep 0.1; done",
        on_stdout=lambda line: seen.append(line),
    )
    assert "".join(seen).split() == ["line-1", "line-2", "line-3"]


def test_background_list_and_kill(sbx):
    h = sbx.commands.run("sleep 300", background=True)
    assert h.pid in [p.pid for p in sbx.commands.list()]
    assert sbx.commands.kill(h.pid) is True
    with pytest.raises(CommandExitException):
        h.wait()
    assert h.pid not in [p.pid for p in sbx.commands.list()]
    assert sbx.commands.kill(h.pid) is False


def test_send_stdin(sbx):
    h = sbx.commands.run("head -n 1", background=True, stdin=True)
    sbx.commands.send_stdin(h.pid, "through-stdin\n")
    assert h.wait().stdout == "through-stdin\n"


def test_command_timeout(sbx):
    started = time.monotonic()
    with pytest.raises(TimeoutException):
        sbx.commands.run("sleep 30", timeout=2)
    assert time.monotonic() - started < 20


def test_pty(sbx):
    out = bytearray()
    pty = sbx.pty.create(PtySize(rows=24, cols=80), timeout=60)

    def read():
        try:
            pty.wait(on_pty=out.extend)
        except CommandExitException:
            pass  # killed below

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    sbx.pty.send_stdin(pty.pid, b"echo pty-$((40 + 2))\n")
    eventually(lambda: b"pty-42" in out)
    sbx.pty.resize(pty.pid, PtySize(rows=33, cols=101))
    sbx.pty.send_stdin(pty.pid, b"stty size\n")
    eventually(lambda: b"33 101" in out)
    assert sbx.pty.kill(pty.pid) is True
    reader.join(timeout=10)
    assert not reader.is_alive()


# ---------------------------------------------------------------- files


def test_write_and_read_text_and_bytes(sbx):
    sbx.files.write("/home/user/notes/hello.txt", "hello, files\n")
    assert sbx.files.read("/home/user/notes/hello.txt") == "hello, files\n"
    blob = bytes(range(256)) * 64
    sbx.files.write("/home/user/blob.bin", blob)
    assert bytes(sbx.files.read("/home/user/blob.bin", format="bytes")) == blob
    # gzip both ways (Content-Encoding on the upload, Accept-Encoding on the read).
    sbx.files.write("/home/user/gz.bin", blob, gzip=True)
    assert bytes(sbx.files.read("/home/user/gz.bin", format="bytes", gzip=True)) == blob
    # Written as the sandbox's default user, readable by its commands.
    assert sbx.commands.run("stat -c %U /home/user/blob.bin").stdout == "user\n"


def test_write_many(sbx):
    sbx.files.write_files(
        [
            WriteEntry(path="/home/user/many/a.txt", data="A"),
            WriteEntry(path="/home/user/many/b.txt", data=b"B"),
        ]
    )
    assert sbx.files.read("/home/user/many/a.txt") == "A"
    assert sbx.files.read("/home/user/many/b.txt") == "B"


def test_list_exists_info_make_dir_rename_remove(sbx):
    assert sbx.files.make_dir("/home/user/tree/sub") is True
    sbx.files.write("/home/user/tree/f.txt", "12345")
    names = sorted(e.name for e in sbx.files.list("/home/user/tree"))
    assert names == ["f.txt", "sub"]
    assert sbx.files.exists("/home/user/tree/f.txt")
    assert not sbx.files.exists("/home/user/tree/nope")
    info = sbx.files.get_info("/home/user/tree/f.txt")
    assert info.type == FileType.FILE and info.size == 5
    assert info.owner == "user" and info.permissions.startswith("-rw")
    assert sbx.files.get_info("/home/user/tree/sub").type == FileType.DIR
    sbx.files.rename("/home/user/tree/f.txt", "/home/user/tree/g.txt")
    assert not sbx.files.exists("/home/user/tree/f.txt")
    assert sbx.files.read("/home/user/tree/g.txt") == "12345"
    sbx.files.remove("/home/user/tree/g.txt")
    assert not sbx.files.exists("/home/user/tree/g.txt")


def test_watch_dir_recursive(sbx):
    sbx.files.make_dir("/home/user/watched/deep")
    handle = sbx.files.watch_dir("/home/user/watched", recursive=True)
    try:
        sbx.files.write("/home/user/watched/top.txt", "1")
        sbx.files.write("/home/user/watched/deep/inner.txt", "2")
        seen = []

        def both():
            seen.extend(handle.get_new_events())
            names = {e.name for e in seen}
            return {"top.txt", "deep/inner.txt"} <= names

        eventually(both)
        types = {e.type.value for e in seen}
        assert "create" in types or "write" in types, seen
    finally:
        handle.stop()


# ---------------------------------------------------------------- network: a server in the sandbox


def test_get_host_reaches_a_server_in_the_sandbox(sbx):
    sbx.files.write("/home/user/www/index.html", "served-from-the-sandbox")
    sbx.commands.run(
        "cd /home/user/www && python3 -m http.server 8000", background=True
    )
    host = sbx.get_host(8000)
    assert host.startswith(f"8000-{sbx.sandbox_id}.")
    # `<port>-<id>.<domain>` may not resolve on this machine: send the request to the
    # API's address with that Host, as a wildcard DNS record would.
    url = os.environ["E2B_API_URL"] + "/index.html"

    def fetch():
        req = urllib.request.Request(url, headers={"Host": host})
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.read().decode()

    assert eventually(fetch) == "served-from-the-sandbox"


# ---------------------------------------------------------------- lifecycle


def test_set_timeout(sbx):
    sbx.set_timeout(900)
    left = (sbx.get_info().end_at.timestamp() - time.time())
    assert 800 < left <= 901


def test_get_metrics(sbx):
    # A file of 8 MiB on the root disk shows in the next sample's disk use.
    before = sbx.get_metrics()
    assert len(before) == 1
    m = before[0]
    assert m.cpu_count == 1
    assert 0 <= m.cpu_used_pct <= 100
    assert 200 << 20 < m.mem_total <= 256 << 20
    assert 0 < m.mem_used < m.mem_total
    assert 0 < m.disk_used < m.disk_total
    sbx.commands.run("head -c 8388608 /dev/urandom > /home/user/fill && sync")
    after = sbx.get_metrics()[0]
    assert after.disk_used >= m.disk_used + (6 << 20)
    assert after.timestamp >= m.timestamp
    sbx.commands.run("rm /home/user/fill")


def test_list_with_metadata_filter(sbx):
    mine = Sandbox.list(query=SandboxQuery(metadata={"run": RUN})).next_items()
    assert sbx.sandbox_id in [s.sandbox_id for s in mine]
    other = Sandbox.list(query=SandboxQuery(metadata={"run": RUN + "-other"})).next_items()
    assert other == []


def test_pause_and_connect_keep_files_and_processes():
    s = Sandbox.create(metadata={"run": RUN}, timeout=300)
    try:
        s.files.write("/home/user/kept.txt", "before the pause")
        loop = s.commands.run(
            "i=0; while true; do i=$((i+1)); echo $i > /tmp/tick.tmp; mv /tmp/tick.tmp /tmp/tick; sleep 0.2; done",
            background=True,
        )
        eventually(lambda: s.files.exists("/tmp/tick"))
        s.pause()
        assert Sandbox.get_info(s.sandbox_id).state.value == "paused"
        before = None
        s2 = Sandbox.connect(s.sandbox_id, timeout=300)
        assert s2.files.read("/home/user/kept.txt") == "before the pause"
        assert loop.pid in [p.pid for p in s2.commands.list()]
        before = int(s2.files.read("/tmp/tick"))
        eventually(lambda: int(s2.files.read("/tmp/tick")) > before)
    finally:
        s.kill()


def test_traffic_to_a_paused_auto_resume_sandbox_resumes_it():
    s = Sandbox.create(
        metadata={"run": RUN},
        timeout=300,
        lifecycle={"on_timeout": "pause", "auto_resume": True},
    )
    try:
        s.files.write("/home/user/www/index.html", "woken by traffic")
        s.commands.run("cd /home/user/www && python3 -m http.server 8001", background=True)
        url = os.environ["E2B_API_URL"] + "/index.html"
        host = s.get_host(8001)

        def fetch():
            req = urllib.request.Request(url, headers={"Host": host})
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.read().decode()

        assert eventually(fetch) == "woken by traffic"
        s.pause()
        assert Sandbox.get_info(s.sandbox_id).state.value == "paused"
        # One request, no SDK call: the proxy resumes it and the server (kept in memory)
        # answers.
        assert fetch() == "woken by traffic"
        assert Sandbox.get_info(s.sandbox_id).state.value == "running"
    finally:
        s.kill()


def test_fork_copies_memory_and_files(sbx):
    sbx.files.write("/home/user/before-fork.txt", "in the source")
    copies = sbx.fork(count=1, timeout=120)
    assert len(copies) == 1 and not isinstance(copies[0], Exception), copies
    copy = copies[0]
    try:
        assert copy.sandbox_id != sbx.sandbox_id
        assert copy.files.read("/home/user/before-fork.txt") == "in the source"
        copy.files.write("/home/user/only-in-copy.txt", "x")
        assert not sbx.files.exists("/home/user/only-in-copy.txt")
        assert copy.commands.run("hostname").stdout.strip() == copy.sandbox_id
    finally:
        copy.kill()


def test_kill_and_a_killed_sandbox():
    s = Sandbox.create(metadata={"run": RUN}, timeout=120)
    s.kill()
    assert s.sandbox_id not in [x.sandbox_id for x in Sandbox.list().next_items()]
    with pytest.raises(SandboxException):
        s.commands.run("true")
    assert Sandbox.kill(s.sandbox_id) is False


# ---------------------------------------------------------------- errors


def test_unknown_template():
    with pytest.raises(SandboxException) as e:
        Sandbox.create(template="no-such-template-here")
    assert "not found" in str(e.value)


def test_bad_api_key():
    with pytest.raises(AuthenticationException):
        Sandbox.create(api_key="hk_not-a-real-key")


def test_a_template_without_bash_says_so():
    s = Sandbox.create(template="minimal", metadata={"run": RUN}, timeout=120)
    try:
        with pytest.raises(SandboxException) as e:
            s.commands.run("echo hi")
        assert "/bin/bash" in str(e.value) and "base" in str(e.value)
    finally:
        s.kill()
