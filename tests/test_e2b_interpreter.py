"""e2b's code interpreter and sandbox ports on cove, driven by the unmodified `e2b-code-interpreter` SDK.

The SDK is configured only by the `e2b_env` fixture. Servers inside sandboxes are started through
cove's own API (same key, so the same tenant), then reached through the cove URL the way e2b clients
do: `E2b-Sandbox-Id`/`E2b-Sandbox-Port` headers, or the host name `{port}-{id}.{domain}` (sent to
127.0.0.1 explicitly: `*.localhost` does not resolve everywhere).
"""

from __future__ import annotations

import asyncio
import base64
import errno
import fcntl
import hashlib
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from e2b import NotFoundException, SandboxException, TimeoutException
from e2b_code_interpreter import AsyncSandbox, Sandbox
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from conftest import Server
from cove.network import sandbox_socket
from port_app import start_app, wait_listening

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def api(e2b_env: Server) -> Iterator[httpx.Client]:
    with e2b_env.client() as c:
        yield c


@pytest.fixture
def sbx(e2b_env: Server) -> Iterator[Sandbox]:
    sb = Sandbox.create(timeout=300)
    try:
        yield sb
    finally:
        sb.kill()


def routed(sb: Sandbox, port: int) -> dict[str, str]:
    return {"E2b-Sandbox-Id": sb.sandbox_id, "E2b-Sandbox-Port": str(port)}


# -- code interpreter -------------------------------------------------------------------------------


def test_run_code_keeps_state_streams_output_and_reports_errors(kernel_ready: None, sbx: Sandbox) -> None:
    assert sbx.run_code("x = 41").error is None
    execution = sbx.run_code("x + 1")
    assert execution.text == "42" and execution.results[0].is_main_result
    assert execution.execution_count == 2
    assert sbx.run_code("'a string'").text == "a string"  # e2b shows strings without their quotes

    out: list[str] = []
    err: list[str] = []
    results = []
    execution = sbx.run_code(
        "import sys\nprint('to out')\nprint('to err', file=sys.stderr)\nx * 2",
        on_stdout=lambda m: out.append(m.line),
        on_stderr=lambda m: err.append(m.line),
        on_result=results.append,
    )
    assert "".join(out) == "to out\n" and "".join(err) == "to err\n"
    assert execution.logs.stdout == out and execution.logs.stderr == err
    assert [r.text for r in results] == ["82"]

    errors = []
    execution = sbx.run_code("def f():\n    return 1 / 0\nf()", on_error=errors.append)
    assert execution.error is not None and errors == [execution.error]
    assert execution.error.name == "ZeroDivisionError"
    assert "division by zero" in execution.error.value
    assert "return 1 / 0" in execution.error.traceback and isinstance(execution.error.traceback, str)
    assert sbx.run_code("x").text == "41"  # an error does not lose the state


def test_env_vars_hold_for_one_run_only(kernel_ready: None, sbx: Sandbox) -> None:
    code = "import os, subprocess\nprint(os.environ.get('COVE_E2B'), subprocess.run(['sh', '-c', 'echo $COVE_E2B'], capture_output=True, text=True).stdout.strip())"
    assert sbx.run_code(code, envs={"COVE_E2B": "set"}).logs.stdout == ["set set\n"]
    assert sbx.run_code(code).logs.stdout == ["None \n"]
    bash = sbx.run_code("echo [$COVE_E2B]", language="bash", envs={"COVE_E2B": "in bash"})
    assert bash.logs.stdout == ["[in bash]\n"]
    assert sbx.run_code("echo [$COVE_E2B]", language="bash").logs.stdout == ["[]\n"]


def test_matplotlib_chart_comes_back_as_png(kernel_ready: None, sbx: Sandbox) -> None:
    execution = sbx.run_code(
        "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.title('cove')\nplt.show()"
    )
    pngs = [r.png for r in execution.results if r.png]
    assert pngs, execution
    assert base64.b64decode(pngs[0]).startswith(b"\x89PNG\r\n\x1a\n")
    assert "png" in execution.results[0].formats()
    html = sbx.run_code("from IPython.display import HTML, display\ndisplay(HTML('<b>bold</b>'))")
    assert html.results[0].html == "<b>bold</b>" and not html.results[0].is_main_result


