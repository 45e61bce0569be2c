"""Code contexts: persistent interpreters in a sandbox (real Jupyter kernels and bash)."""

from __future__ import annotations

import base64
import json
import os
import shutil

import httpx
import pytest

from cove import Sandbox
from cove.devserver import Server
from cove.node import checkpoint

pytestmark = pytest.mark.timeout(300)


def run(api: httpx.Client, sid: str, code: str, **kw: object) -> list[dict]:
    with api.stream("POST", f"/v1/sandboxes/{sid}/code", json={"code": code, **kw}, timeout=180) as r:
        assert r.status_code == 200, r.read()
        return [json.loads(line) for line in r.iter_lines() if line]


def value(events: list[dict]) -> str | None:
    results = [e["data"]["text/plain"] for e in events if e["type"] == "result" and "text/plain" in e["data"]]
    return results[-1] if results else None


def test_variables_persist_and_streams_and_rich_results(
    api: httpx.Client, sandbox: dict, kernel_ready: None
) -> None:
    sid = sandbox["id"]
    assert run(api, sid, "x = 41")[-1] == {"type": "end", "error": None, "execution_count": 1}
    assert value(run(api, sid, "x + 1")) == "42"
    events = run(api, sid, "import sys; print('out'); print('err', file=sys.stderr)")
    assert {"type": "stdout", "text": "out\n"} in events and {"type": "stderr", "text": "err\n"} in events
    events = run(api, sid, "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3]); plt.show()")
    pngs = [e["data"]["image/png"] for e in events if e["type"] == "result" and "image/png" in e["data"]]
    assert pngs and base64.b64decode(pngs[0]).startswith(b"\x89PNG")
    events = run(
        api, sid, "from IPython.display import HTML, Markdown; display(HTML('<b>x</b>')); Markdown('*y*')"
    )
    mimes = {m for e in events if e["type"] == "result" for m in e["data"]}
    assert {"text/html", "text/markdown"} <= mimes
    end = run(api, sid, "1 / 0")[-1]
    assert end["error"]["name"] == "ZeroDivisionError" and "division by zero" in end["error"]["value"]
    assert any("1 / 0" in line for line in end["error"]["traceback"])


def test_timeout_interrupts_and_the_context_stays_usable(
    api: httpx.Client, sandbox: dict, kernel_ready: None
) -> None:
    sid = sandbox["id"]
    run(api, sid, "kept = 'still here'")
    end = run(api, sid, "while True: pass", timeout=2)[-1]
    assert end["error"]["name"] == "TimeoutError"
    assert value(run(api, sid, "kept")) == "'still here'"


def test_dead_kernel_gives_a_clear_error_and_restarts(
    api: httpx.Client, sandbox: dict, kernel_ready: None
) -> None:
    sid = sandbox["id"]
    ctx = api.post(f"/v1/sandboxes/{sid}/contexts", json={"language": "python"}).json()
    events = run(api, sid, "import os; os._exit(1)", context=ctx["id"])
    assert events[-1]["type"] == "error" and events[-1]["code"] == "kernel_died"
    assert "restart" in events[-1]["message"]
    assert api.post(f"/v1/sandboxes/{sid}/contexts/{ctx['id']}/restart").status_code == 200
    assert value(run(api, sid, "1 + 1", context=ctx["id"])) == "2"


def test_contexts_are_separate_and_bash_keeps_its_shell(
    api: httpx.Client, sandbox: dict, kernel_ready: None
) -> None:
    sid = sandbox["id"]
    a = api.post(f"/v1/sandboxes/{sid}/contexts", json={"env": {"WHO": "a"}}).json()
    b = api.post(f"/v1/sandboxes/{sid}/contexts", json={"cwd": "/tmp"}).json()
    run(api, sid, "v = 'in a'", context=a["id"])
    assert run(api, sid, "v", context=b["id"])[-1]["error"]["name"] == "NameError"
    assert (
        value(run(api, sid, "import os; os.environ['WHO'], os.getcwd()", context=a["id"]))
        == "('a', '/home/user')"
    )
    assert value(run(api, sid, "import os; os.getcwd()", context=b["id"])) == "'/tmp'"
    run(api, sid, "cd /tmp && export N=5", language="bash")
    out = "".join(e.get("text", "") for e in run(api, sid, "echo $PWD $N", language="bash"))
    assert out == "/tmp 5\n"
    ids = {c["id"] for c in api.get(f"/v1/sandboxes/{sid}/contexts").json()["items"]}
    assert {a["id"], b["id"], "default-bash"} <= ids
    assert api.delete(f"/v1/sandboxes/{sid}/contexts/{a['id']}").status_code == 204
    assert api.post(f"/v1/sandboxes/{sid}/code", json={"code": "1", "context": "nothere"}).status_code == 404


