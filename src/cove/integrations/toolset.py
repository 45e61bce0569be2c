"""Claude Managed Agents' ``agent_toolset_20260401`` (bash, read, write, edit, glob, grep) over a cove sandbox.

The six tools behave and word their results and errors like the reference implementation in
``anthropic.lib.tools.agent_toolset``, but run *inside* a cove sandbox (``cove.AsyncSandbox``) instead of on
the host. The MCP server (:mod:`cove.integrations.mcp_server`) and the Claude worker share them.

API::

    from cove import AsyncSandbox
    from cove.integrations.toolset import Toolset, ToolsetError, TOOL_DEFINITIONS

    sb = await AsyncSandbox.create()
    tools = Toolset(sb)                       # workdir: the sandbox's (default /home/user)
    await tools.bash(command="cd /tmp && export X=1")
    await tools.bash(command="pwd; echo $X")  # "/tmp\\n1": one persistent shell per Toolset
    await tools.bash(restart=True)            # "bash session restarted"
    await tools.write("notes.txt", "a\\nb\\n")  # "wrote 4 bytes to notes.txt" (relative: under workdir)
    await tools.read("notes.txt", view_range=[2, 2])      # "b"
    await tools.read("chart.png")             # [{"type": "image", "source": {"type": "base64", ...}}]
    await tools.edit("notes.txt", "a", "A")   # "edited notes.txt (1 replacement(s))"
    await tools.glob("**/*.txt")              # absolute paths, newest first, or "no matches"
    await tools.grep("^A", path=".")          # "path:line:text" lines, or "no matches"
    await tools.call("bash", {"command": "ls"})           # dispatch by tool name (arguments checked)
    await tools.close()                       # kills the shell; the sandbox is left as it is

- Results: ``str``, or for ``read`` of an image/PDF a one-element list with an Anthropic content block
  (``{"type": "image"|"document", "source": {"type": "base64", "media_type", "data"}}``).
- Errors: :class:`ToolsetError` (its text is what the model should see, e.g.
  ``"edit: old_string not found in notes.txt"``); a command that exits non-zero raises
  :class:`BashError` (a ToolsetError) whose text is the command's output, as the reference does.
  Errors of the cove server itself (sandbox gone, auth) propagate as :class:`cove.CoveError`.
- ``TOOL_DEFINITIONS``: the six ``{"name", "description", "input_schema"}`` dicts, identical to
  ``beta_agent_toolset_20260401(...)[i].to_dict()`` of anthropic 2.14.0.
- Paths are sandbox paths; relative ones resolve in ``workdir`` (fixed; a ``cd`` in bash does not move it).
  Unlike the reference there is no confinement to the workdir: the sandbox is the boundary.
- The stateless tools are also plain functions: ``await read(sandbox, "a.txt", workdir="/tmp")``.
- Not safe for concurrent calls on one Toolset's shell: bash calls are serialized by a lock.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import posixpath
import re
import uuid
from collections.abc import Mapping
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from cove.errors import CommandTimeout, Conflict, CoveError, FileNotFound

if TYPE_CHECKING:
    from cove.sdk.aio import AsyncProcess, AsyncSandbox

__all__ = [
    "TOOL_DEFINITIONS",
    "TOOL_NAMES",
    "BashError",
    "BashSession",
    "Toolset",
    "ToolsetError",
    "edit",
    "glob",
    "grep",
    "read",
    "resolve",
    "write",
]

BASH_OUTPUT_LIMIT = 100 * 1024
BASH_DEFAULT_TIMEOUT = 120.0
DEFAULT_MAX_FILE_BYTES = 256 * 1024
MAX_IMAGE_BASE64_BYTES = 5 * 1024 * 1024
MAX_PDF_BYTES = 20 * 1024 * 1024
GREP_OUTPUT_LIMIT = 100 * 1024
GREP_MAX_LINE_LENGTH = 2000
GREP_TIMEOUT = 30
GLOB_RESULT_LIMIT = 200
WALK_MAX_ENTRIES = 50_000
DEFAULT_WORKDIR = "/home/user"
BINARY_MEDIA_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".pdf": "application/pdf",
}
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


class ToolsetError(Exception):
    """A tool failed in a way the model should be told about; ``str(e)`` is the text for it."""


class BashError(ToolsetError):
    """A bash command exited non-zero: ``str(e)`` is its output (as the reference words it)."""

    def __init__(self, output: str, exit_code: int) -> None:
        # An empty error would tell the model nothing: say the code instead.
        super().__init__(output if output else f"exit code {exit_code}")
        self.output = output
        self.exit_code = exit_code


# --- tool definitions: identical to anthropic 2.14.0's (tests/test_mcp.py compares them) ---------------


def _nullable(json_type: dict[str, Any], title: str) -> dict[str, Any]:
    return {"anyOf": [json_type, {"type": "null"}], "default": None, "title": title}


def _schema(
    model: str, doc: str, properties: dict[str, Any], required: list[str] | None = None
) -> dict[str, Any]:
    schema: dict[str, Any] = {"additionalProperties": True, "description": doc, "properties": properties}
    if required:
        schema["required"] = required
    schema.update(title=f"BetaManagedAgentsAgentToolset20260401{model}Input", type="object")
    return schema


_STR = {"type": "string"}
TOOL_DEFINITIONS: list[dict[str, Any]] = [
    {
        "name": "bash",
        "description": "Run a command in a persistent bash shell.",
        "input_schema": _schema(
            "Bash",
            "Input payload for the `bash` tool of the\n`agent_toolset_20260401` toolset.\n\nAll fields are "
            "optional;\na normal invocation supplies `command`, while `restart=true`\n(with no `command`) "
            "reboots the runner-side bash session.",
            {
                "command": _nullable(_STR, "Command"),
                "restart": _nullable({"type": "boolean"}, "Restart"),
                "timeout_ms": _nullable({"type": "integer"}, "Timeout Ms"),
            },
        ),
    },
    {
        "name": "read",
        "description": "Read a file rooted at the working directory.",
        "input_schema": _schema(
            "Read",
            "Input payload for the `read` tool.\n\nReads file contents\nrelative to the runner's working "
            "directory (or absolute when\nthe runner permits).",
            {
                "file_path": {"title": "File Path", "type": "string"},
                "view_range": _nullable({"items": {"type": "integer"}, "type": "array"}, "View Range"),
            },
            ["file_path"],
        ),
    },
    {
        "name": "write",
        "description": "Write a file, creating parent directories as needed.",
        "input_schema": _schema(
            "Write",
            "Input payload for the `write` tool.\n\nWrites (overwriting) the\nentire file contents.",
            {
                "content": {"title": "Content", "type": "string"},
                "file_path": {"title": "File Path", "type": "string"},
            },
            ["content", "file_path"],
        ),
    },
    {
        "name": "edit",
        "description": "Replace text in a file by exact string match.",
        "input_schema": _schema(
            "Edit",
            "Input payload for the `edit` tool.\n\nPerforms a string\nreplacement in the named file; by "
            "default `old_string` must\noccur exactly once.",
            {
                "file_path": {"title": "File Path", "type": "string"},
                "new_string": {"title": "New String", "type": "string"},
                "old_string": {"title": "Old String", "type": "string"},
                "replace_all": _nullable({"type": "boolean"}, "Replace All"),
            },
            ["file_path", "new_string", "old_string"],
        ),
    },
    {
        "name": "glob",
        "description": "List files matching a glob pattern, newest first.",
        "input_schema": _schema(
            "Glob",
            "Input payload for the `glob` tool.\n\nReturns paths matching a\ndoublestar glob pattern, "
            "newest first.",
            {"pattern": {"title": "Pattern", "type": "string"}, "path": _nullable(_STR, "Path")},
            ["pattern"],
        ),
    },
    {
        "name": "grep",
        "description": "Search file contents for a regular expression.",
        "input_schema": _schema(
            "Grep",
            "Input payload for the `grep` tool.\n\nSearches file contents for\na regular expression, "
            "returning matching lines.",
            {"pattern": {"title": "Pattern", "type": "string"}, "path": _nullable(_STR, "Path")},
            ["pattern"],
        ),
    },
]
TOOL_NAMES = tuple(d["name"] for d in TOOL_DEFINITIONS)


# --- paths and errors ---------------------------------------------------------------------------------


def resolve(workdir: str, path: str) -> str:
    """A sandbox path: absolute as given, relative under ``workdir``; ``.``/``..`` collapsed."""
    return posixpath.normpath(path if path.startswith("/") else posixpath.join(workdir, path))


def _reason(exc: CoveError) -> str:
    """The reference's short wording for a file error (never the server's full message)."""
    if isinstance(exc, FileNotFound):
        return "no such file or directory"
    by_code = {
        "not_a_directory": "not a directory",
        "is_a_directory": "is a directory",
        "permission_denied": "permission denied",
        "exists": "file already exists",
    }
    return by_code.get(exc.code or "", exc.message.lower() if exc.message else "i/o error")


def _file_error(op: str, file_path: str, exc: CoveError) -> ToolsetError:
    return ToolsetError(f"{op}: {file_path}: {_reason(exc)}")


def _is_file_error(exc: CoveError) -> bool:
    # Sandbox-level failures (gone, unauthorized, server down) are not the model's to handle.
    return isinstance(exc, FileNotFound) or exc.code in (
        "not_a_directory",
        "is_a_directory",
        "permission_denied",
        "exists",
        "invalid",
        "too_large",
    )


# --- read / write / edit --------------------------------------------------------------------------------


async def _stat_regular(sandbox: AsyncSandbox, op: str, file_path: str, target: str) -> int | None:
    """The file's size (None for a symlink, whose target is read); refuses directories, FIFOs, devices."""
    try:
        entry = await sandbox.files.stat(target)
    except CoveError as e:
        if _is_file_error(e):
            raise _file_error(op, file_path, e) from e
        raise
    if entry.type == "symlink":
        return None
    if entry.type != "file":
        raise ToolsetError(f"{op}: {file_path}: not a regular file")
    return entry.size