CHARTS = """
import datetime
import matplotlib.pyplot as plt
import numpy as np

def line():
    fig, ax = plt.subplots()
    ax.plot([1, 2, 3], [2, 4, 3], label="speed")
    ax.plot([1, 2, 3], [1, 1, 5], label="cost")
    ax.set_title("Two lines"); ax.set_xlabel("time (s)"); ax.set_ylabel("speed [m/s]"); ax.legend()
    plt.show()

def dates():
    fig, ax = plt.subplots()
    ax.plot([datetime.date(2026, 1, d) for d in (1, 2, 3)], [5, 6, 7])
    plt.show()

def bars():
    fig, ax = plt.subplots()
    ax.bar(["apples", "pears", "plums"], [10, 20, 15], label="2026")
    ax.set_title("Fruit"); ax.set_ylabel("count")
    plt.show()

def scatter():
    fig, ax = plt.subplots()
    ax.scatter([1.5, 2.5], [3.5, 0.5], label="points")
    plt.show()

def pie():
    fig, ax = plt.subplots()
    ax.pie([1, 3], labels=["small", "big"])
    plt.show()

def box(patch_artist):
    fig, ax = plt.subplots()
    ax.boxplot([[1, 2, 3, 4, 5], [2, 4, 6, 8, 10, 40]], patch_artist=patch_artist)
    ax.set_xticks([1, 2], ["a", "b"])
    plt.show()

def composite():
    fig, (left, right) = plt.subplots(1, 2)
    left.plot([0, 1], [0, 1]); right.bar(["x", "y"], [3, 4])
    fig.suptitle("Both")
    plt.show()
"""


def _chart(sbx: Sandbox, call: str) -> object:
    execution = sbx.run_code(call)
    assert execution.error is None, execution.error
    charts = [r.chart for r in execution.results if r.chart is not None]
    assert len(charts) == 1 and execution.results[0].png, execution.results
    return charts[0]


def test_charts_come_back_as_data_and_dataframes_as_columns(kernel_ready: None, sbx: Sandbox) -> None:
    """e2b's `result.chart`: the element data of matplotlib's line, bar, scatter, pie, box-and-whisker
    and composite charts, read from the figure; `result.data`: a DataFrame's columns."""
    from e2b_code_interpreter.charts import (
        BarChart,
        BoxAndWhiskerChart,
        ChartType,
        LineChart,
        PieChart,
        ScatterChart,
        SuperChart,
    )

    assert sbx.run_code(CHARTS).error is None
    line = _chart(sbx, "line()")
    assert isinstance(line, LineChart) and line.title == "Two lines"
    assert (line.x_label, line.x_unit, line.y_unit) == ("time (s)", "s", "m/s")
    assert [(e.label, e.points) for e in line.elements] == [
        ("speed", [(1, 2), (2, 4), (3, 3)]),
        ("cost", [(1, 1), (2, 1), (3, 5)]),
    ]
    assert line.x_scale.value == "linear" and line.x_ticks and len(line.x_ticks) == len(line.x_tick_labels)

    dated = _chart(sbx, "dates()")
    assert dated.x_scale.value == "datetime"
    assert [p[0][:10] for p in dated.elements[0].points] == ["2026-01-01", "2026-01-02", "2026-01-03"]

    bars = _chart(sbx, "bars()")
    assert isinstance(bars, BarChart) and (bars.title, bars.y_label) == ("Fruit", "count")
    assert [(e.label, e.value, e.group) for e in bars.elements] == [
        ("apples", 10, "2026"),
        ("pears", 20, "2026"),
        ("plums", 15, "2026"),
    ]

    scatter = _chart(sbx, "scatter()")
    assert isinstance(scatter, ScatterChart)
    assert [(e.label, e.points) for e in scatter.elements] == [("points", [(1.5, 3.5), (2.5, 0.5)])]

    pie = _chart(sbx, "pie()")
    assert isinstance(pie, PieChart)
    assert [(e.label, round(e.angle), e.radius) for e in pie.elements] == [("small", 90, 1), ("big", 270, 1)]

    for patch_artist in ("False", "True"):  # boxes drawn as lines, or as patches
        box = _chart(sbx, f"box({patch_artist})")
        assert isinstance(box, BoxAndWhiskerChart), (patch_artist, box.to_dict())
        got = [
            (e.label, e.min, e.first_quartile, e.median, e.third_quartile, e.max, e.outliers)
            for e in box.elements
        ]
        assert got == [("a", 1, 2, 3, 4, 5, []), ("b", 2, 4.5, 7, 9.5, 10, [40])], (patch_artist, got)

    both = _chart(sbx, "composite()")
    assert isinstance(both, SuperChart) and both.title == "Both"
    assert [c.type for c in both.elements] == [ChartType.LINE, ChartType.BAR]

    frame = sbx.run_code(
        "import pandas as pd\npd.DataFrame({'n': [1, 2], 'when': pd.to_datetime(['2026-01-01', '2026-02-01'])})"
    )
    assert frame.error is None, frame.error
    main = frame.results[0]
    assert main.is_main_result and "<table" in (main.html or "")
    assert main.data == {"n": [1, 2], "when": ["2026-01-01T00:00:00", "2026-02-01T00:00:00"]}
    assert "data" in main.formats() and sbx.run_code("1 + 1").results[0].data is None