def test_javascript_contexts_keep_their_state_await_promises_and_time_out(
    api: httpx.Client, sandbox: dict, kernel_ready: None
) -> None:
    sid = sandbox["id"]
    js = {"language": "javascript"}
    assert run(api, sid, "let n = 40; function twice(x) { return 2 * x }", **js)[-1]["error"] is None
    assert value(run(api, sid, "n + 2", **js)) == "42"  # declarations persist between cells
    assert value(run(api, sid, "twice(n)", **js)) == "80"
    events = run(api, sid, "console.log('out'); console.error('err'); ({a: [1, 2]})", **js)
    assert {"type": "stdout", "text": "out\n"} in events and {"type": "stderr", "text": "err\n"} in events
    [data] = [e["data"] for e in events if e["type"] == "result"]
    assert data["application/json"] == {"a": [1, 2]} and data["text/plain"] == "{ a: [ 1, 2 ] }"
    assert value(run(api, sid, "new Promise(r => setTimeout(() => r('later'), 50))", **js)) == "later"
    assert value(run(api, sid, "const r = await Promise.resolve(7); r * 6", **js)) is None  # an async body
    assert (
        value(run(api, sid, "require('os').userInfo().username + ' ' + process.cwd()", **js))
        == "user /home/user"
    )
    end = run(api, sid, "null.x", **js)[-1]
    assert end["error"]["name"] == "TypeError" and "null" in end["error"]["value"], end
    assert any("cell" in line for line in end["error"]["traceback"])
    end = run(api, sid, "while (true) {}", timeout=1, **js)[-1]
    assert end["error"]["name"] == "TimeoutError", end
    assert value(run(api, sid, "n", **js)) == "40"  # interrupted, not restarted: state kept
    assert value(run(api, sid, "process.env.ONLY_NOW", env={"ONLY_NOW": "yes"}, **js)) == "yes"
    assert value(run(api, sid, "String(process.env.ONLY_NOW)", **js)) == "undefined"
    ctx = api.post(f"/v1/sandboxes/{sid}/contexts", json={"language": "javascript", "cwd": "/tmp"}).json()
    assert value(run(api, sid, "typeof n + ' ' + process.cwd()", context=ctx["id"])) == "undefined /tmp"


def test_typescript_contexts_strip_types_and_keep_state(
    api: httpx.Client, sandbox: dict, kernel_ready: None
) -> None:
    sid = sandbox["id"]
    ts = {"language": "typescript"}
    first = run(
        api,
        sid,
        "interface P { x: number }\nconst p: P = { x: 40 }\nfunction add(a: number, b: number): number { return a + b }",
        **ts,
    )
    assert first[-1]["error"] is None, first
    assert value(run(api, sid, "add(p.x, 2) as number", **ts)) == "42"
    assert value(run(api, sid, "const xs: Array<string> = ['b', 'a']; xs.sort().join('')", **ts)) == "ab"
    end = run(api, sid, "const broken: number = ;", **ts)[-1]
    assert end["error"]["name"] == "SyntaxError" and "Expression expected" in end["error"]["value"], end
    assert value(run(api, sid, "p.x", **ts)) == "40"  # a bad cell leaves the context as it was


def test_java_contexts_run_jshell_snippets_with_values_errors_and_timeouts(
    api: httpx.Client, sandbox: dict, kernel_ready: None
) -> None:
    if shutil.which("jshell") is None:
        pytest.skip("Java contexts need a JDK with jshell (setup.sh installs openjdk-17-jdk-headless)")
    sid = sandbox["id"]
    java = {"language": "java"}
    assert run(api, sid, "int x = 40;\nint twice(int v) { return 2 * v; }", **java)[-1]["error"] is None
    assert value(run(api, sid, "twice(x) + 2", **java)) == "82"  # state persists
    events = run(api, sid, 'System.out.println("out"); System.err.println("err"); "s" + x', **java)
    assert {"type": "stdout", "text": "out\n"} in events and {"type": "stderr", "text": "err\n"} in events
    assert value(events) == '"s40"'
    end = run(api, sid, "int y = ;", **java)[-1]
    assert end["error"]["name"] == "CompilationError" and "illegal start" in end["error"]["value"], end
    end = run(api, sid, 'throw new IllegalStateException("boom");', **java)[-1]
    assert end["error"]["name"] == "java.lang.IllegalStateException" and end["error"]["value"] == "boom", end
    end = run(api, sid, "while (true) {}", timeout=2, **java)[-1]
    assert end["error"]["name"] == "TimeoutError", end
    assert value(run(api, sid, "x", **java)) == "40"  # stopped, not restarted


