"""The kernel layer and the kernel bridge (code contexts), run on the host.

The kernel venv is built once per recipe into ``/var/cache/cove-test-kernel/<recipe_digest>`` (about
15 s from a nearby index); the bridge runs under that venv's interpreter with the layer mapped at
``/opt/cove/kernel`` by the same mount-namespace mapping the build uses.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cove.guest import protocol
from cove.storage import kernel_layer

CACHE = Path(os.environ.get("COVE_TEST_KERNEL_CACHE", "/var/cache/cove-test-kernel"))
BRIDGE = Path(__file__).resolve().parent.parent / "src/cove/guest/kernel_bridge.py"
PYTHON = kernel_layer.MOUNT_PATH + "/bin/python"

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="session")
def kernel_layer_root() -> Path:
    if sys.platform != "linux" or os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("the kernel layer needs Linux, root and unshare (mount namespaces)")
    if not os.path.exists("/usr/bin/python3"):
        pytest.skip("no /usr/bin/python3 to make the kernel venv from")
    try:
        return kernel_layer.build_cached(CACHE)
    except kernel_layer.KernelLayerError as exc:
        text = str(exc)
        if any(
            s in text for s in ("No matching distribution", "Could not find a version", "NewConnectionError")
        ):
            pytest.skip(f"the package index (PyPI) is unreachable: {text.splitlines()[-1]}")
        raise


class Client:
    def __init__(self, path: str, proc: subprocess.Popen, deadline: float = 90) -> None:
        end = time.monotonic() + deadline
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"bridge exited with {proc.returncode}: {proc.stderr.read()!r}")
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > end:
                    raise
                time.sleep(0.1)

    def request(self, req: dict) -> tuple[list[dict], dict]:
        protocol.send_frame(self.sock, protocol.KIND_JSON, protocol.dumps(req).encode())
        events = []
        while True:
            frame = protocol.recv_frame(self.sock)
            assert frame is not None, "bridge closed the connection"
            kind, payload = frame
            assert kind == protocol.KIND_JSON
            msg = protocol.decode_json(payload)
            if "ok" in msg:
                return events, msg
            events.append(msg)

    def run(self, code: str, timeout: float | None = 60) -> tuple[list[dict], dict]:
        return self.request({"op": "run", "code": code, "timeout": timeout})

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def bridge(kernel_layer_root, tmp_path):
    started: list[subprocess.Popen] = []

    def start(language: str = "python", env: dict | None = None) -> Client:
        sock = str(tmp_path / f"bridge-{len(started)}.sock")
        work = tmp_path / "work"
        work.mkdir(exist_ok=True)
        argv = [PYTHON, str(BRIDGE), "--socket", sock, "--cwd", str(work), "--language", language]
        if env:
            argv += ["--env-json", protocol.dumps(env)]
        proc = subprocess.Popen(
            kernel_layer.mapped_argv(kernel_layer_root, argv),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        started.append(proc)
        return Client(sock, proc)

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(15)
        # Whatever is left of the group (kernel, shell, their children).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()


def _text(events: list[dict], stream: str) -> str:
    return "".join(e["text"] for e in events if e.get("event") == stream)


def _results(events: list[dict]) -> list[dict]:
    return [e["data"] for e in events if e.get("event") == "result"]


def test_layer_recipe_and_mapping(kernel_layer_root):
    venv = kernel_layer_root / kernel_layer.LAYER_SUBDIR
    assert (venv / "pyvenv.cfg").read_text().count(kernel_layer.MOUNT_PATH) == 1  # built at its sandbox path
    assert (venv / "bin/jupyter").read_text().startswith(f"#!{kernel_layer.MOUNT_PATH}/bin/python")
    assert kernel_layer_root.name == kernel_layer.recipe_digest()
    assert len(kernel_layer.recipe_digest()) == 32
    out = subprocess.run(
        kernel_layer.mapped_argv(
            kernel_layer_root,
            [PYTHON, "-c", "import sys, ipykernel, jupyter_client, matplotlib; print(sys.prefix)"],
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == kernel_layer.MOUNT_PATH
    assert not os.path.exists("/opt/cove/kernel/bin")  # nothing leaked into the host's view


def test_state_persists_between_runs(bridge):
    c = bridge()
    _, reply = c.request({"op": "ping"})
    assert reply == {"ok": True, "language": "python"}
    events, reply = c.run("x = 41")
    assert reply == {"ok": True, "error": None, "execution_count": 1}
    assert events == []
    events, reply = c.run("x + 1")
    assert reply["ok"] and reply["error"] is None and reply["execution_count"] == 2
    assert _results(events) == [{"text/plain": "42"}]


def test_stdout_stderr_and_rich_results(bridge):
    c = bridge(env={"COVE_TEST_VAR": "hello"})
    events, reply = c.run(
        "import os, sys\nprint('out', os.environ['COVE_TEST_VAR'])\nprint('err', file=sys.stderr)\n"
        "from IPython.display import HTML, Markdown, display\n"
        "display(HTML('<b>hi</b>'))\nMarkdown('# title')"
    )
    assert reply["error"] is None
    assert _text(events, "stdout") == "out hello\n"
    assert _text(events, "stderr") == "err\n"
    results = _results(events)
    assert results[0]["text/html"] == "<b>hi</b>"
    assert results[1]["text/markdown"] == "# title"
    events, _ = c.run("import os; os.getcwd()")
    assert _results(events)[0]["text/plain"].endswith("/work'")


def test_exception(bridge):
    c = bridge()
    _events, reply = c.run("def f():\n    raise ValueError('bad value')\nf()")
    assert reply["ok"] is True
    err = reply["error"]
    assert err["name"] == "ValueError"
    assert err["value"] == "bad value"
    assert any("ValueError" in line for line in err["traceback"])
    assert not any("\x1b[" in line for line in err["traceback"])
    _, reply = c.run("1")
    assert reply["error"] is None


def test_matplotlib_png(bridge):
    c = bridge()
    events, reply = c.run("import matplotlib.pyplot as plt\nplt.plot([1, 2], [3, 4])\nplt.show()")
    assert reply["error"] is None, reply
    pngs = [r["image/png"] for r in _results(events) if "image/png" in r]
    assert len(pngs) == 1
    assert base64.b64decode(pngs[0]).startswith(b"\x89PNG\r\n\x1a\n")
    # A figure as the last expression.
    events, reply = c.run("fig, ax = plt.subplots()\nax.bar([1, 2], [3, 4])\nplt.close(fig)\nfig")
    assert reply["error"] is None, reply
    assert any("image/png" in r for r in _results(events))


def test_timeout_interrupts_and_context_survives(bridge):
    c = bridge()
    c.run("y = 5")
    start = time.monotonic()
    _, reply = c.run("while True: pass", timeout=2)
    assert time.monotonic() - start < 10
    assert reply["ok"] is True
    assert reply["error"]["name"] == "TimeoutError"
    events, reply = c.run("1 + 1")
    assert reply["error"] is None
    assert _results(events) == [{"text/plain": "2"}]
    events, _ = c.run("y")
    assert _results(events) == [{"text/plain": "5"}]  # interrupted, not restarted


def test_kernel_death_and_restart(bridge):
    c = bridge()
    _, reply = c.run("import os; os._exit(1)")
    assert reply["ok"] is False
    assert reply["error"]["code"] == "kernel_died"
    _, reply = c.run("1 + 1")
    assert reply["ok"] is False and reply["error"]["code"] == "kernel_died"
    _, reply = c.request({"op": "restart"})
    assert reply == {"ok": True}
    events, reply = c.run("1 + 1")
    assert reply["ok"] and reply["error"] is None
    assert _results(events) == [{"text/plain": "2"}]


def test_invalid_requests(bridge):
    c = bridge()
    _, reply = c.request({"op": "nope"})
    assert reply["ok"] is False and reply["error"]["code"] == "invalid"
    _, reply = c.request({"op": "run", "code": 5})
    assert reply["ok"] is False and reply["error"]["code"] == "invalid"


def test_bash_context(bridge):
    c = bridge("bash")
    _, reply = c.request({"op": "ping"})
    assert reply == {"ok": True, "language": "bash"}
    events, reply = c.run("mkdir -p sub && cd sub\nFOO=bar")
    assert reply == {"ok": True, "error": None, "execution_count": 1, "exit_code": 0}
    events, reply = c.run('echo "$FOO in $(basename "$PWD")"; echo oops >&2; printf "no newline"')
    assert reply["error"] is None
    assert _text(events, "stdout") == "bar in sub\nno newline"
    assert _text(events, "stderr") == "oops\n"
    _, reply = c.run("false")
    assert reply["exit_code"] == 1 and reply["error"]["name"] == "NonZeroExit"
    start = time.monotonic()
    _, reply = c.run("while true; do :; done", timeout=1)
    assert time.monotonic() - start < 8
    assert reply["error"]["name"] == "TimeoutError"
    _, reply = c.run("sleep 30", timeout=1)
    assert reply["error"]["name"] == "TimeoutError"
    events, reply = c.run('echo "$FOO $(basename "$PWD")"')
    assert _text(events, "stdout") == "bar sub\n"
    _, reply = c.run("exit 3")
    assert reply["ok"] is False and reply["error"]["code"] == "kernel_died"
    _, reply = c.request({"op": "restart"})
    assert reply == {"ok": True}
    events, reply = c.run("echo again")
    assert _text(events, "stdout") == "again\n"