def test_contexts_create_list_restart_remove(kernel_ready: None, sbx: Sandbox) -> None:
    ctx = sbx.create_code_context(cwd="/tmp")
    assert ctx.language == "python" and ctx.cwd == "/tmp"
    assert sbx.run_code("import os; os.getcwd()", context=ctx).text == "/tmp"
    sbx.run_code("y = 'in context'", context=ctx)
    assert sbx.run_code("y", context=ctx).text == "in context"
    assert sbx.run_code("'y' in globals()").text == "False"  # the default context is another one

    listed = {c.id: c for c in sbx.list_code_contexts()}
    assert ctx.id in listed and listed[ctx.id].cwd == "/tmp" and listed[ctx.id].language == "python"

    sbx.restart_code_context(ctx)
    assert sbx.run_code("y", context=ctx).error.name == "NameError"  # a fresh interpreter

    sbx.remove_code_context(ctx.id)
    assert ctx.id not in {c.id for c in sbx.list_code_contexts()}
    with pytest.raises(NotFoundException, match="not found"):
        sbx.run_code("1", context=ctx)
    with pytest.raises(NotFoundException):
        sbx.remove_code_context(ctx.id)
    with pytest.raises(NotFoundException):
        sbx.restart_code_context("no-such-context")


def test_bash_and_javascript_are_languages_too_and_others_are_refused(
    kernel_ready: None, sbx: Sandbox
) -> None:
    sbx.run_code("cd /tmp && GREETING=hi", language="bash")
    execution = sbx.run_code("echo $GREETING from $(pwd)", language="bash")
    assert execution.logs.stdout == ["hi from /tmp\n"] and execution.error is None
    failed = sbx.run_code("false", language="bash")
    assert failed.error is not None and "1" in failed.error.value
    ctx = sbx.create_code_context(language="bash")
    assert ctx.language == "bash"
    assert sbx.run_code("echo $GREETING", context=ctx).logs.stdout == ["\n"]  # its own shell
    # JavaScript (Node.js), as e2b's `js` kernel: state kept, the last value the result.
    sbx.run_code("const items = [3, 1, 2]", language="js")
    assert sbx.run_code("items.sort().join(',')", language="javascript").text == "1,2,3"
    js = sbx.create_code_context(language="javascript", cwd="/tmp")
    assert js.language == "javascript" and sbx.run_code("process.cwd()", context=js).text == "/tmp"
    failed = sbx.run_code("undefinedThing()", context=js)
    assert failed.error is not None and failed.error.name == "ReferenceError"
    assert sbx.run_code("const n: number = 41; n + 1", language="ts").text == "42"  # TypeScript
    if os.path.exists("/usr/share/jupyter/kernels/ir/kernel.json"):  # R, as e2b's `r` kernel
        assert sbx.run_code("v <- 20; v + 22", language="r").results[0].text == "[1] 42"
    if shutil.which("jshell"):  # Java, as e2b's `java` kernel
        assert sbx.run_code("int v = 20; v + 22", language="java").results[0].text == "42"
    # cove's contexts are python, javascript, typescript, r, java and bash; others get a clear error.
    with pytest.raises(SandboxException, match="not supported"):
        sbx.run_code("1 + 1", language="scala")
    with pytest.raises(SandboxException, match="not supported"):
        sbx.create_code_context(language="cobol")


