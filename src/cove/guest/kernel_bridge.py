"""cove kernel bridge: one code context (a notebook-style interpreter) served over a unix socket.

Runs inside a sandbox as::

    /opt/cove/kernel/bin/python /run/cove/kernel_bridge.py --socket PATH --cwd DIR
        [--env-json JSON] [--language python|bash]

with ``protocol.py`` beside it (the guest agent's framing). It runs in the kernel venv (see
``cove.storage.kernel_layer``), so it may import jupyter_client; it is not part of the lean agent.

Requests and replies are ``J`` frames; a connection may send any number of requests, one at a time,
and requests from all connections are served one after another.

* ``{"op": "ping"}`` → ``{"ok": true, "language": "python"|"bash"}``
* ``{"op": "run", "code": STR, "timeout": SECONDS|null, "env": {NAME: VALUE}?}`` → any number of events
  ``{"event": "stdout"|"stderr", "text": STR}`` and ``{"event": "result", "data": {MIME: VALUE},
  "main": BOOL}`` (execute_result, which is main, and display_data; only :data:`MIME_TYPES`, image/png
  as base64 text), then
  ``{"ok": true, "error": null|{"name", "value", "traceback": [STR]}, "execution_count": N}``
  (bash adds ``"exit_code": N``; a non-zero status is error ``NonZeroExit``). A run past its
  timeout is interrupted and ends with error name ``TimeoutError``; the context stays usable.
  ``env`` is set in the interpreter for this run only (then restored).
  A run may carry ``"id": STR`` so that it can be interrupted:
* ``{"op": "interrupt", "id": STR}`` → ``{"ok": true, "interrupted": BOOL}``: SIGINT to the interpreter if
  that run is the one running (e.g. its client went away); the run ends with the interrupt's error.
* ``{"op": "restart"}`` → a fresh interpreter, ``{"ok": true}``.
* If the interpreter dies, ``run`` answers ``{"ok": false, "error": {"code": "kernel_died",
  "message": STR}}``, and so does every later ``run`` until a ``restart``.
* Anything else → ``{"ok": false, "error": {"code": "invalid", "message": STR}}``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import queue
import re
import secrets
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import protocol

MIME_TYPES = (
    "text/plain",
    "text/html",
    "text/markdown",
    "text/latex",
    "image/png",
    "image/jpeg",
    "image/svg+xml",
    "application/json",
    "application/vnd.cove.chart+json",  # a figure's data (charts.py)
    "application/vnd.cove.data+json",  # a DataFrame's columns (charts.py)
)
# Run in each new kernel, silently: charts.py's display formatters (its .pyc lies beside this file).
_KERNEL_SETUP = """
def __cove_setup(path):
    import importlib.machinery, importlib.util, os
    if not os.path.exists(path):
        return
    loader = importlib.machinery.SourcelessFileLoader("cove_charts", path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("cove_charts", loader))
    loader.exec_module(module)
    module.register(get_ipython())
__cove_setup(%r)
del __cove_setup
"""
INTERRUPT_GRACE = 10.0  # seconds to wait for an interrupted run to end before restarting
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class KernelDied(Exception):
    pass


def _utf8_cut(data: bytes) -> int:
    """Length of the prefix of ``data`` that does not end inside a UTF-8 sequence."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # not a continuation byte
            need = 2 if byte >= 0xC0 else 1
            need = 3 if byte >= 0xE0 else need
            need = 4 if byte >= 0xF0 else need
            return len(data) - back if need > back else len(data)
    return len(data)


_prctl = None


def _load_prctl() -> None:
    """Load libc's prctl before any fork: the child of a threaded process must not import."""
    global _prctl
    if _prctl is None:
        try:
            import ctypes

            _prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (ImportError, OSError, AttributeError):
            _prctl = False


def _die_with_parent() -> None:
    """In the child: SIGKILL when the bridge dies (the shell has its own session, so no group kill)."""
    if _prctl:
        _prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _error(name: str, value: str, traceback: list[str] | None = None) -> dict:
    return {"name": name, "value": value, "traceback": traceback or []}


# --- python: an ipykernel driven through jupyter_client ------------------------------------------


def _end(proc: subprocess.Popen | None) -> None:
    """Kill an interpreter started in its own session, with everything it started, and close its pipes."""
    if proc is None:
        return
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.wait(5)
    for f in (proc.stdin, proc.stdout, proc.stderr):
        with contextlib.suppress(Exception):
            f.close()