def test_r_contexts_keep_their_state_and_return_rich_results(
    api: httpx.Client, sandbox: dict, kernel_ready: None
) -> None:
    if not os.path.exists("/usr/share/jupyter/kernels/ir/kernel.json"):
        pytest.skip("R contexts need Debian's r-base-core and r-cran-irkernel (setup.sh installs them)")
    sid = sandbox["id"]
    r = {"language": "r"}
    assert run(api, sid, "x <- c(3, 1, 2)", **r)[-1]["error"] is None
    assert value(run(api, sid, "sum(x) * 7", **r)) == "[1] 42"  # state persists
    events = run(api, sid, "cat('out\\n'); message('err'); data.frame(a = 1:2)", **r)
    assert {"type": "stdout", "text": "out\n"} in events
    assert any(e["type"] == "stderr" and "err" in e["text"] for e in events)
    [data] = [e["data"] for e in events if e["type"] == "result"]
    assert "text/html" in data and "<table" in data["text/html"]
    events = run(api, sid, "plot(1:3)", **r)
    assert any("image/png" in e.get("data", {}) for e in events if e["type"] == "result")
    end = run(api, sid, "stop('no such thing')", **r)[-1]
    assert end["error"] is not None and "no such thing" in end["error"]["value"], end
    assert value(run(api, sid, "getwd()", **r)) == '[1] "/home/user"'


def test_a_context_with_a_bad_environment_name_is_refused(api: httpx.Client, sandbox: dict) -> None:
    """Found by the API fuzzer: an empty name was a 500 (the check ran outside the validation)."""
    for name in ("", "A=B", "NUL\x00"):
        r = api.post(f"/v1/sandboxes/{sandbox['id']}/contexts", json={"env": {name: "x"}})
        assert r.status_code == 422, r.text
        assert "invalid environment variable name" in r.text, r.text


@pytest.mark.skipif(not checkpoint.available(), reason="needs CRIU >= 4.1")
def test_a_context_survives_hibernate_and_fork(api: httpx.Client, kernel_ready: None) -> None:
    sb = api.post("/v1/sandboxes", json={}).json()
    sid = sb["id"]
    try:
        run(api, sid, "memo = [1, 2, 3]")
        assert api.post(f"/v1/sandboxes/{sid}/hibernate").json()["hibernation"]["memory"] is True
        assert value(run(api, sid, "sum(memo)")) == "6"
        child = api.post(f"/v1/sandboxes/{sid}/fork", json={"count": 1}).json()["items"][0]
        run(api, child["id"], "memo.append(4)")
        assert value(run(api, child["id"], "sum(memo)")) == "10"
        assert value(run(api, sid, "sum(memo)")) == "6"
        api.delete(f"/v1/sandboxes/{child['id']}")
    finally:
        api.delete(f"/v1/sandboxes/{sid}")


def test_sdk_run_code(server: Server, kernel_ready: None) -> None:
    with Sandbox.create(url=server.url, api_key=server.api_key) as sb:
        sb.run_code("x = 41")
        seen: list[str] = []
        result = sb.run_code("print('hello'); x + 1", on_stdout=seen.append)
        assert result.text == "42" and result.stdout == "hello\n" and seen == ["hello\n"]
        assert sb.run_code("undefined_name").error["name"] == "NameError"  # type: ignore[index]
        ctx = sb.contexts.create("bash")
        assert sb.run_code("echo $((6*7))", context=ctx.id).stdout == "42\n"
        assert ctx.id in [c.id for c in sb.contexts.list()]


def test_cli_run_code(server: Server, sandbox: dict, kernel_ready: None) -> None:
    import subprocess
    import sys

    env = server.env
    cmd = [sys.executable, "-m", "cove", "run-code", sandbox["id"]]
    assert subprocess.run([*cmd, "y = 6 * 7"], env=env, capture_output=True, timeout=120).returncode == 0
    done = subprocess.run([*cmd, "print('hi'); y"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "hi\n42\n"
    done = subprocess.run(
        [*cmd, "raise ValueError('bad')"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1 and "ValueError: bad" in done.stderr


def test_async_sdk_code_processes_and_watch(server: Server, kernel_ready: None) -> None:
    import asyncio

    from cove import AsyncSandbox

    async def main() -> None:
        async with AsyncSandbox.create(url=server.url, api_key=server.api_key) as sb:
            await sb.run_code("z = 20")
            streamed: list[str] = []

            async def on_stdout(text: str) -> None:
                streamed.append(text)

            result = await sb.run_code("print('async'); z + 22", on_stdout=on_stdout)
            assert result.text == "42" and streamed == ["async\n"]
            proc = await sb.processes.start("echo from-bg")
            assert (await proc.wait(10)).exit_code == 0
            texts = [e.data async for e in proc.output() if e.type == "stdout"]
            assert texts == ["from-bg\n"]
            term = await sb.pty.create("bash --norc -i", rows=12, cols=34)
            await term.send_stdin("stty size; exit\n")
            assert "12 34" in "".join([e.data async for e in term.output()])

            events: list[str] = []

            async def watch() -> None:
                async for event in sb.files.watch("/tmp"):
                    events.append(event.type)
                    if event.type != "watching":
                        return

            task = asyncio.create_task(watch())
            await asyncio.sleep(1)
            await sb.files.write("/tmp/async.txt", "x")
            await asyncio.wait_for(task, 15)
            assert events[0] == "watching" and len(events) >= 2

    asyncio.run(main())
