"""envd's `process.Process` service (Connect RPC) on cove's background processes.

Every command the e2b SDK starts (`commands.run`, `pty.create`) is a cove background process: a
guest supervisor owns it and keeps its output, so a stream can end and `Connect` picks the process
up again. e2b names processes by their pid inside the sandbox (or a tag); the guest's process list
maps a pid to the supervisor's id. As in envd:
- `Start` streams a start event (pid), data events (stdout / stderr, or pty for a terminal) and an
  end event; `Connect` does the same for a running process, with output from now on.
- A `Connect-Timeout-Ms` on `Start` is the command's lifetime: at the deadline it is killed (SIGKILL),
  whether or not anyone still listens. The SDK sends its `timeout` (60 s unless told otherwise).
- Only running processes are listed and can be selected; an exited one is `not_found`.
- The end event of a process killed by a signal has `exited: false`, `exit_code: -1` and
  `status`/`error` "signal: killed"; otherwise `exit_code`, "exit status N" and, if N != 0, `error`.
- The acting user is `Authorization: Basic base64("<user>:")` (the sandbox's default user without it).

Unlike envd, signals go to the process's whole group, and `CloseStdin` on a terminal sends ^D.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from cove import stages
from cove.node.guest_client import GuestError, GuestUnavailable

from . import connect, fsops
from .connect import ConnectError, Context
from .proto import process_pb2 as pb
from .routing import target

if TYPE_CHECKING:
    from cove.controlplane.app import Cove

_SIGNALS = {pb.SIGNAL_SIGKILL: "SIGKILL", pb.SIGNAL_SIGTERM: "SIGTERM"}
_START_ERRORS = ("not_found", "not_a_directory", "permission_denied", "invalid")  # envd: bad request


def _as_connect(err: fsops.EnvdError) -> ConnectError:
    return ConnectError(err.code, err.message)


@contextlib.asynccontextmanager
async def _guest_errors(ctx: Context) -> AsyncIterator[None]:
    """Guest errors as envd's Connect codes (a sandbox that died meanwhile: `unavailable`)."""
    try:
        yield
    except (GuestError, GuestUnavailable) as exc:
        raise _as_connect(await _session(ctx).failed(exc)) from exc


@contextlib.asynccontextmanager
async def _stream_cut(session: fsops.Session) -> AsyncIterator[None]:
    """A stream the sandbox's going away cut short, worded as e2b's proxy does: the SDK then probes
    the sandbox's health to tell a killed sandbox from a network failure."""
    try:
        yield
    except GuestUnavailable as exc:
        await session.failed(exc)  # notes a sandbox that died
        message = f"the connection to sandbox {session.rec.id} ended before the stream completed"
        raise ConnectError("unavailable", message) from exc


def _session(ctx: Context) -> fsops.Session:
    return ctx.state["session"]


def _user(ctx: Context) -> str | None:
    try:
        return fsops.basic_user(ctx.headers)
    except fsops.EnvdError as exc:
        raise _as_connect(exc) from None


def _keepalive(cls: type[pb.StartResponse] | type[pb.ConnectResponse]) -> Any:
    return lambda: cls(event=pb.ProcessEvent(keepalive=pb.ProcessEvent.KeepAlive()))


def _status(exit_code: int, sig: int | None) -> pb.ProcessEvent.EndEvent:
    """The end event as envd (Go's os.ProcessState) words it."""
    if sig is not None:
        try:
            name = signal.strsignal(sig) or f"signal {sig}"
        except ValueError:
            name = f"signal {sig}"
        status = f"signal: {name.lower()}"
        return pb.ProcessEvent.EndEvent(exit_code=-1, exited=False, status=status, error=status)
    status = f"exit status {exit_code}"
    end = pb.ProcessEvent.EndEvent(exit_code=exit_code, exited=True, status=status)
    if exit_code != 0:
        end.error = status
    return end


