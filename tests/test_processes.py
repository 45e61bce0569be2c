"""Background processes, stdin, terminals (PTY) and file watching, through the API, SDK and CLI."""

from __future__ import annotations

import json
import os
import threading
import time

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from cove import Sandbox
from cove.devserver import Server


def procs(sid: str, suffix: str = "") -> str:
    return f"/v1/sandboxes/{sid}/processes{suffix}"


def read_until(
    api: httpx.Client, sid: str, pid: str, needle: str, offset: int = 0, timeout: float = 10
) -> str:
    """The process's output from `offset` until `needle` appears (or it exits)."""
    text = ""
    deadline = time.monotonic() + timeout
    with api.stream("GET", procs(sid, f"/{pid}/output"), params={"offset": offset}, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line:
                continue
            event = json.loads(line)
            if event["type"] in ("stdout", "stderr"):
                text += event["data"]
            if needle in text or event["type"] == "exit" or time.monotonic() > deadline:
                break
    return text


def probe_http(api: httpx.Client, sid: str, port: int) -> str:
    code = (
        f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{port}', timeout=5).status)"
    )
    r = api.post(f"/v1/sandboxes/{sid}/exec", json={"argv": ["python3", "-c", code], "timeout": 20})
    return r.json()["stdout"].strip() or r.json()["stderr"]


def test_background_server_keeps_running_between_calls(api: httpx.Client, sandbox: dict) -> None:
    sid = sandbox["id"]
    r = api.post(procs(sid), json={"cmd": "python3 -m http.server 8000 --bind 127.0.0.1", "tag": "web"})
    assert r.status_code == 201, r.text
    proc = r.json()
    assert proc["running"] and proc["tag"] == "web"
    deadline = time.monotonic() + 10
    while probe_http(api, sid, 8000) != "200":
        assert time.monotonic() < deadline, "the background server never answered"
        time.sleep(0.2)
    time.sleep(0.3)
    assert probe_http(api, sid, 8000) == "200", "it must keep serving between calls"
    listed = api.get(procs(sid)).json()["items"]
    assert any(p["id"] == proc["id"] and p["running"] for p in listed)
    assert api.delete(procs(sid, f"/{proc['id']}")).status_code == 204
    done = api.post(procs(sid, f"/{proc['id']}/wait"), json={"timeout": 10}).json()
    assert done["running"] is False


def test_repl_fed_line_by_line(api: httpx.Client, sandbox: dict) -> None:
    sid = sandbox["id"]
    proc = api.post(procs(sid), json={"argv": ["python3", "-u", "-i", "-q"], "stdin": True}).json()
    pid = proc["id"]
    assert api.post(procs(sid, f"/{pid}/stdin"), json={"data": "x = 41\n"}).status_code == 204
    assert api.post(procs(sid, f"/{pid}/stdin"), json={"data": "print(x + 1)\n"}).status_code == 204
    assert "42" in read_until(api, sid, pid, "42")
    assert api.post(procs(sid, f"/{pid}/stdin/close")).status_code == 204
    done = api.post(procs(sid, f"/{pid}/wait"), json={"timeout": 10}).json()
    assert done == {"running": False, "exit_code": 0}
    r = api.post(procs(sid, f"/{pid}/stdin"), json={"data": "more\n"})
    assert r.status_code == 409, r.text


def test_output_is_kept_and_readable_from_an_offset(api: httpx.Client, sandbox: dict) -> None:
    sid = sandbox["id"]
    proc = api.post(procs(sid), json={"cmd": "printf 'one\\ntwo\\nthree\\n'"}).json()
    api.post(procs(sid, f"/{proc['id']}/wait"), json={"timeout": 10})
    assert read_until(api, sid, proc["id"], "three") == "one\ntwo\nthree\n"
    assert read_until(api, sid, proc["id"], "three", offset=4) == "two\nthree\n"


def test_unknown_process_and_bad_input(api: httpx.Client, sandbox: dict) -> None:
    sid = sandbox["id"]
    for method, suffix in (
        ("GET", "/nope"),
        ("GET", "/nope/output"),
        ("POST", "/nope/wait"),
        ("DELETE", "/nope"),
    ):
        r = api.request(method, procs(sid, suffix), json={} if method == "POST" else None)
        assert r.status_code == 404, (method, suffix, r.text)
    assert api.post(procs(sid), json={"cmd": "x", "argv": ["y"]}).status_code == 422
    assert api.post(procs(sid), json={"cmd": "bash", "pty": {"rows": 0, "cols": 80}}).status_code == 422


def test_pty_resize_and_stty(api: httpx.Client, sandbox: dict) -> None:
    sid = sandbox["id"]
    proc = api.post(procs(sid), json={"cmd": "bash --norc -i", "pty": {"rows": 24, "cols": 80}}).json()
    assert proc["pty"] == {"rows": 24, "cols": 80}
    assert api.post(procs(sid, f"/{proc['id']}/resize"), json={"rows": 40, "cols": 120}).status_code == 204
    api.post(procs(sid, f"/{proc['id']}/stdin"), json={"data": "stty size\n"})
    assert "40 120" in read_until(api, sid, proc["id"], "40 120")
    api.delete(procs(sid, f"/{proc['id']}"))


def test_ten_megabytes_through_a_pty_arrive_complete_and_in_order(
    server: Server, api: httpx.Client, sandbox: dict
) -> None:
    sid = sandbox["id"]
    proc = api.post(
        procs(sid), json={"cmd": "sleep 0.5; seq 1 1400000", "pty": {"rows": 24, "cols": 80}}
    ).json()
    url = server.url.replace("http://", "ws://") + procs(sid, f"/{proc['id']}/ws") + "?offset=0"
    got = bytearray()
    exit_info = None
    with connect(url, additional_headers={"Authorization": f"Bearer {server.api_key}"}, max_size=None) as ws:
        for message in ws:
            if isinstance(message, bytes):
                got += message
            else:
                exit_info = json.loads(message)
                break
    expected = "".join(f"{i}\n" for i in range(1, 1400001)).encode()
    assert len(expected) > 10_000_000
    assert bytes(got).replace(b"\r\n", b"\n") == expected
    assert exit_info is not None and exit_info["exit_code"] == 0


def test_websocket_needs_a_key(server: Server, sandbox: dict) -> None:
    url = server.url.replace("http://", "ws://") + procs(sandbox["id"], "/x/ws")
    with pytest.raises(InvalidStatus) as failed, connect(url) as ws:
        ws.recv(timeout=5)
    assert failed.value.response.status_code in (401, 403)


def test_watch_reports_api_and_process_writes(api: httpx.Client, sandbox: dict) -> None:
    sid = sandbox["id"]
    api.post(f"/v1/sandboxes/{sid}/files/mkdir", json={"path": "/home/user/w"})
    events: list[dict] = []
    ready = threading.Event()

    def watch() -> None:
        params = {"path": "/home/user/w", "recursive": "true"}
        with api.stream("GET", f"/v1/sandboxes/{sid}/files/watch", params=params, timeout=20) as r:
            for line in r.iter_lines():
                if line:
                    events.append(json.loads(line))
                    ready.set()
                if any(
                    e.get("path") == "/home/user/w/sub/by-process.txt" and e["type"] == "remove"
                    for e in events
                ):
                    return

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    assert ready.wait(10)
    api.put(f"/v1/sandboxes/{sid}/files", params={"path": "/home/user/w/by-api.txt"}, content=b"x")
    cmd = "mkdir /home/user/w/sub && sleep 0.2 && echo hi > /home/user/w/sub/p.txt && mv /home/user/w/sub/p.txt /home/user/w/sub/by-process.txt && rm /home/user/w/sub/by-process.txt"
    api.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": cmd})
    t.join(15)
    seen = {(e["type"], e["path"]) for e in events}
    assert events[0]["type"] == "watching"
    assert any(p.startswith("/home/user/w/") and "by-api" in p for _, p in seen), seen
    assert ("create", "/home/user/w/sub") in seen
    assert any(t == "rename" for t, _ in seen)
    assert ("remove", "/home/user/w/sub/by-process.txt") in seen, seen
    r = api.get(f"/v1/sandboxes/{sid}/files/watch", params={"path": "/home/user/nope"})
    assert r.status_code == 404


def test_sdk_processes_pty_and_watch(server: Server) -> None:
    with Sandbox.create(url=server.url, api_key=server.api_key) as sb:
        p = sb.processes.start("for i in 1 2 3; do echo line $i; done")
        p.wait(10)
        text = "".join(e.data for e in p.output() if e.type == "stdout")
        assert text == "line 1\nline 2\nline 3\n"
        repl = sb.processes.start(["cat"], stdin=True)
        repl.send_stdin("echoed\n")
        for event in repl.output():
            if "echoed" in event.data:
                break
        repl.close_stdin()
        assert repl.wait(10).exit_code == 0
        term = sb.pty.create("bash --norc -i", rows=30, cols=90)
        term.send_stdin("stty size; exit 7\n")
        out = "".join(e.data for e in term.output())
        assert "30 90" in out and term.wait(10).exit_code == 7
        assert [x.id for x in sb.processes.list()][:1]


def test_cli_shell_is_an_interactive_terminal(server: Server, sandbox: dict) -> None:
    import fcntl
    import pty
    import select
    import struct
    import sys
    import termios

    pid, fd = pty.fork()
    if pid == 0:  # the CLI in a terminal of 33 x 101
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
        os.environ.update(COVE_URL=server.url, COVE_API_KEY=server.api_key)
        os.execv(sys.executable, [sys.executable, "-m", "cove", "shell", sandbox["id"]])
    out, stage = b"", 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not select.select([fd], [], [], 1)[0]:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the CLI exited and closed the terminal
            break
        if not chunk:
            break
        out += chunk
        if stage == 0 and b"$" in out:
            os.write(fd, b"stty size\n")
            stage = 1
        elif stage == 1 and b"33 101" in out:
            # The window changes: SIGWINCH must reach the terminal in the sandbox.
            fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
            time.sleep(0.5)
            os.write(fd, b"stty size; exit 5\n")
            stage = 2
    for _ in range(50):  # the CLI exits right after the shell; never hang on it
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        raise AssertionError(f"cove shell did not exit; terminal showed {out[-500:]!r}")
    os.close(fd)
    assert b"33 101" in out, out[-500:]
    assert b"40 120" in out, out[-500:]
    assert os.waitstatus_to_exitcode(status) == 5


def test_cli_watch_prints_events(server: Server, api: httpx.Client, sandbox: dict) -> None:
    import queue
    import subprocess
    import sys
    import threading

    proc = subprocess.Popen(
        [sys.executable, "-m", "cove", "watch", sandbox["id"], "/home/user"],
        env=server.env,
        stdout=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
    try:
        # Written until the CLI reports it: its start (imports, connect, the watch set up) may take
        # seconds on a loaded machine, and a write before the watch exists is rightly not seen.
        line = None
        for i in range(60):
            api.put(
                f"/v1/sandboxes/{sandbox['id']}/files",
                params={"path": f"/home/user/seen{i}.txt"},
                content=b"x",
            )
            try:
                line = lines.get(timeout=0.5)
                break
            except queue.Empty:
                continue
        assert line is not None, "the CLI printed no event in 30 s"
        assert "/home/user/" in line and line.split()[0] in ("create", "write", "rename"), line
    finally:
        proc.terminate()
        proc.wait(10)


def test_cli_start_logs_signal_ps(server: Server, sandbox: dict) -> None:
    import subprocess
    import sys

    def cove(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cove", *args], env=server.env, capture_output=True, text=True, timeout=60
        )

    started = cove(
        "start", sandbox["id"], "--tag", "counter", "--", "for i in 1 2 3; do echo n$i; done; sleep 600"
    )
    assert started.returncode == 0, started.stderr
    pid = started.stdout.strip()
    listed = cove("ps", sandbox["id"])
    assert pid in listed.stdout and "running" in listed.stdout
    assert cove("signal", sandbox["id"], pid, "-s", "SIGKILL").returncode == 0
    logs = cove("logs", sandbox["id"], pid)
    assert logs.stdout == "n1\nn2\nn3\n" and logs.returncode == 137
    assert cove("logs", sandbox["id"], "0000ffff").returncode == 1
