"""Generate the blocking SDK, ``src/cove/sdk/sync.py``, from the asyncio one, ``src/cove/sdk/aio.py``.

    python scripts/gen_sync.py           # rewrite sync.py
    python scripts/gen_sync.py --check   # exit 1 if sync.py is stale (tests/test_sdk_generated.py does this)

The translation is `unasync <https://pypi.org/project/unasync/>`_'s token rules (``async``/``await``
dropped, ``__aenter__`` → ``__enter__``, ``AsyncIterator`` → ``Iterator``, ...) plus :data:`NAMES`,
applied to code and, as whole words, to strings and docstrings (where ``async ``/``await `` are dropped
too). The few docstring phrases that only make sense for asyncio are listed in :data:`ASYNC_ONLY`, and
the annotations unasync cannot translate in :data:`SYNC_TYPES`; each must match exactly as often as
listed, so an edit to aio.py that breaks one fails here instead of producing a wrong sync.py. The output
is fixed up and formatted by ruff (the project's configuration), so it is deterministic for one ruff.

Everything else that differs between the SDKs lives in the hand-written ``sdk/_async_io.py`` and
``sdk/_sync_io.py``, which aio.py imports as ``_io`` (the rule ``_async_io`` → ``_sync_io`` swaps them).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import tokenize_rt
import unasync

ROOT = Path(__file__).resolve().parent.parent
AIO = ROOT / "src/cove/sdk/aio.py"
SYNC = ROOT / "src/cove/sdk/sync.py"

HEADER = "# Generated from aio.py by scripts/gen_sync.py; do not edit: edit aio.py and run the script.\n"
DOCSTRING = '''"""The blocking SDK: :class:`Sandbox`. All logic lives in :mod:`cove.sdk._core`; this is the I/O edge.

Generated from :mod:`cove.sdk.aio` by ``scripts/gen_sync.py``; edit that module, not this one.
"""'''

# Token (and whole-word) replacements on top of unasync's own. A name that starts with ``Async`` and is
# missing here would become ``Sync...`` (unasync's default); :func:`generate` refuses that.
NAMES = {
    "AsyncSandbox": "Sandbox",
    "AsyncFiles": "Files",
    "AsyncProcess": "Process",
    "AsyncProcesses": "Processes",
    "AsyncPty": "Pty",
    "AsyncContexts": "Contexts",
    "_AsyncHTTP": "_HTTP",
    "AsyncClient": "Client",
    "aclose": "close",
    "aread": "read",
    "aiter_bytes": "iter_bytes",
    "aiter_lines": "iter_lines",
    "aclosing": "closing",
    "_async_io": "_sync_io",
    "asyncio": "time",  # asyncio.sleep → time.sleep, should aio.py ever sleep
}

# Docstring text of aio.py that is about asyncio only: (aio.py text, sync.py text, times it occurs).
ASYNC_ONLY: list[tuple[str, str, int]] = [
    ("A sandbox on a cove server, for asyncio code.", "A sandbox on a cove server.", 1),
    (
        """print((await sb.exec("python3 -c 'print(6*7)'")).stdout)""",
        """print(sb.exec("python3 -c 'print(6*7)'").stdout)""",
        1,
    ),
    ("\n    Callbacks may be plain functions or coroutines.\n", "\n", 1),
    (" chunks\n        (either may be async)::", " chunks::", 1),
    (
        "300).\n\n        Await it (``sb = await AsyncSandbox.create()``) or enter it"
        ' (``async with AsyncSandbox.create() as sb``).\n        """',
        '300)."""',
        1,
    ),
]

# Annotations of the generated code that unasync's one-token rules cannot reach: (regex, replacement,
# times it occurs).
SYNC_TYPES: list[tuple[str, str, int]] = [
    # create returns the sandbox itself, not an awaitable (see _io.creating on each side)
    (r"-> _io\.Creating\[Sandbox\]:", "-> Sandbox:", 1),
    # typing's Generator has three parameters where AsyncGenerator has two
    (r"\bGenerator\[(\w+), None\]", r"Generator[\1, None, None]", 1),
]