def test_the_interpreter_answers_health_and_comes_back_after_its_kernel_is_killed(
    kernel_ready: None, e2b_env: Server, sbx: Sandbox
) -> None:
    with httpx.Client(base_url=e2b_env.url, headers=routed(sbx, 49999), timeout=30) as c:
        r = c.get("/health")
        assert r.status_code == 200 and r.text == "OK"
    sbx.run_code("lost = 1")
    killed = sbx.commands.run(
        "pkill -KILL -f '[k]ernel_bridge'; sleep 0.5; pgrep -f '[k]ernel_bridge' || echo none", user="root"
    )
    assert killed.stdout.strip() == "none"
    # The next run starts a fresh default context (its variables went with the killed one).
    assert sbx.run_code("1 + 1").text == "2"
    assert sbx.run_code("'lost' in globals()").text == "False"


def test_timeout_interrupts_the_run_and_the_context_goes_on(kernel_ready: None, sbx: Sandbox) -> None:
    sbx.run_code("kept = 'still here'")
    started = time.monotonic()
    with pytest.raises(TimeoutException):
        sbx.run_code("import time\nwhile True: time.sleep(0.05)", timeout=2)
    # The dropped connection interrupted the loop: the next run does not queue behind it.
    execution = sbx.run_code("kept", timeout=30)
    assert execution.text == "still here"
    assert time.monotonic() - started < 20


def test_interpreter_requires_the_sandboxs_token(kernel_ready: None, e2b_env: Server, sbx: Sandbox) -> None:
    url = f"{e2b_env.url}/execute"
    body = {"code": "1 + 1"}
    r = httpx.post(url, headers=routed(sbx, 49999), json=body)
    assert r.status_code == 401
    r = httpx.post(url, headers={**routed(sbx, 49999), "X-Access-Token": "wrong"}, json=body)
    assert r.status_code == 401
    token = {"E2B-Traffic-Access-Token": sbx.traffic_access_token or ""}
    r = httpx.post(url, headers={**routed(sbx, 49999), **token}, json=body)
    assert r.status_code == 200 and '"text": "2"' in r.text
    r = httpx.post(url, headers={**routed(sbx, 49999), **token}, json={"code": 1})
    assert r.status_code == 400 and "code" in r.text
    r = httpx.post(
        url,
        headers={**routed(sbx, 49999), **token},
        json={"code": "1", "context_id": "x", "language": "python"},
    )
    assert r.status_code == 400 and "Only one of" in r.text


def test_async_sdk_runs_code_and_manages_contexts(kernel_ready: None, e2b_env: Server) -> None:
    async def main() -> None:
        sb = await AsyncSandbox.create(timeout=300)
        try:
            await sb.run_code("n = 20")
            seen: list[str] = []

            async def on_stdout(m: object) -> None:
                seen.append(m.line)  # type: ignore[attr-defined]

            execution = await sb.run_code("print('hello'); n + 1", on_stdout=on_stdout)
            assert execution.text == "21" and seen == ["hello\n"]
            png = await sb.run_code("import matplotlib.pyplot as plt\nplt.bar([1, 2], [3, 4]); plt.show()")
            assert base64.b64decode(png.results[0].png).startswith(b"\x89PNG")
            error = (await sb.run_code("raise ValueError('bad')")).error
            assert error.name == "ValueError" and error.value == "bad"
            ctx = await sb.create_code_context(cwd="/home/user", language="bash")
            assert ctx.id in {c.id for c in await sb.list_code_contexts()}
            assert (await sb.run_code("echo $PWD", context=ctx)).logs.stdout == ["/home/user\n"]
            await sb.restart_code_context(ctx)
            await sb.remove_code_context(ctx)
            assert ctx.id not in {c.id for c in await sb.list_code_contexts()}
        finally:
            await sb.kill()

    asyncio.run(main())


