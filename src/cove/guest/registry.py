"""Where background processes are recorded: PROCS_DIR/<id>.json (a process's metadata, written by its
supervisor) and PROCS_DIR/<id>.sock (the supervisor's socket), and how the handlers reach them."""

from __future__ import annotations

import _socket
import os

from . import protocol
from .errors import OpError

PROCS_DIR = "/run/cove/sock/procs"  # test mode: a procs/ directory beside the agent's socket (main())
PROCS_KEEP = 100  # exited processes kept listed (older ones are forgotten on the next spawn)
# ...forgotten once this many more have gathered: a spawn then reads every record only once in that
# many spawns, not each time (each read is a file per process: ~5 ms at 100 of them).
PROCS_SLACK = 25
PUBLIC_FIELDS = (
    "id",
    "pid",
    "cmd",
    "argv",
    "tag",
    "pty",
    "running",
    "exit_code",
    "started_at",
    "ended_at",
    "cwd",
    "env",
    "signal",
)


def proc_id_field(req: dict) -> str:
    proc_id = req.get("id")
    if (
        not isinstance(proc_id, str)
        or not 1 <= len(proc_id) <= 32
        or not all(ch in "0123456789abcdef" for ch in proc_id)
    ):
        raise OpError("invalid", "id must be a process id as returned by spawn")
    return proc_id


def proc_path(proc_id: str, suffix: str) -> str:
    return f"{PROCS_DIR}/{proc_id}{suffix}"


def write_meta(meta: dict) -> None:
    path = proc_path(meta["id"], ".json")
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, protocol.dumps(meta).encode("utf-8", "replace"))
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_meta(proc_id: str) -> dict | None:
    """A process's metadata; a supervisor that died without saying so (killed) means not running."""
    try:
        with open(proc_path(proc_id, ".json"), "rb") as f:
            meta = protocol.decode_json(f.read())
    except (OSError, protocol.ProtocolError):
        return None
    if meta.get("running"):
        try:
            os.kill(meta.get("supervisor") or 0, 0)
        except ProcessLookupError:
            meta["running"] = False
        except (OSError, TypeError):
            pass
    return meta


def all_meta() -> list[dict]:
    try:
        names = os.listdir(PROCS_DIR)
    except FileNotFoundError:
        return []
    metas = []
    for name in names:
        if name.endswith(".json"):
            meta = read_meta(name[:-5])
            if meta is not None:
                metas.append(meta)
    metas.sort(key=lambda m: m.get("started_at") or 0)
    return metas


def supervisor_request(proc_id: str, req: dict, timeout: float = 1.0) -> dict | None:
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(proc_path(proc_id, ".sock"))
        sock.sendall(protocol.encode_json(req))
        frame = protocol.recv_frame(sock)
        return protocol.decode_json(frame[1]) if frame is not None else None
    except (OSError, protocol.ProtocolError):
        return None
    finally:
        sock.close()


def forget_old_processes() -> None:
    """Keep the newest PROCS_KEEP exited processes; stop the supervisors of older ones once more than
    PROCS_SLACK beyond that have gathered (a listing alone tells when: no record is read before)."""
    try:
        recorded = sum(1 for name in os.listdir(PROCS_DIR) if name.endswith(".json"))
    except FileNotFoundError:
        return
    if recorded <= PROCS_KEEP + PROCS_SLACK:
        return
    exited = [m for m in all_meta() if not m.get("running")]
    if len(exited) <= PROCS_KEEP + PROCS_SLACK:
        return
    exited.sort(key=lambda m: m.get("ended_at") or 0)
    for meta in exited[: len(exited) - PROCS_KEEP]:
        proc_id = str(meta.get("id"))
        supervisor_request(proc_id, {"op": "shutdown"})
        for suffix in (".json", ".sock"):
            try:  # noqa: SIM105
                os.unlink(proc_path(proc_id, suffix))
            except OSError:
                pass


def new_process_id() -> str:
    """An unused process id, with room made for its record (older exited processes forgotten)."""
    os.makedirs(PROCS_DIR, mode=0o700, exist_ok=True)
    forget_old_processes()
    while True:
        proc_id = os.urandom(4).hex()
        if not os.path.lexists(proc_path(proc_id, ".json")):
            return proc_id