_ASYNC_WORDS = re.compile(r"\b(?:async|await) ")
# In strings, "asyncio" is prose, not the module.
_WORD_NAMES = {old: new for old, new in NAMES.items() if old != "asyncio"}
_NAME_WORDS = re.compile(
    r"\b(" + "|".join(sorted(map(re.escape, _WORD_NAMES), key=len, reverse=True)) + r")\b"
)


def _substitute(text: str, rules: list[tuple[str, str, int]], *, regex: bool, what: str) -> str:
    for old, new, count in rules:
        pattern = old if regex else re.escape(old)
        found = len(re.findall(pattern, text))
        if found != count:
            raise SystemExit(f"gen_sync: {what} rule {old!r} matched {found} times, not {count}; update it")
        text = re.sub(pattern, new, text) if regex else text.replace(old, new)
    return text


def _unasync(source: str) -> str:
    """unasync's translation of ``source``, through its public file API."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "_async", "aio.py")
        src.parent.mkdir()
        src.write_text(source, encoding="utf-8")
        rule = unasync.Rule(fromdir="/_async/", todir="/_sync/", additional_replacements=NAMES)
        unasync.unasync_files([str(src)], rules=[rule])
        return Path(tmp, "_sync", "aio.py").read_text(encoding="utf-8")


def _strings(source: str) -> str:
    """Translate names and ``async``/``await`` inside strings and docstrings, as whole words."""
    tokens = tokenize_rt.src_to_tokens(source)
    for i, token in enumerate(tokens):
        if token.name in ("STRING", "FSTRING_MIDDLE"):
            text = _NAME_WORDS.sub(lambda m: _WORD_NAMES[m.group(1)], _ASYNC_WORDS.sub("", token.src))
            tokens[i] = token._replace(src=text)
    return str(tokenize_rt.tokens_to_src(tokens))


def _module_docstring(source: str) -> str:
    tokens = tokenize_rt.src_to_tokens(source)
    first = next(i for i, t in enumerate(tokens) if t.name not in tokenize_rt.NON_CODING_TOKENS)
    if tokens[first].name != "STRING":
        raise SystemExit("gen_sync: aio.py must start with its docstring")
    tokens[first] = tokens[first]._replace(src=DOCSTRING)
    return HEADER + str(tokenize_rt.tokens_to_src(tokens))


def _check_names(source: str) -> None:
    for token in tokenize_rt.src_to_tokens(source):
        if token.name == "NAME" and (
            token.src.startswith(("Sync", "Async")) or token.src in ("async", "await")
        ):
            raise SystemExit(f"gen_sync: {token.src!r} left in sync.py (line {token.line}); add it to NAMES")


def _ruff(args: list[str], source: str) -> str:
    cmd = [sys.executable, "-m", "ruff", *args, "--stdin-filename", str(SYNC), "-"]
    done = subprocess.run(cmd, input=source, capture_output=True, text=True, cwd=ROOT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"gen_sync: {' '.join(cmd[2:])} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def generate(aio_source: str | None = None) -> str:
    """The text sync.py should have, from ``aio_source`` (default: aio.py as it is now)."""
    source = AIO.read_text(encoding="utf-8") if aio_source is None else aio_source
    source = _substitute(source, ASYNC_ONLY, regex=False, what="ASYNC_ONLY")
    source = _strings(_unasync(source))
    source = _substitute(source, SYNC_TYPES, regex=True, what="SYNC_TYPES")
    source = _module_docstring(source)
    _check_names(source)
    # imports sorted and pruned (AsyncGenerator and Generator both become Generator, say); the loop
    # that re-yields a sync iterator becomes ``yield from`` (UP028); then the project's formatting.
    source = _ruff(["check", "--fix", "--unsafe-fixes", "--select", "I,F401,UP028", "--exit-zero"], source)
    return _ruff(["format"], source)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only say whether sync.py is up to date")
    args = parser.parse_args()
    text = generate()
    current = SYNC.read_text(encoding="utf-8") if SYNC.exists() else ""
    if args.check:
        if text != current:
            print(f"{SYNC.relative_to(ROOT)} is stale: run python scripts/gen_sync.py", file=sys.stderr)
            return 1
        return 0
    if text != current:
        SYNC.write_text(text, encoding="utf-8")
        print(f"wrote {SYNC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