# -- ports ------------------------------------------------------------------------------------------


def test_get_host_reaches_a_server_in_the_sandbox(e2b_env: Server, api: httpx.Client, sbx: Sandbox) -> None:
    r = api.post(
        f"/v1/sandboxes/{sbx.sandbox_id}/processes",
        json={
            "cmd": "mkdir -p /tmp/site && echo served > /tmp/site/index.txt && cd /tmp/site && exec python3 -m http.server 8001"
        },
    )
    assert r.status_code == 201, r.text
    wait_listening(api, sbx.sandbox_id, 8001)
    host = sbx.get_host(8001)
    assert host == f"8001-{sbx.sandbox_id}.{sbx.sandbox_domain}"

    by_header = httpx.get(f"{e2b_env.url}/index.txt", headers=routed(sbx, 8001))
    assert by_header.status_code == 200 and by_header.text == "served\n"
    by_host = httpx.get(f"{e2b_env.url}/index.txt", headers={"Host": host})
    assert by_host.status_code == 200 and by_host.text == "served\n"
    listing = httpx.get(f"{e2b_env.url}/", headers={"Host": host})
    assert "index.txt" in listing.text
    missing = httpx.get(f"{e2b_env.url}/nothing", headers={"Host": host})
    assert missing.status_code == 404  # the server's own answer, passed through


def test_proxy_streams_both_ways_and_forwards_headers(
    e2b_env: Server, api: httpx.Client, sbx: Sandbox
) -> None:
    start_app(api, sbx.sandbox_id, 8002)
    base, headers = e2b_env.url, routed(sbx, 8002)

    seen = httpx.get(
        f"{base}/headers?a=1&b=%2F", headers={**headers, "X-Access-Token": "secret", "X-Custom": "kept"}
    ).json()
    names = {k.lower(): v for k, v in seen["headers"].items()}
    assert seen["path"] == "/headers?a=1&b=%2F"
    assert names["x-custom"] == "kept" and "x-forwarded-for" in names
    assert not {"x-access-token", "e2b-sandbox-id", "e2b-sandbox-port"} & set(names)
    assert names["host"] == e2b_env.url.removeprefix("http://")

    body = os.urandom(8 << 20)
    r = httpx.post(f"{base}/echo", headers=headers, content=body, timeout=60)
    assert r.json() == {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}

    def chunks() -> Iterator[bytes]:
        for i in range(50):
            yield bytes([i]) * 10_000

    r = httpx.post(f"{base}/echo", headers=headers, content=chunks(), timeout=60)
    assert r.json() == {"size": 500_000, "sha256": hashlib.sha256(b"".join(chunks())).hexdigest()}

    # The first chunk arrives while the server still holds back the rest.
    with httpx.stream("GET", f"{base}/stream", headers=headers, timeout=30) as r:
        pieces = r.iter_raw()
        assert next(pieces) == b"first\n"
        assert (
            api.post(f"/v1/sandboxes/{sbx.sandbox_id}/exec", json={"cmd": "touch /tmp/go"}).json()[
                "exit_code"
            ]
            == 0
        )
        assert b"".join(pieces) == b"second\n"