REAP_RETRIES = 100  # cut waits a command's deadline survives (each a pause, or a failed call)


class Service:
    def __init__(self, cove: Cove) -> None:
        self.cove = cove
        self._reapers: set[asyncio.Task[None]] = set()  # deadline kills, held until they finish

    def methods(self) -> dict[str, connect.Method]:
        p = "/process.Process/"
        return {
            p + "Start": connect.server_stream(
                pb.StartRequest, pb.StartResponse, self.start, _keepalive(pb.StartResponse)
            ),
            p + "Connect": connect.server_stream(
                pb.ConnectRequest, pb.ConnectResponse, self.connect, _keepalive(pb.ConnectResponse)
            ),
            p + "List": connect.unary(pb.ListRequest, pb.ListResponse, self.list),
            p + "SendInput": connect.unary(pb.SendInputRequest, pb.SendInputResponse, self.send_input),
            p + "StreamInput": connect.client_stream(
                pb.StreamInputRequest, pb.StreamInputResponse, self.stream_input
            ),
            p + "SendSignal": connect.unary(pb.SendSignalRequest, pb.SendSignalResponse, self.send_signal),
            p + "CloseStdin": connect.unary(pb.CloseStdinRequest, pb.CloseStdinResponse, self.close_stdin),
            p + "Update": connect.unary(pb.UpdateRequest, pb.UpdateResponse, self.update),
        }

    async def _open(self, ctx: Context) -> fsops.Session:
        """The call's sandbox (a paused one is resumed) and guest; the envd token is required."""
        tgt = target(ctx.scope)
        if not tgt.envd_token:
            raise ConnectError(
                "unauthenticated", "a valid X-Access-Token (the sandbox's envd token) is required"
            )
        try:
            ctx.state["session"] = session = await fsops.session(self.cove, tgt)
            stages.mark("session")
        except fsops.EnvdError as exc:
            raise _as_connect(exc) from exc
        return session

    # -- lookups -----------------------------------------------------------------------------
    async def _find(self, ctx: Context, selector: pb.ProcessSelector) -> dict[str, Any]:
        await self._open(ctx)
        which = selector.WhichOneof("selector")
        if which is None:
            raise ConnectError("invalid_argument", "a process selector (pid or tag) is required")
        async with _guest_errors(ctx):
            procs = await _session(ctx).guest.processes()
        for proc in reversed(procs):  # newest first: a pid can be reused once its process has exited
            if proc.get("running") and proc.get(which) == getattr(selector, which):
                return proc
        raise ConnectError("not_found", f"process with {which} {getattr(selector, which)} not found")

    async def _signal_of(self, ctx: Context, proc_id: str) -> int | None:
        with contextlib.suppress(GuestError, GuestUnavailable):
            for proc in await _session(ctx).guest.processes():
                if proc.get("id") == proc_id:
                    return proc.get("signal")
        return None

    # -- streams -----------------------------------------------------------------------------
    async def _events(
        self,
        ctx: Context,
        proc_id: str,
        pid: int,
        offset: int,
        pty: bool,
        cls: Any,
        output: AsyncIterator[tuple[str, Any]] | None = None,
    ) -> AsyncIterator[Any]:
        """start, data... and end events of one process, as `cls` (StartResponse/ConnectResponse).
        `output`: an attach already under way (the spawn's own), else one is made here."""
        session = _session(ctx)
        # block: as in envd, a slow reader slows the process down rather than missing output.
        if output is None:
            output = session.guest.attach(proc_id, offset=offset, block=True)
        try:
            async with _guest_errors(ctx):
                await anext(output)  # "attached": the process is there
            stages.mark("attach")
            yield cls(event=pb.ProcessEvent(start=pb.ProcessEvent.StartEvent(pid=pid)))
            stages.mark("start event")
            async with _guest_errors(ctx), _stream_cut(session):
                async for kind, data in output:
                    if kind in ("stdout", "stderr"):
                        field = "pty" if pty else kind
                        yield cls(event=pb.ProcessEvent(data=pb.ProcessEvent.DataEvent(**{field: data})))
                    elif kind == "exit":
                        stages.mark("run")
                        code = int(data["exit_code"])  # type: ignore[index]
                        # 128 + n is how a signal death reads; only the process record tells it from `exit 137`.
                        sig = await self._signal_of(ctx, proc_id) if code > 128 else None
                        yield cls(event=pb.ProcessEvent(end=_status(code, sig)))
                        return
        finally:
            await output.aclose()  # type: ignore[attr-defined]

    async def start(self, req: pb.StartRequest, ctx: Context) -> AsyncIterator[pb.StartResponse]:
        cfg = req.process
        if not cfg.cmd:
            raise ConnectError("invalid_argument", "process.cmd is required")
        size = req.pty.size if req.HasField("pty") else None
        fields: dict[str, Any] = {
            "argv": [cfg.cmd, *cfg.args],
            "cwd": cfg.cwd if cfg.HasField("cwd") and cfg.cwd else None,
            "env": dict(cfg.envs) or None,
            "user": _user(ctx),
            # Unset means true: older SDKs always had stdin open.
            "stdin": req.stdin if req.HasField("stdin") else True,
            "pty": None if size is None else {"rows": size.rows or 24, "cols": size.cols or 80},
            "tag": req.tag if req.HasField("tag") else None,
            "hold": True,  # until _events attaches (blocking): envd streams from the first byte
        }
        session = await self._open(ctx)
        # Spawned and attached on one guest connection: the attach misses nothing (hold).
        output = session.guest.spawn_attach(offset=0, block=True, **fields)
        try:
            kind, started = await anext(output)
            stages.mark("spawn")
            if kind != "spawned":
                raise GuestUnavailable(f"the guest agent answered a spawn with {kind!r}")
        except GuestError as exc:
            await output.aclose()  # type: ignore[attr-defined]
            err = fsops.from_guest(exc)
            code = (
                "invalid_argument"
                if exc.code in _START_ERRORS and err.code != "unauthenticated"
                else err.code
            )
            raise ConnectError(code, err.message) from exc
        except GuestUnavailable as exc:
            await output.aclose()  # type: ignore[attr-defined]
            raise _as_connect(await session.failed(exc)) from exc
        if ctx.timeout:
            self._kill_at(session, started["id"], ctx.timeout)
        async for event in self._events(
            ctx, started["id"], started["pid"], 0, size is not None, pb.StartResponse, output
        ):
            yield event

    def _kill_at(self, session: fsops.Session, proc_id: str, timeout: float) -> None:
        """envd's command lifetime: kill the process when the Start call's deadline passes. Time
        spent paused does not count (as in e2b's frozen VM): a wait cut by a pause waits out the
        rest once the sandbox runs again, and ends with the sandbox."""

        async def reap() -> None:
            left = timeout
            for _ in range(REAP_RETRIES):
                started = time.monotonic()
                try:
                    if (await session.guest.wait(proc_id, left))["running"]:
                        await session.guest.kill(proc_id)
                    return
                except GuestError:
                    return
                except GuestUnavailable:
                    left = max(0.0, left - (time.monotonic() - started))
                    await asyncio.sleep(0.5)  # an agent that does not answer is not asked at once again
                    if not await self._running_again(session.rec.id):
                        return

        task = asyncio.create_task(reap())
        self._reapers.add(task)
        task.add_done_callback(self._reapers.discard)

    async def _running_again(self, sandbox_id: str) -> bool:
        """After a guest call was cut: wait while the sandbox is paused (polling, ever less often);
        True once it runs again, False when it ended."""
        pause = 0.5
        while True:
            rec = await self.cove.service.lookup(sandbox_id)
            if rec is None or rec.state not in ("starting", "running", "paused", "hibernated"):
                return False
            if rec.state == "running":
                return True
            await asyncio.sleep(pause)
            pause = min(pause * 2, 30.0)

    async def connect(self, req: pb.ConnectRequest, ctx: Context) -> AsyncIterator[pb.ConnectResponse]:
        proc = await self._find(ctx, req.process)
        pty = proc.get("pty") is not None
        async for event in self._events(ctx, proc["id"], proc["pid"], -1, pty, pb.ConnectResponse):
            yield event

    # -- unary calls -------------------------------------------------------------------------
    async def list(self, req: pb.ListRequest, ctx: Context) -> pb.ListResponse:
        await self._open(ctx)
        async with _guest_errors(ctx):
            procs = await _session(ctx).guest.processes()
        out = pb.ListResponse()
        for proc in procs:
            if not proc.get("running") or proc.get("pid") is None:
                continue
            argv = proc.get("argv") or [""]
            info = out.processes.add(pid=proc["pid"])
            info.config.cmd = argv[0]
            info.config.args.extend(argv[1:])
            info.config.envs.update(proc.get("env") or {})
            if proc.get("cwd"):
                info.config.cwd = proc["cwd"]
            if proc.get("tag") is not None:
                info.tag = proc["tag"]
        return out

    async def send_input(self, req: pb.SendInputRequest, ctx: Context) -> pb.SendInputResponse:
        proc = await self._find(ctx, req.process)
        which = req.input.WhichOneof("input")
        data = getattr(req.input, which) if which else b""
        async with _guest_errors(ctx):
            await _session(ctx).guest.input(proc["id"], data)
        return pb.SendInputResponse()

    async def stream_input(
        self, reqs: AsyncIterator[pb.StreamInputRequest], ctx: Context
    ) -> pb.StreamInputResponse:
        await self._open(ctx)
        first = await anext(reqs, None)
        if first is None or first.WhichOneof("event") != "start":
            raise ConnectError("invalid_argument", "the input stream must begin with a start event")
        proc = await self._find(ctx, first.start.process)

        async def chunks() -> AsyncIterator[bytes]:
            async for msg in reqs:
                kind = msg.WhichOneof("event")
                if kind == "start":
                    raise ConnectError("invalid_argument", "the input stream has a second start event")
                if kind == "data":
                    which = msg.data.input.WhichOneof("input")
                    if which:
                        yield getattr(msg.data.input, which)

        async with _guest_errors(ctx):
            await _session(ctx).guest.input(proc["id"], chunks())  # one connection: keeps the order
        return pb.StreamInputResponse()

    async def send_signal(self, req: pb.SendSignalRequest, ctx: Context) -> pb.SendSignalResponse:
        name = _SIGNALS.get(req.signal)
        if name is None:
            raise ConnectError(
                "invalid_argument", f"unsupported signal {req.signal} (SIGKILL and SIGTERM are)"
            )
        proc = await self._find(ctx, req.process)
        async with _guest_errors(ctx):
            await _session(ctx).guest.signal(proc["id"], name)
        return pb.SendSignalResponse()

    async def close_stdin(self, req: pb.CloseStdinRequest, ctx: Context) -> pb.CloseStdinResponse:
        proc = await self._find(ctx, req.process)
        async with _guest_errors(ctx):
            await _session(ctx).guest.close_stdin(proc["id"])
        return pb.CloseStdinResponse()

    async def update(self, req: pb.UpdateRequest, ctx: Context) -> pb.UpdateResponse:
        proc = await self._find(ctx, req.process)
        if req.HasField("pty"):
            size = req.pty.size
            async with _guest_errors(ctx):
                await _session(ctx).guest.resize(proc["id"], size.rows, size.cols)
        return pb.UpdateResponse()


def methods(cove: Cove) -> dict[str, connect.Method]:
    """The `/process.Process/*` Connect methods (`envd.build` serves them beside the filesystem's)."""
    return Service(cove).methods()