class Context:
    """What every language's context shares: an interpreter it starts and stops, and a temp dir."""

    language = ""

    def __init__(self, cwd: str, env: dict[str, str]) -> None:
        self.cwd = cwd
        self.env = env
        self.dead: str | None = None  # why the interpreter is gone (until a restart)
        self.tmp = tempfile.mkdtemp(prefix=f"cove-{self.language}-")

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


class PythonContext(Context):
    language = "python"
    kernel_name = "python3"
    kernel_dirs: list[str] = []  # none: only the native kernel (this interpreter's ipykernel)
    transport = "ipc"  # unix sockets: works without a loopback interface

    def __init__(self, cwd: str, env: dict[str, str]) -> None:
        super().__init__(cwd, env)
        self.km = None
        self.kc = None
        self.starts = 0
        self.start()

    def start(self) -> None:
        from jupyter_client.kernelspec import KernelSpecManager
        from jupyter_client.manager import KernelManager

        self.starts += 1
        n = self.starts
        # Only kernels from root's own directories: a user's kernelspec cannot replace them.
        ksm = KernelSpecManager(kernel_dirs=list(self.kernel_dirs), ensure_native_kernel=not self.kernel_dirs)
        km = KernelManager(
            kernel_name=self.kernel_name,
            kernel_spec_manager=ksm,
            transport=self.transport,
            ip=os.path.join(self.tmp, f"k{n}") if self.transport == "ipc" else "127.0.0.1",
            connection_file=os.path.join(self.tmp, f"k{n}.json"),
        )
        km.start_kernel(cwd=self.cwd, env=self.kernel_env())
        kc = km.blocking_client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=60)
        except RuntimeError:
            kc.stop_channels()
            with contextlib.suppress(Exception):
                km.shutdown_kernel(now=True)
            raise
        self.km, self.kc, self.dead = km, kc, None
        self.setup()

    def kernel_env(self) -> dict[str, str]:
        env = dict(self.env)
        env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
        env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
        return env

    def setup(self) -> None:
        self._silent(_KERNEL_SETUP % os.path.join(os.path.dirname(os.path.abspath(__file__)), "charts.pyc"))

    def stop(self) -> None:
        if self.kc is not None:
            with contextlib.suppress(Exception):
                self.kc.stop_channels()
        if self.km is not None:
            with contextlib.suppress(Exception):
                self.km.shutdown_kernel(now=True)
        self.km = self.kc = None

    def interrupt(self) -> None:
        if self.km is not None:
            self.km.interrupt_kernel()

    def _check_alive(self) -> None:
        if self.km is None or not self.km.is_alive():
            code = None
            with contextlib.suppress(Exception):
                code = self.km.provisioner.process.returncode  # type: ignore[union-attr]
            self.dead = (
                f"the interpreter exited (status {code})" if code is not None else "the interpreter exited"
            )
            raise KernelDied(self.dead)

    def _silent(self, code: str) -> None:
        """Run setup code that leaves no trace: no output, no history, no execution count."""
        msg_id = self.kc.execute(code, silent=True, store_history=False, allow_stdin=False)
        end = time.monotonic() + 30
        while time.monotonic() < end:
            try:
                reply = self.kc.get_shell_msg(timeout=0.5)
            except queue.Empty:
                self._check_alive()
                continue
            if reply.get("parent_header", {}).get("msg_id") == msg_id:
                return

    def run(self, code: str, timeout: float | None, emit, env: dict[str, str] | None = None) -> dict:
        if self.dead:
            raise KernelDied(self.dead)
        self._check_alive()
        if not env:
            return self._run(code, timeout, emit)
        self._silent(
            "import os as __o\n"
            f"__cove_saved_env = {{k: __o.environ.get(k) for k in {sorted(env)!r}}}\n"
            f"__o.environ.update({env!r})\ndel __o"
        )
        try:
            return self._run(code, timeout, emit)
        finally:
            if not self.dead and self.km is not None:
                self._silent(
                    "import os as __o\n"
                    "for __k, __v in __cove_saved_env.items():\n"
                    "    __o.environ.pop(__k, None) if __v is None else __o.environ.__setitem__(__k, __v)\n"
                    "del __o, __k, __v, __cove_saved_env"
                )

    def _run(self, code: str, timeout: float | None, emit) -> dict:
        kc = self.kc
        msg_id = kc.execute(code, store_history=True, allow_stdin=False, stop_on_error=False)
        deadline = None if timeout is None else time.monotonic() + timeout
        interrupted_at = None
        error = None
        count = None
        idle = False
        while not idle:
            now = time.monotonic()
            if deadline is not None and interrupted_at is None and now >= deadline:
                self.km.interrupt_kernel()
                interrupted_at = now
            if interrupted_at is not None and now - interrupted_at > INTERRUPT_GRACE:
                # The interrupt did not end the run (e.g. stuck in C code): start afresh.
                self.restart()
                return {
                    "error": _error(
                        "TimeoutError", f"timed out after {timeout}s; the interpreter was restarted"
                    ),
                    "execution_count": count,
                }
            try:
                msg = kc.get_iopub_msg(timeout=0.2)
            except queue.Empty:
                self._check_alive()
                continue
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind = msg["msg_type"]
            content = msg["content"]
            if kind == "stream":
                emit(
                    {
                        "event": "stdout" if content.get("name") == "stdout" else "stderr",
                        "text": content["text"],
                    }
                )
            elif kind in ("execute_result", "display_data"):
                data = {k: v for k, v in content.get("data", {}).items() if k in MIME_TYPES}
                if data:
                    emit({"event": "result", "data": data, "main": kind == "execute_result"})
            elif kind == "error":
                error = _error(
                    content.get("ename", ""),
                    content.get("evalue", ""),
                    [_ANSI.sub("", line) for line in content.get("traceback", [])],
                )
            elif kind == "execute_input":
                count = content.get("execution_count", count)
            elif kind == "status" and content.get("execution_state") == "idle":
                idle = True
        # The shell reply carries the execution count; it follows closely after idle.
        end = time.monotonic() + 5
        while time.monotonic() < end:
            try:
                reply = kc.get_shell_msg(timeout=0.5)
            except queue.Empty:
                self._check_alive()
                continue
            if reply.get("parent_header", {}).get("msg_id") == msg_id:
                count = reply["content"].get("execution_count", count)
                break
        if interrupted_at is not None:
            error = _error("TimeoutError", f"execution timed out after {timeout}s and was interrupted")
        return {"error": error, "execution_count": count}