def test_websocket_pass_through(e2b_env: Server, api: httpx.Client, sbx: Sandbox) -> None:
    start_app(api, sbx.sandbox_id, 8003)
    url = e2b_env.url.replace("http://", "ws://") + "/socket?x=1"
    with ws_connect(url, additional_headers=routed(sbx, 8003), subprotocols=["chat.v1"]) as ws:
        assert ws.subprotocol == "chat.v1"
        assert ws.recv(timeout=10) == "path=/socket?x=1"
        ws.send("hello")
        assert ws.recv(timeout=10) == "hello"
        blob = os.urandom(300_000)
        ws.send(blob)
        assert ws.recv(timeout=10) == blob
    host = {"Host": sbx.get_host(8003)}
    with ws_connect(url, additional_headers=host) as ws:
        assert ws.recv(timeout=10) == "path=/socket?x=1"
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(url, additional_headers=routed(sbx, 8009), open_timeout=10)
    assert refused.value.response.status_code == 502
    assert b"port is not open" in refused.value.response.body


def test_closed_port_is_a_502_that_says_so(e2b_env: Server, sbx: Sandbox) -> None:
    r = httpx.get(f"{e2b_env.url}/", headers=routed(sbx, 8765))
    assert r.status_code == 502 and "port is not open" in r.json()["message"]
    r = httpx.get(f"{e2b_env.url}/", headers={"Host": sbx.get_host(8765)})
    assert r.status_code == 502 and "port is not open" in r.text
    r = httpx.get(f"{e2b_env.url}/", headers={**routed(sbx, 8765), "E2b-Sandbox-Id": "nosuchsandbox"})
    assert r.status_code == 502 and "was not found" in r.text


def test_public_traffic_off_requires_the_traffic_token(e2b_env: Server, api: httpx.Client) -> None:
    sb = Sandbox.create(timeout=300, network={"allow_public_traffic": False})
    try:
        assert sb.traffic_access_token
        start_app(api, sb.sandbox_id, 8004)
        url = f"{e2b_env.url}/headers"
        r = httpx.get(url, headers=routed(sb, 8004))
        assert r.status_code == 403 and "traffic" in r.text
        r = httpx.get(url, headers={**routed(sb, 8004), "E2B-Traffic-Access-Token": "wrong"})
        assert r.status_code == 403
        r = httpx.get(url, headers={**routed(sb, 8004), "E2B-Traffic-Access-Token": sb.traffic_access_token})
        assert r.status_code == 200
        assert "e2b-traffic-access-token" not in {k.lower() for k in r.json()["headers"]}
        # Code still runs: the SDK sends its envd token and the traffic token.
    finally:
        sb.kill()


# -- the sockets under the proxy --------------------------------------------------------------------


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _netns() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def _socket_netns(sock: socket.socket) -> int:
    """The network namespace a socket belongs to (SIOCGSKNS gives an fd of it)."""
    fd = fcntl.ioctl(sock.fileno(), 0x894C)
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


@pytest.fixture
def other_netns() -> Iterator[subprocess.Popen[bytes]]:
    """A process in a network namespace of its own (as a sandbox's init is)."""
    proc = subprocess.Popen(["unshare", "--net", "sleep", "120"])
    try:
        deadline = time.monotonic() + 5
        while os.stat(f"/proc/{proc.pid}/ns/net").st_ino == _netns():  # until unshare has run
            assert time.monotonic() < deadline
            time.sleep(0.01)
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_sockets_belong_to_the_sandbox_and_the_thread_comes_back(
    other_netns: subprocess.Popen[bytes],
) -> None:
    from cove.syscalls import process_start_time

    pid = other_netns.pid
    start = process_start_time(pid)
    sandbox_socket.home_netns()  # opened once, kept
    fds = _fds()
    for _ in range(3):
        outcome = _in_thread(lambda: sandbox_socket.open_sockets(pid, start, (socket.AF_INET,)))
        assert outcome["netns_kept"], outcome
        [sock] = outcome["result"]  # type: ignore[misc]
        assert _socket_netns(sock) == os.stat(f"/proc/{pid}/ns/net").st_ino != _netns()
        sock.close()
    assert _fds() == fds

    # A stale record (same pid, another start time) is refused before entering anything.
    outcome = _in_thread(lambda: sandbox_socket.open_sockets(pid, start + 1, (socket.AF_INET,)))
    assert isinstance(outcome["error"], sandbox_socket.SandboxGone) and outcome["netns_kept"]
    assert _fds() == fds