async def _read_bytes(sandbox: AsyncSandbox, op: str, file_path: str, target: str) -> bytes:
    try:
        return await sandbox.files.read(target, format="bytes")
    except CoveError as e:
        if _is_file_error(e):
            raise _file_error(op, file_path, e) from e
        raise


def _decode(op: str, file_path: str, data: bytes, hint: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ToolsetError(f"{op}: {file_path}: not valid UTF-8 text ({hint})") from e


def _line_range(text: str, start_line: int, end_line: int) -> str:
    lines = text.split("\n")
    end = end_line if end_line > 0 else len(lines)
    return "\n".join(lines[max(0, start_line - 1) : end])


async def _read_range_streamed(
    sandbox: AsyncSandbox, file_path: str, target: str, start_line: int, end_line: int, limit: int
) -> str:
    """Lines [start_line, end_line] of a file larger than the cap, read as a stream and stopped early."""
    start = max(0, start_line - 1)
    end = end_line if end_line > 0 else None
    if end is not None and end <= start:
        return ""
    picked: list[bytes] = []
    size = 0
    line = 0
    pending = b""
    try:
        chunks = await sandbox.files.read(target, format="stream")
        async with aclosing(chunks):  # type: ignore[type-var]
            async for chunk in chunks:
                pending += chunk
                *complete, pending = pending.split(b"\n")
                for raw in complete:
                    if line >= start:
                        picked.append(raw)
                        size += len(raw) + 1
                    line += 1
                    if size > limit:
                        break
                    if end is not None and line >= end:
                        break
                if size > limit or (end is not None and line >= end):
                    break
            else:
                if line >= start and (end is None or line < end):
                    picked.append(pending)
                    size += len(pending)
    except CoveError as e:
        if _is_file_error(e):
            raise _file_error("read", file_path, e) from e
        raise
    if size > limit:
        if end is not None and end - start == 1:
            raise ToolsetError(
                f"read: line {start + 1} of {file_path} alone exceeds {limit}-byte limit. "
                "The read tool cannot return part of a line, so view_range cannot narrow this further."
            )
        raise ToolsetError(
            f"read: view_range [{start_line}, {end_line}] of {file_path} exceeds {limit}-byte limit. "
            "Narrow the view_range to read a smaller portion."
        )
    return _decode("read", file_path, b"\n".join(picked), _BINARY_HINT)


_BINARY_HINT = "binary files are only supported for image/PDF extensions"


async def read(
    sandbox: AsyncSandbox,
    file_path: str,
    view_range: list[int] | None = None,
    *,
    workdir: str = DEFAULT_WORKDIR,
    max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES,
) -> str | list[dict[str, Any]]:
    """Read a text file (whole, or lines ``view_range=[start, end]``, 1-based inclusive, end <= 0: to the end),
    or an image/PDF as one base64 content block."""
    if view_range and len(view_range) != 2:
        raise ToolsetError("read: view_range must be [start_line, end_line]")
    target = resolve(workdir, file_path)
    size = await _stat_regular(sandbox, "read", file_path, target)
    media_type = BINARY_MEDIA_TYPES.get(posixpath.splitext(target)[1].lower())
    if media_type is not None:
        if view_range:
            raise ToolsetError("read: view_range is not supported for image/PDF files")
        return [await _read_media(sandbox, file_path, target, size, media_type, max_file_bytes)]
    if max_file_bytes is not None and size is not None and size > max_file_bytes:
        if not view_range:
            raise ToolsetError(
                f"read: {file_path} is {size} bytes, exceeds {max_file_bytes}-byte limit. "
                "Use the view_range parameter to read specific line ranges, e.g. view_range: [1, 500]."
            )
        return await _read_range_streamed(
            sandbox, file_path, target, view_range[0], view_range[1], max_file_bytes
        )
    text = _decode("read", file_path, await _read_bytes(sandbox, "read", file_path, target), _BINARY_HINT)
    return _line_range(text, view_range[0], view_range[1]) if view_range else text


async def _read_media(
    sandbox: AsyncSandbox,
    file_path: str,
    target: str,
    size: int | None,
    media_type: str,
    max_file_bytes: int | None,
) -> dict[str, Any]:
    # The API's limits: 5 MiB of base64 per image (n raw bytes -> 4*ceil(n/3)), 20 MiB per PDF.
    limit = MAX_PDF_BYTES if media_type == "application/pdf" else (MAX_IMAGE_BASE64_BYTES // 4) * 3
    if max_file_bytes is not None and max_file_bytes != DEFAULT_MAX_FILE_BYTES:
        limit = min(limit, max_file_bytes)  # an explicit cap binds media too
    if size is not None and size > limit:
        raise ToolsetError(
            f"read: {file_path} is {size} bytes, exceeds {limit}-byte limit for image/PDF files."
        )
    data = await _read_bytes(sandbox, "read", file_path, target)
    if len(data) > limit:  # a symlink's size is only known now
        raise ToolsetError(
            f"read: {file_path} is {len(data)} bytes, exceeds {limit}-byte limit for image/PDF files."
        )
    source = {"type": "base64", "media_type": media_type, "data": base64.standard_b64encode(data).decode()}
    return {"type": "document" if media_type == "application/pdf" else "image", "source": source}


async def write(
    sandbox: AsyncSandbox, file_path: str, content: str, *, workdir: str = DEFAULT_WORKDIR
) -> str:
    """Write (overwrite) a file, creating parent directories."""
    target = resolve(workdir, file_path)
    try:
        await sandbox.files.write(target, content.encode("utf-8"))
    except CoveError as e:
        if _is_file_error(e):
            raise _file_error("write", file_path, e) from e
        raise
    return f"wrote {len(content)} bytes to {file_path}"


async def edit(
    sandbox: AsyncSandbox,
    file_path: str,
    old_string: str,
    new_string: str,
    replace_all: bool | None = None,
    *,
    workdir: str = DEFAULT_WORKDIR,
    max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES,
) -> str:
    """Replace ``old_string`` (which must be unique unless ``replace_all``) with ``new_string``."""
    target = resolve(workdir, file_path)
    size = await _stat_regular(sandbox, "edit", file_path, target)
    if max_file_bytes is not None and size is not None and size > max_file_bytes:
        raise ToolsetError(
            f"edit: {file_path} is {size} bytes, exceeds {max_file_bytes}-byte limit. "
            "The edit tool loads the whole file and cannot modify a file this large."
        )
    data = await _read_bytes(sandbox, "edit", file_path, target)
    text = _decode("edit", file_path, data, "cannot edit binary files")
    count = text.count(old_string)
    if count == 0:
        raise ToolsetError(f"edit: old_string not found in {file_path}")
    if not replace_all and count > 1:
        raise ToolsetError(f"edit: old_string appears {count} times in {file_path} (must be unique)")
    updated = text.replace(old_string, new_string, -1 if replace_all else 1)
    try:
        await sandbox.files.write(target, updated.encode("utf-8"))
    except CoveError as e:
        if _is_file_error(e):
            raise _file_error("edit", file_path, e) from e
        raise
    return f"edited {file_path} ({count if replace_all else 1} replacement(s))"


# --- glob / grep: run inside the sandbox --------------------------------------------------------------

# Python's pathlib glob (the reference's semantics), newest first; run by the sandbox's python3.
_GLOB_SCRIPT = """
import itertools, pathlib, sys
pattern, root, limit, cap = sys.argv[1], pathlib.Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
try:
    root = root.resolve()
    found = list(itertools.islice(root.glob(pattern), cap))
except (ValueError, OSError) as e:
    sys.stderr.write(str(e)); sys.exit(2)
def mtime(p):
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0
found.sort(key=mtime, reverse=True)
sys.stdout.write("\\n".join(str(p) for p in found[:limit]))
"""

# Used where the sandbox has no `rg`: Python regexes over regular, non-binary files, not following
# symlinks, skipping .git and node_modules; exit 1 when nothing matched (as rg does).
_GREP_SCRIPT = """
import os, re, sys
pattern, search, budget, max_line, cap = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
try:
    rx = re.compile(pattern)
except re.error as e:
    sys.stderr.write("invalid regex: %s" % e); sys.exit(2)
out = sys.stdout
hits = 0
def scan(path):
    global budget, hits
    try:
        with open(path, "rb") as f:
            if b"\\0" in f.read(512):
                return True
            f.seek(0)
            for n, raw in enumerate(f, 1):
                if len(raw) > max_line:
                    continue
                line = raw.decode(errors="replace").rstrip("\\r\\n")
                if rx.search(line):
                    entry = "%s:%d:%s" % (path, n, line)
                    budget -= len(entry) + 1
                    if budget < 0:
                        out.write("[output truncated at %s bytes]\\n" % sys.argv[3])
                        return False
                    out.write(entry + "\\n")
                    hits += 1
    except OSError:
        pass
    return True
if os.path.isfile(search):
    scan(search)
else:
    seen = 0
    for top, dirs, files in os.walk(search):
        dirs[:] = [d for d in dirs if d not in (".git", "node_modules") and not os.path.islink(os.path.join(top, d))]
        stop = False
        for name in files:
            full = os.path.join(top, name)
            if os.path.islink(full) or not os.path.isfile(full):
                continue
            seen += 1
            if seen > cap or not scan(full):
                stop = True
                break
        if stop:
            break
sys.exit(0 if hits else 1)
"""

_GREP_SHELL = (
    'if command -v rg >/dev/null 2>&1; then exec rg --no-config -n --no-heading -e "$1" -- "$2"; fi; '
    'exec python3 -c "$3" "$1" "$2" "$4" "$5" "$6"'
)


async def glob(
    sandbox: AsyncSandbox, pattern: str, path: str | None = None, *, workdir: str = DEFAULT_WORKDIR
) -> str:
    """Paths matching a glob pattern (``**`` recursive) under ``path`` (default: workdir), newest first."""
    if pattern.startswith("/"):
        raise ToolsetError(
            "glob: absolute pattern not permitted; pass a relative pattern (and optionally path)"
        )
    if ".." in pattern.split("/"):
        raise ToolsetError("glob: '..' is not permitted in the pattern")
    root = resolve(workdir, path) if path else workdir
    argv = ["python3", "-c", _GLOB_SCRIPT, pattern, root, str(GLOB_RESULT_LIMIT), str(WALK_MAX_ENTRIES)]
    try:
        result = await sandbox.exec(argv, timeout=GREP_TIMEOUT)
    except CommandTimeout as e:
        raise ToolsetError(f"glob: timed out after {GREP_TIMEOUT}s") from e
    if result.exit_code != 0:
        raise ToolsetError(
            f"glob: {(result.stderr or result.stdout).strip() or f'exit code {result.exit_code}'}"
        )
    return result.stdout or "no matches"


async def grep(
    sandbox: AsyncSandbox, pattern: str, path: str | None = None, *, workdir: str = DEFAULT_WORKDIR
) -> str:
    """Lines matching a regular expression (``path:line:text``) in files under ``path`` (default: workdir).

    Uses the sandbox's ``rg`` when it has one, else a Python search with the same output."""
    search = resolve(workdir, path) if path else workdir
    argv = ["/bin/sh", "-c", _GREP_SHELL, "sh", pattern, search, _GREP_SCRIPT]
    argv += [str(GREP_OUTPUT_LIMIT), str(GREP_MAX_LINE_LENGTH), str(WALK_MAX_ENTRIES)]
    try:
        result = await sandbox.exec(argv, timeout=GREP_TIMEOUT)
    except CommandTimeout as e:
        raise ToolsetError(f"grep: timed out after {GREP_TIMEOUT}s") from e
    if result.exit_code == 1:
        return "no matches"
    if result.exit_code != 0:
        message = result.stderr.strip()
        if message.startswith("invalid regex:"):
            raise ToolsetError(f"grep: {message}")
        raise ToolsetError(f"grep: rg failed: {message or f'exit code {result.exit_code}'}")
    out = result.stdout
    if len(out) > GREP_OUTPUT_LIMIT:
        out = out[:GREP_OUTPUT_LIMIT] + f"\n[output truncated at {GREP_OUTPUT_LIMIT} bytes]"
    return out.rstrip("\n")


# --- bash: one persistent shell, a background process of the sandbox with stdin ------------------------


class BashSession:
    """A ``bash --noprofile --norc`` running in the sandbox (a cove background process with stdin).

    Each command is written to its stdin followed by a ``printf`` of a per-call sentinel and ``$?``; its
    output (stdout and stderr merged) is read from the process's output up to that sentinel. The next
    read starts at the chunk that held the previous sentinel and skips through it, so output that
    background jobs print between calls is kept, and offsets never depend on how bytes were decoded.
    """

    def __init__(self, sandbox: AsyncSandbox, process: AsyncProcess) -> None:
        self._sandbox = sandbox
        self._process = process
        self._resume_offset = 0
        self._last_sentinel: str | None = None
        self.closed = False

    @classmethod
    async def start(
        cls, sandbox: AsyncSandbox, workdir: str, env: Mapping[str, str] | None = None
    ) -> BashSession:
        shell_env = {**(env or {}), "PS1": "", "PS2": "", "TERM": "dumb"}
        process = await sandbox.processes.start(
            ["/bin/bash", "--noprofile", "--norc"], cwd=workdir, env=shell_env, stdin=True, tag="toolset-bash"
        )
        return cls(sandbox, process)

    @property
    def process_id(self) -> str:
        return self._process.id

    async def exec(self, command: str, timeout: float = BASH_DEFAULT_TIMEOUT) -> tuple[str, int]:
        """Run ``command``; returns (output, exit code; -1 if the shell ended before reporting one)."""
        if self.closed:
            raise RuntimeError("bash session terminated; restart required")
        sentinel = f"__COVE_CMD_{uuid.uuid4().hex}_DONE__"
        # The quotes keep the sentinel itself out of the echoed input; only printf joins it.
        split = f"{sentinel[:8]}''{sentinel[8:]}"
        # </dev/null: a command that reads stdin gets EOF instead of eating the next command.
        wrapped = f"{{ {command}\n}} </dev/null 2>&1; printf '\\n{split}%d\\n' $?\n"
        try:
            await self._process.send_stdin(wrapped)
        except Conflict as e:  # the shell has exited (e.g. `exit`, or it was lost in a hibernation)
            self.closed = True
            raise RuntimeError("bash session terminated; restart required") from e
        try:
            async with asyncio.timeout(timeout):
                return await self._collect(sentinel)
        except TimeoutError as e:
            await asyncio.shield(self.close())
            raise TimeoutError(f"bash command timed out after {_seconds(timeout)}s") from e
        except asyncio.CancelledError:
            # The command may still be running: a later call must not read its output as its own.
            await asyncio.shield(self.close())
            raise

    async def _collect(self, sentinel: str) -> tuple[str, int]:
        done = re.compile(re.escape(sentinel) + r"(-?\d+)\n")
        slack = len(sentinel) + 24  # room for a sentinel line split across chunks
        previous = self._last_sentinel
        buf = ""
        starts: list[tuple[int, int]] = []  # (index in buf, byte offset) of each chunk read
        truncated = False
        code: int | None = None
        async with aclosing(self._process.output(offset=self._resume_offset)) as events:
            async for event in events:
                if event.type == "exit":
                    break
                if event.type in ("attached", "truncated"):
                    if event.truncated or event.type == "truncated":
                        previous = None  # the previous sentinel was dropped from the kept window
                        truncated = truncated or self._last_sentinel is not None
                    continue
                if event.type not in ("stdout", "stderr"):
                    continue
                starts.append((len(buf), event.offset or 0))
                buf += event.data
                if previous is not None:  # skip through what the previous call already returned
                    at = buf.find(previous)
                    end = buf.find("\n", at + len(previous)) if at >= 0 else -1
                    if end < 0:
                        continue
                    buf, starts = buf[end + 1 :], _shift(starts, end + 1)
                    previous = None
                match = done.search(buf, max(0, len(buf) - len(event.data) - slack))
                if match is not None:
                    # Resume at the chunk where this sentinel begins: the next call skips through it.
                    self._resume_offset = next(o for i, o in reversed(starts) if i <= match.start())
                    self._last_sentinel = sentinel
                    code = int(match.group(1))
                    buf = buf[: match.start()]
                    break
                if len(buf) > BASH_OUTPUT_LIMIT + slack:
                    cut = len(buf) - BASH_OUTPUT_LIMIT - slack
                    buf, starts, truncated = buf[cut:], _shift(starts, cut), True  # keep the tail
        if code is None:  # the shell ended before reporting
            self.closed = True
            return _ANSI_ESCAPE.sub("", buf).strip(), -1
        if len(buf) > BASH_OUTPUT_LIMIT:
            buf, truncated = buf[-BASH_OUTPUT_LIMIT:], True
        out = _ANSI_ESCAPE.sub("", buf).rstrip("\n")
        return ("[output truncated]\n" + out if truncated else out), code

    async def close(self) -> None:
        """Kill the shell and whatever it runs (idempotent)."""
        self.closed = True
        with contextlib.suppress(CoveError):  # already gone, or the sandbox is
            await self._process.kill()


def _seconds(timeout: float) -> str:
    return str(float(timeout))


def _shift(starts: list[tuple[int, int]], cut: int) -> list[tuple[int, int]]:
    """Chunk starts after ``cut`` characters were dropped from the buffer's front."""
    shifted = [(i - cut, o) for i, o in starts]
    while len(shifted) > 1 and shifted[1][0] <= 0:
        shifted.pop(0)
    return shifted


# --- the toolset bound to one sandbox -----------------------------------------------------------------


class Toolset:
    """The six tools bound to one sandbox, with one persistent bash shell (started on first use)."""

    def __init__(
        self,
        sandbox: AsyncSandbox,
        *,
        workdir: str | None = None,
        env: Mapping[str, str] | None = None,
        max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES,
    ) -> None:
        self.sandbox = sandbox
        self._workdir = workdir
        self.env = dict(env or {})
        self.max_file_bytes = max_file_bytes
        self._bash: BashSession | None = None
        self._lock = asyncio.Lock()

    async def workdir(self) -> str:
        """Where relative paths resolve: the given one, else the sandbox's working directory."""
        if self._workdir is None:
            info = await self.sandbox.info()
            self._workdir = info.workdir or DEFAULT_WORKDIR
        return self._workdir

    async def bash(
        self, command: str | None = None, restart: bool | None = None, timeout_ms: int | None = None
    ) -> str:
        """Run ``command`` in the persistent shell (cwd and exported variables carry over), or restart it."""
        async with self._lock:
            if restart:
                await self._close_bash()
                self._bash = await BashSession.start(self.sandbox, await self.workdir(), self.env)
                return "bash session restarted"
            if not command:
                raise ToolsetError("bash: command is required")
            timeout = timeout_ms / 1000.0 if timeout_ms else BASH_DEFAULT_TIMEOUT
            if self._bash is None:
                self._bash = await BashSession.start(self.sandbox, await self.workdir(), self.env)
            try:
                out, code = await self._bash.exec(command, timeout=timeout)
            except (RuntimeError, TimeoutError) as e:
                raise ToolsetError(f"bash: {e}") from e
            if code != 0:
                raise BashError(out, code)
            return out

    async def read(self, file_path: str, view_range: list[int] | None = None) -> str | list[dict[str, Any]]:
        return await read(
            self.sandbox,
            file_path,
            view_range,
            workdir=await self.workdir(),
            max_file_bytes=self.max_file_bytes,
        )

    async def write(self, file_path: str, content: str) -> str:
        return await write(self.sandbox, file_path, content, workdir=await self.workdir())

    async def edit(
        self, file_path: str, old_string: str, new_string: str, replace_all: bool | None = None
    ) -> str:
        return await edit(
            self.sandbox,
            file_path,
            old_string,
            new_string,
            replace_all,
            workdir=await self.workdir(),
            max_file_bytes=self.max_file_bytes,
        )

    async def glob(self, pattern: str, path: str | None = None) -> str:
        return await glob(self.sandbox, pattern, path, workdir=await self.workdir())

    async def grep(self, pattern: str, path: str | None = None) -> str:
        return await grep(self.sandbox, pattern, path, workdir=await self.workdir())

    async def call(self, name: str, arguments: Mapping[str, Any]) -> str | list[dict[str, Any]]:
        """Run tool ``name`` with JSON ``arguments`` (checked against its schema; unknown keys are ignored)."""
        if name not in TOOL_NAMES:
            raise ToolsetError(f"unknown tool {name!r}: expected one of {', '.join(TOOL_NAMES)}")
        kwargs = _check_arguments(name, arguments)
        method = getattr(self, name)
        return await method(**kwargs)  # type: ignore[no-any-return]

    async def _close_bash(self) -> None:
        if self._bash is not None:
            bash, self._bash = self._bash, None
            await bash.close()

    async def close(self) -> None:
        """Kill the shell; the sandbox itself is left as it is."""
        await self._close_bash()

    async def __aenter__(self) -> Toolset:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "boolean": (bool,),
    "integer": (int,),
    "array": (list,),
}


def _check_arguments(name: str, arguments: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(arguments, Mapping):
        raise ToolsetError(f"{name}: arguments must be an object")
    schema = next(d["input_schema"] for d in TOOL_DEFINITIONS if d["name"] == name)
    for field in schema.get("required", []):
        if field not in arguments:
            raise ToolsetError(f"{name}: {field} is required")
    kwargs: dict[str, Any] = {}
    for field, spec in schema["properties"].items():
        if field not in arguments or arguments[field] is None:
            continue
        value = arguments[field]
        json_type = spec.get("type") or spec["anyOf"][0]["type"]
        ok = isinstance(value, _JSON_TYPES[json_type]) and not (
            json_type == "integer" and isinstance(value, bool)
        )
        if ok and json_type == "array":
            ok = all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        if not ok:
            kind = {"array": "a list of integers", "integer": "an integer"}.get(json_type, f"a {json_type}")
            raise ToolsetError(f"{name}: {field} must be {kind}")
        kwargs[field] = value
    return kwargs