class RContext(PythonContext):
    """R through IRkernel (Debian's r-cran-irkernel), driven like the Python kernel."""

    language = "r"
    kernel_name = "ir"
    kernel_dirs = ["/usr/share/jupyter/kernels", "/usr/local/share/jupyter/kernels"]  # root's, read-only
    transport = "tcp"  # IRkernel speaks ZeroMQ over TCP only; loopback stays inside the sandbox

    def kernel_env(self) -> dict[str, str]:
        return dict(self.env)

    def setup(self) -> None:
        pass


# --- bash: one persistent shell fed through pipes, a marker after each command ------------------


class BashContext(Context):
    language = "bash"

    def __init__(self, cwd: str, env: dict[str, str]) -> None:
        super().__init__(cwd, env)
        self.proc: subprocess.Popen | None = None
        self.count = 0
        self.start()

    def start(self) -> None:
        _load_prctl()
        env = dict(self.env)
        env.update({"PS1": "", "PS2": "", "PS0": "", "PROMPT_COMMAND": ""})
        # Interactive (-i) so that SIGINT aborts the running command but not the shell; no rc files.
        self.proc = subprocess.Popen(
            ["/bin/bash", "--norc", "--noprofile", "--noediting", "-i"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=self.cwd,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self.dead = None
        self._send("set +m +H +o history; PS1=; PS2=; unset PROMPT_COMMAND\n")
        self._collect(None, lambda _e: None, startup=True)

    def stop(self) -> None:
        _end(self.proc)
        self.proc = None

    def restart(self) -> None:
        self.count = 0
        super().restart()

    def interrupt(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, signal.SIGINT)

    def _send(self, text: str) -> None:
        try:
            self.proc.stdin.write(text.encode())
            self.proc.stdin.flush()
        except (OSError, ValueError):
            self._died()

    def _died(self) -> None:
        code = self.proc.poll() if self.proc is not None else None
        self.dead = f"the shell exited (status {code})" if code is not None else "the shell exited"
        raise KernelDied(self.dead)

    def _collect(self, timeout: float | None, emit, startup: bool = False) -> tuple[int | None, bool]:
        """Send the marker commands, stream output until both markers are seen: (status, timed out)."""
        token = secrets.token_hex(8)
        marker = f"\x1e__cove_done_{token}__"
        # A separate line: an interrupt aborts the command's line, then the shell reads this one.
        self._send(f"__cove_rc=$?; printf '{marker}%d\\n' \"$__cove_rc\"; printf '{marker}\\n' >&2\n")
        proc = self.proc
        streams = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr"}
        pending = {fd: b"" for fd in streams}
        done: dict[int, bool] = {fd: False for fd in streams}
        status = None
        deadline = None if timeout is None else time.monotonic() + timeout
        timed_out = False
        mark = marker.encode()
        while not all(done.values()):
            wait = 0.5
            if deadline is not None and not timed_out:
                left = deadline - time.monotonic()
                if left <= 0:
                    timed_out = True
                    with contextlib.suppress(OSError):
                        os.killpg(proc.pid, signal.SIGINT)
                    deadline = time.monotonic() + INTERRUPT_GRACE
                    continue
                wait = min(wait, left)
            elif timed_out and time.monotonic() > deadline:
                self.restart()
                return None, True
            ready, _, _ = select.select([fd for fd in streams if not done[fd]], [], [], wait)
            for fd in ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    self._died()
                buf = pending[fd] + chunk
                at = buf.find(mark)
                if at >= 0:
                    text, rest = buf[:at], buf[at + len(mark) :]
                    done[fd] = True
                    if streams[fd] == "stdout":
                        with contextlib.suppress(ValueError):
                            status = int(rest.split(b"\n", 1)[0] or b"0")
                    pending[fd] = b""
                else:
                    # Hold back a tail that could be the start of the marker.
                    keep = len(mark) - 1
                    text, pending[fd] = (buf[:-keep], buf[-keep:]) if len(buf) > keep else (b"", buf)
                    cut = _utf8_cut(text)  # do not split a UTF-8 sequence
                    text, pending[fd] = text[:cut], text[cut:] + pending[fd]
                if text and not startup:
                    emit({"event": streams[fd], "text": text.decode("utf-8", "replace")})
        return status, timed_out

    def run(self, code: str, timeout: float | None, emit, env: dict[str, str] | None = None) -> dict:
        if self.dead:
            raise KernelDied(self.dead)
        if self.proc is None or self.proc.poll() is not None:
            self._died()
        self.count += 1
        script = os.path.join(self.tmp, "cell.sh")
        with open(script, "w") as f:
            f.write(code)
            if not code.endswith("\n"):
                f.write("\n")
        if env:
            # Set for this cell, restored on the next line (which runs even after an interrupt).
            names = [k for k in env if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)]
            save = "".join(f"__cove_had_{k}=${{{k}+1}}; __cove_old_{k}=${{{k}-}}; " for k in names)
            export = "".join(f"export {k}={shlex.quote(env[k])}; " for k in names)
            restore = "".join(
                f'if [ -n "$__cove_had_{k}" ]; then {k}="$__cove_old_{k}"; else unset {k}; fi; '
                f"unset __cove_had_{k} __cove_old_{k}; "
                for k in names
            )
            self._send(
                f"{save}{export}. {script} </dev/null\n__cove_user_rc=$?; {restore}(exit $__cove_user_rc)\n"
            )
        else:
            self._send(f". {script} </dev/null\n")
        status, timed_out = self._collect(timeout, emit)
        result: dict = {"error": None, "execution_count": self.count, "exit_code": status}
        if timed_out:
            result["error"] = _error(
                "TimeoutError", f"execution timed out after {timeout}s and was interrupted"
            )
        elif status:
            result["error"] = _error("NonZeroExit", f"exit status {status}")
        return result


# --- javascript: one node process, cells run in one vm context ------------------------------------

# The runner node executes. Cells arrive as JSON lines on stdin; what they print goes to stdout and
# stderr (synchronous writes on Linux pipes, so it is all there before the reply), and each reply is
# a JSON line on the control fd. Top-level `let`/`const`/`function` persist between cells (one vm
# context, as a REPL); a cell whose value is a promise is awaited; a cell with a top-level `await`
# runs as an async function (its declarations stay inside it).
_NODE_RUNNER = r"""
'use strict';
const vm = require('vm'), fs = require('fs'), util = require('util'), readline = require('readline');
const ctl = Number(process.env.COVE_CTL_FD); delete process.env.COVE_CTL_FD;
const box = { console, process, Buffer, URL, URLSearchParams, TextEncoder, TextDecoder, AbortController,
  setTimeout, setInterval, setImmediate, clearTimeout, clearInterval, clearImmediate, queueMicrotask,
  structuredClone, fetch: globalThis.fetch, require, module: { exports: {} } };
const ctx = vm.createContext(box);
// TypeScript contexts: each cell is transpiled first (types stripped; no type checking, as a REPL).
const ts = process.env.COVE_TYPESCRIPT ? require(process.env.COVE_TYPESCRIPT) : null;
delete process.env.COVE_TYPESCRIPT;
function source(code) {
  if (!ts) return code;
  const out = ts.transpileModule(code, { reportDiagnostics: true, compilerOptions: {
    target: ts.ScriptTarget.ES2022, module: ts.ModuleKind.CommonJS, removeComments: false } });
  const bad = (out.diagnostics || []).filter((d) => d.category === ts.DiagnosticCategory.Error);
  if (bad.length) {
    const e = new SyntaxError(bad.map((d) => ts.flattenDiagnosticMessageText(d.messageText, '\n')).join('; '));
    e.stack = 'SyntaxError: ' + e.message;
    throw e;
  }
  return out.outputText;
}
process.on('SIGINT', () => {});  // an interrupt ends the running cell (breakOnSigint), not node
let count = 0;
function reply(obj) { fs.writeSync(ctl, JSON.stringify(obj) + '\n'); }
function failure(e) {
  if (e && e.code === 'ERR_SCRIPT_EXECUTION_TIMEOUT') return { name: 'TimeoutError', value: e.message, traceback: [] };
  if (e && e.code === 'ERR_SCRIPT_EXECUTION_INTERRUPTED') return { name: 'KeyboardInterrupt', value: e.message, traceback: [] };
  const name = (e && e.name) || 'Error', value = e && e.message !== undefined ? String(e.message) : String(e);
  return { name, value, traceback: e && e.stack ? String(e.stack).split('\n') : [name + ': ' + value] };
}
async function run(req) {
  count += 1;
  const saved = {};
  for (const [k, v] of Object.entries(req.env || {})) { saved[k] = process.env[k]; process.env[k] = v; }
  const opts = { breakOnSigint: true, displayErrors: false };
  if (req.timeout) opts.timeout = Math.max(1, Math.round(req.timeout * 1000));
  let value, error = null;
  try {
    let script;
    const code = source(req.code);
    try { script = new vm.Script(code, { filename: `cell${count}.js` }); }
    catch (e) {
      if (!(e instanceof SyntaxError) || !/await/.test(e.message)) throw e;
      script = new vm.Script(`(async () => {\n${code}\n})()`, { filename: `cell${count}.js` });
    }
    value = script.runInContext(ctx, opts);
    if (value && typeof value.then === 'function') value = await value;
  } catch (e) { error = failure(e); }
  finally {
    for (const [k, v] of Object.entries(saved)) { if (v === undefined) delete process.env[k]; else process.env[k] = v; }
  }
  let data = null;
  if (!error && value !== undefined) {
    data = { 'text/plain': typeof value === 'string' ? value : util.inspect(value, { depth: 6, colors: false }) };
    if (value !== null && typeof value === 'object') {
      try { data['application/json'] = JSON.parse(JSON.stringify(value)); } catch (e) { /* not JSON: text only */ }
    }
  }
  reply({ count, error, data });
}
let queue = Promise.resolve();
readline.createInterface({ input: process.stdin }).on('line', (line) => {
  queue = queue.then(() => run(JSON.parse(line))).catch((e) => reply({ count, error: failure(e), data: null }));
});
"""


class RunnerContext(Context):
    """An interpreter driven by a runner program of ours (`source`, run by `program`): cells go to
    its stdin one line each (`request`), what they print comes on its stdout and stderr, and its
    reply, one JSON line `{count, error, data}`, on the control fd it is given (COVE_CTL_FD)."""

    program = ""  # the command that runs the runner, looked up on the sandbox's PATH
    needs = ""  # what to install when it is missing
    source = ""
    filename = ""

    def __init__(self, cwd: str, env: dict[str, str]) -> None:
        super().__init__(cwd, env)
        self.proc: subprocess.Popen | None = None
        self.ctl = -1
        self.runner = os.path.join(self.tmp, self.filename)
        with open(self.runner, "w") as f:
            f.write(self.source)
        self.start()

    def request(self, code: str, timeout: float | None, env: dict[str, str]) -> bytes:
        raise NotImplementedError

    def start(self) -> None:
        program = shutil.which(self.program, path=self.env.get("PATH") or os.defpath)
        if program is None:
            raise RuntimeError(
                f"{self.language} contexts need {self.needs} (`{self.program}`) in the sandbox; none is on its PATH"
            )
        _load_prctl()
        read, write = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [program, self.runner],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=self.cwd,
                env={**self.env, **self.runner_env(), "COVE_CTL_FD": str(write)},
                pass_fds=(write,),
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        finally:
            os.close(write)
        self.ctl, self.dead = read, None

    def runner_env(self) -> dict[str, str]:
        return {}

    def stop(self) -> None:
        _end(self.proc)
        self.proc = None
        if self.ctl >= 0:
            with contextlib.suppress(OSError):
                os.close(self.ctl)
            self.ctl = -1

    def interrupt(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(OSError):
                os.kill(self.proc.pid, signal.SIGINT)

    def _died(self) -> None:
        code = self.proc.poll() if self.proc is not None else None
        self.dead = f"{self.program} exited (status {code})" if code is not None else f"{self.program} exited"
        raise KernelDied(self.dead)

    def run(self, code: str, timeout: float | None, emit, env: dict[str, str] | None = None) -> dict:
        if self.dead:
            raise KernelDied(self.dead)
        if self.proc is None or self.proc.poll() is not None:
            self._died()
        try:
            self.proc.stdin.write(self.request(code, timeout, env or {}))
            self.proc.stdin.flush()
        except (OSError, ValueError):
            self._died()
        streams = {self.proc.stdout.fileno(): "stdout", self.proc.stderr.fileno(): "stderr"}
        pending = {fd: b"" for fd in streams}
        reply = b""
        # Past the cell's own timeout (which the runner enforces) a cell may still hang (an awaited
        # promise, code that ignores a stop): then the context is restarted, as the others are.
        deadline = None if timeout is None else time.monotonic() + timeout + INTERRUPT_GRACE

        def pump(wait: float) -> bool:
            nonlocal reply
            ready, _, _ = select.select([*streams, self.ctl], [], [], wait)
            for fd in ready:
                chunk = os.read(fd, 65536)
                if fd == self.ctl:
                    if not chunk:
                        self._died()
                    reply += chunk
                    continue
                if not chunk:
                    continue
                buf = pending[fd] + chunk
                cut = _utf8_cut(buf)
                text, pending[fd] = buf[:cut], buf[cut:]
                if text:
                    emit({"event": streams[fd], "text": text.decode("utf-8", "replace")})
            return bool(ready)

        while b"\n" not in reply:
            if deadline is not None and time.monotonic() > deadline:
                self.restart()
                return {
                    "error": _error("TimeoutError", f"timed out after {timeout}s; node was restarted"),
                    "execution_count": None,
                }
            if self.proc.poll() is not None and not pump(0):
                self._died()
            pump(0.5)
        while pump(0):  # what the cell wrote before its reply
            pass
        msg = json.loads(reply.split(b"\n", 1)[0])
        if msg.get("data"):
            emit({"event": "result", "data": msg["data"], "main": True})
        return {"error": msg.get("error"), "execution_count": msg.get("count")}


class JavaScriptContext(RunnerContext):
    """Node.js (the sandbox's `node`): one process per context, its cells sharing one vm context."""

    language = "javascript"
    program = "node"
    needs = "Node.js"
    source = _NODE_RUNNER
    filename = "runner.js"

    def request(self, code: str, timeout: float | None, env: dict[str, str]) -> bytes:
        return (json.dumps({"code": code, "timeout": timeout, "env": env}) + "\n").encode()


# The Java runner: JShell's API in the runner's own JVM (the local execution engine, so a cell's
# System.out is the runner's stdout, in order). A cell is split into snippets as jshell would; the
# last expression's value is the result; a rejected snippet or an exception ends the cell with its
# error; a timeout stops it (JShell.stop) without losing the state. Requests are `TIMEOUT<TAB>BASE64`
# lines (no JSON parser in the JDK); per-run env is not supported (a JVM cannot change its own).
_JAVA_RUNNER = r"""
import jdk.jshell.*;
import java.io.*;
import java.nio.charset.StandardCharsets;
import java.util.*;

public class Runner {
    static String q(String s) {
        if (s == null) return "null";
        StringBuilder b = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            switch (c) {
                case '"': b.append("\\\""); break;
                case '\\': b.append("\\\\"); break;
                case '\n': b.append("\\n"); break;
                case '\r': b.append("\\r"); break;
                case '\t': b.append("\\t"); break;
                default: if (c < 0x20) b.append(String.format("\\u%04x", (int) c)); else b.append(c);
            }
        }
        return b.append('"').toString();
    }
    public static void main(String[] args) throws Exception {
        PrintStream ctl = new PrintStream(new FileOutputStream("/dev/fd/" + System.getenv("COVE_CTL_FD")), true, "UTF-8");
        JShell js = JShell.builder().out(System.out).err(System.err).executionEngine("local").build();
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        int count = 0;
        String line;
        while ((line = in.readLine()) != null) {
            int tab = line.indexOf('\t');
            double timeout = Double.parseDouble(line.substring(0, tab));
            String code = new String(Base64.getDecoder().decode(line.substring(tab + 1)), StandardCharsets.UTF_8);
            count++;
            String value = null, error = null;
            Timer timer = null;
            final boolean[] stopped = {false};
            if (timeout > 0) { timer = new Timer(true); timer.schedule(new TimerTask() { public void run() { stopped[0] = true; js.stop(); } }, (long) (timeout * 1000)); }
            String rest = code;
            outer:
            while (!rest.isBlank()) {
                SourceCodeAnalysis.CompletionInfo ci = js.sourceCodeAnalysis().analyzeCompletion(rest);
                if (!ci.completeness().isComplete()) {
                    error = "{\"name\":\"CompilationError\",\"value\":\"incomplete input\",\"traceback\":[" + q(rest.strip()) + "]}";
                    break;
                }
                for (SnippetEvent e : js.eval(ci.source())) {
                    if (e.causeSnippet() != null) continue;
                    if (e.exception() != null) {
                        Throwable t = e.exception();
                        String name = t instanceof EvalException ? ((EvalException) t).getExceptionClassName() : t.getClass().getName();
                        StringBuilder tb = new StringBuilder();
                        for (StackTraceElement s : t.getStackTrace()) tb.append(tb.length() > 0 ? "," : "").append(q("  at " + s));
                        error = "{\"name\":" + q(name) + ",\"value\":" + q(String.valueOf(t.getMessage())) + ",\"traceback\":[" + tb + "]}";
                        break outer;
                    }
                    if (e.status() == Snippet.Status.REJECTED) {
                        StringBuilder msg = new StringBuilder();
                        js.diagnostics(e.snippet()).forEach(d -> msg.append(msg.length() > 0 ? "; " : "").append(d.getMessage(Locale.ROOT)));
                        error = "{\"name\":\"CompilationError\",\"value\":" + q(msg.toString()) + ",\"traceback\":[" + q(e.snippet().source().strip()) + "]}";
                        break outer;
                    }
                    Snippet.Kind kind = e.snippet().kind();
                    value = (kind == Snippet.Kind.EXPRESSION || (kind == Snippet.Kind.VAR && e.snippet().subKind().isExecutable() && e.snippet().subKind() == Snippet.SubKind.TEMP_VAR_EXPRESSION_SUBKIND)) ? e.value() : null;
                }
                rest = ci.remaining();
            }
            if (timer != null) timer.cancel();
            if (stopped[0]) error = "{\"name\":\"TimeoutError\",\"value\":" + q("execution timed out after " + timeout + "s and was stopped") + ",\"traceback\":[]}";
            System.out.flush(); System.err.flush();
            ctl.println("{\"count\":" + count + ",\"error\":" + (error == null ? "null" : error) + ",\"data\":" + (value == null || error != null ? "null" : "{\"text/plain\":" + q(value) + "}") + "}");
        }
    }
}
"""


class JavaContext(RunnerContext):
    """Java through JShell (the sandbox's JDK, `java` 17 or later: Debian's openjdk-17-jdk-headless)."""

    language = "java"
    program = "java"
    needs = "a JDK"
    source = _JAVA_RUNNER
    filename = "Runner.java"  # run as a single source file (the JDK compiles it at start)

    def request(self, code: str, timeout: float | None, env: dict[str, str]) -> bytes:
        return f"{timeout or 0}\t{base64.b64encode(code.encode()).decode()}\n".encode()


class TypeScriptContext(JavaScriptContext):
    """TypeScript: JavaScript contexts whose cells the TypeScript compiler of the kernel environment
    transpiles first (`cove.storage.kernel_layer.TYPESCRIPT`)."""

    language = "typescript"

    def runner_env(self) -> dict[str, str]:
        compiler = os.path.join(sys.prefix, "typescript", "typescript.js")  # sys.prefix: the kernel venv
        if not os.path.exists(compiler):
            raise RuntimeError(
                "typescript contexts need the TypeScript compiler in the kernel environment (rebuild it)"
            )
        return {"COVE_TYPESCRIPT": compiler}


# --- server ------------------------------------------------------------------------------------


class Bridge:
    def __init__(self, context) -> None:
        self.context = context
        self.lock = threading.Lock()
        self.running: str | None = None  # the id of the run in progress, if it gave one

    def handle(self, req: dict, send) -> None:
        op = req.get("op")
        if op == "ping":
            send({"ok": True, "language": self.context.language})
        elif op == "interrupt":
            run_id = req.get("id")
            hit = isinstance(run_id, str) and run_id == self.running
            if hit:
                try:
                    self.context.interrupt()
                except Exception as exc:
                    send({"ok": False, "error": {"code": "internal", "message": f"interrupt failed: {exc}"}})
                    return
            send({"ok": True, "interrupted": hit})
        elif op == "restart":
            with self.lock:
                try:
                    self.context.restart()
                except Exception as exc:
                    send({"ok": False, "error": {"code": "internal", "message": f"restart failed: {exc}"}})
                    return
            send({"ok": True})
        elif op == "run":
            code = req.get("code")
            timeout = req.get("timeout")
            env = req.get("env") or {}
            if not isinstance(env, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and k and "=" not in k and "\0" not in k + v
                for k, v in env.items()
            ):
                send({"ok": False, "error": {"code": "invalid", "message": "env must map names to strings"}})
                return
            if not isinstance(code, str) or not (
                timeout is None
                or (isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0)
            ):
                send(
                    {"ok": False, "error": {"code": "invalid", "message": "run needs code (str) and timeout"}}
                )
                return
            broken: list[OSError] = []

            def emit(event: dict) -> None:
                # A client that went away must not abort the run half-way: drain it, then report.
                if not broken:
                    try:
                        send(event)
                    except OSError as exc:
                        broken.append(exc)

            run_id = req.get("id") if isinstance(req.get("id"), str) else None
            with self.lock:
                self.running = run_id
                try:
                    result = self.context.run(code, timeout, emit, env)
                except KernelDied as exc:
                    result = {"ok": False, "error": {"code": "kernel_died", "message": str(exc)}}
                else:
                    result = {"ok": True, **result}
                finally:
                    self.running = None
            if broken:
                raise broken[0]
            send(result)
        else:
            send({"ok": False, "error": {"code": "invalid", "message": f"unknown op {op!r}"}})

    def serve_connection(self, conn: socket.socket) -> None:
        def send(obj: dict) -> None:
            conn.sendall(protocol.encode_json(obj))

        with conn:
            while True:
                try:
                    frame = protocol.recv_frame(conn)
                except (OSError, protocol.ProtocolError):
                    return
                if frame is None:
                    return
                kind, payload = frame
                try:
                    if kind != protocol.KIND_JSON:
                        raise protocol.ProtocolError("expected a J frame")
                    req = protocol.decode_json(payload)
                except protocol.ProtocolError as exc:
                    with contextlib.suppress(OSError):
                        send({"ok": False, "error": {"code": "invalid", "message": str(exc)}})
                    return
                try:
                    self.handle(req, send)
                except OSError:
                    return  # the client went away; the kernel stays


CONTEXTS = {
    "python": PythonContext,
    "bash": BashContext,
    "javascript": JavaScriptContext,
    "typescript": TypeScriptContext,
    "r": RContext,
    "java": JavaContext,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--socket", required=True)
    ap.add_argument("--cwd", required=True)
    ap.add_argument("--env-json", default=None, help="JSON object of variables added to the environment")
    ap.add_argument("--language", choices=tuple(CONTEXTS), default="python")
    args = ap.parse_args(argv)

    env = dict(os.environ)
    if args.env_json:
        extra = json.loads(args.env_json)
        if not isinstance(extra, dict):
            ap.error("--env-json must be a JSON object")
        env.update({str(k): str(v) for k, v in extra.items()})
    env.setdefault("JUPYTER_PLATFORM_DIRS", "1")
    os.environ["JUPYTER_PLATFORM_DIRS"] = "1"

    with contextlib.suppress(FileNotFoundError):
        os.unlink(args.socket)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(args.socket)

    stopping = threading.Event()

    def on_signal(_sig, _frame) -> None:
        stopping.set()
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            server.close()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    context = CONTEXTS[args.language](args.cwd, env)
    bridge = Bridge(context)
    try:
        with contextlib.suppress(OSError):  # closed already if a signal came during start-up
            server.listen(16)  # only now: a client that connects finds the interpreter ready
        while not stopping.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                break
            threading.Thread(target=bridge.serve_connection, args=(conn,), daemon=True).start()
    finally:
        context.close()
        with contextlib.suppress(OSError):
            os.unlink(args.socket)
    return 0


if __name__ == "__main__":
    sys.exit(main())