def _in_thread(fn: Callable[[], object]) -> dict[str, object]:
    """fn() in a new thread: its result or error, and whether the thread ended in its own netns."""
    outcome: dict[str, object] = {}

    def run() -> None:
        before = _netns()
        try:
            outcome["result"] = fn()
        except Exception as e:
            outcome["error"] = e
        outcome["netns_kept"] = _netns() == before

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return outcome


def test_a_failure_inside_the_namespace_leaves_no_fd_and_the_thread_at_home(
    other_netns: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    from cove.syscalls import process_start_time

    pid, start = other_netns.pid, process_start_time(other_netns.pid)
    sandbox_socket.home_netns()
    real_socket, real_setns = socket.socket, sandbox_socket.setns
    both = (socket.AF_INET, socket.AF_INET6)
    fds = _fds()

    calls: list[int] = []

    def failing_socket(fail_on: int) -> Callable[..., socket.socket]:
        def make(*args: object) -> socket.socket:
            calls.append(1)
            if len(calls) == fail_on:
                raise OSError(24, "Too many open files")
            return real_socket(*args)  # type: ignore[arg-type]

        return make

    # The first (required) family fails: the error comes out, the thread is back home.
    monkeypatch.setattr(sandbox_socket.socket, "socket", failing_socket(1))
    outcome = _in_thread(lambda: sandbox_socket.open_sockets(pid, start, both))
    assert isinstance(outcome["error"], OSError) and outcome["netns_kept"]
    assert _fds() == fds

    # The optional family (IPv6) fails: IPv4 alone is returned.
    calls.clear()
    monkeypatch.setattr(sandbox_socket.socket, "socket", failing_socket(2))
    outcome = _in_thread(lambda: sandbox_socket.open_sockets(pid, start, both))
    assert outcome["netns_kept"]
    [sock] = outcome["result"]  # type: ignore[misc]
    sock.close()
    monkeypatch.setattr(sandbox_socket.socket, "socket", real_socket)
    assert _fds() == fds

    # Going back fails: the sockets are closed and the error says the thread is stuck (it then ends).
    def setns_once(fd: int, nstype: int) -> None:
        if fd == sandbox_socket.home_netns():
            raise OSError(1, "Operation not permitted")
        real_setns(fd, nstype)

    monkeypatch.setattr(sandbox_socket, "setns", setns_once)
    outcome = _in_thread(lambda: sandbox_socket.open_sockets(pid, start, both))
    assert isinstance(outcome["error"], sandbox_socket.NamespaceStuck) and not outcome["netns_kept"]
    assert _fds() == fds
    monkeypatch.setattr(sandbox_socket, "setns", real_setns)
    assert _netns() == os.stat("/proc/self/ns/net").st_ino  # this thread never moved

    # An ended process: a clean SandboxGone, nothing left open.
    other_netns.kill()
    other_netns.wait()
    with pytest.raises(sandbox_socket.SandboxGone):
        sandbox_socket.open_sockets(pid, start, (socket.AF_INET,))
    assert _fds() == fds


def test_async_connect_reports_closed_ports_and_gone_sandboxes(other_netns: subprocess.Popen[bytes]) -> None:
    from cove.syscalls import process_start_time

    handle = {"pid": other_netns.pid, "start_time": process_start_time(other_netns.pid)}

    async def main() -> None:
        sandbox_socket.home_netns()  # opened once per process, on first use: not a leak
        fds = _fds()
        # Loopback is down in this bare namespace: no route (on the host it would be refused).
        with pytest.raises(OSError) as unreachable:
            await sandbox_socket.connect(handle, 8080)
        assert unreachable.value.errno == errno.ENETUNREACH
        with pytest.raises(sandbox_socket.SandboxGone):
            await sandbox_socket.connect({**handle, "start_time": handle["start_time"] + 1}, 8080)
        with pytest.raises(sandbox_socket.SandboxGone):
            await sandbox_socket.connect({}, 8080)
        assert _fds() == fds

    asyncio.run(main())
