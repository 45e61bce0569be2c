"""The blocking SDK (sdk/sync.py) is generated from the asyncio one (sdk/aio.py): it must not be stale."""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from cove.sdk import _core, aio, sync

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("unasync", reason="scripts/gen_sync.py needs unasync (pip install -e '.[dev]')")


def _gen_sync() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_sync", ROOT / "scripts" / "gen_sync.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gen_sync", module)
    spec.loader.exec_module(module)
    return module


def test_sync_is_generated_from_aio() -> None:
    expected = _gen_sync().generate()
    current = (ROOT / "src/cove/sdk/sync.py").read_text(encoding="utf-8")
    assert current == expected, (
        "src/cove/sdk/sync.py is stale or was edited by hand: edit src/cove/sdk/aio.py, then run "
        "`python scripts/gen_sync.py`"
    )


def _public(module: ModuleType) -> dict[str, Any]:
    return {name: getattr(module, name) for name in module.__all__}


def test_same_public_api() -> None:
    """Every public class, method and function has a twin on the other side with the same parameters."""
    renames = _gen_sync().NAMES
    pairs: list[tuple[Any, Any]] = [
        (getattr(aio, old), getattr(sync, new)) for old, new in renames.items() if hasattr(aio, old)
    ]
    pairs += [(_public(aio)[name], _public(sync)[name]) for name in aio.__all__ if name in sync.__all__]
    assert sorted(renames.get(name, name) for name in aio.__all__) == sorted(sync.__all__)
    for a, s in pairs:
        if inspect.isclass(a):
            assert isinstance(s, type)
            methods = {n for n in vars(a) if not n.startswith("_") or n in ("__init__",)}
            assert methods == {n for n in vars(s) if not n.startswith("_") or n in ("__init__",)}
            for name in methods:
                am, sm = getattr(a, name), getattr(s, name)
                if callable(am):
                    assert list(inspect.signature(am).parameters) == list(inspect.signature(sm).parameters)
        elif callable(a):
            assert list(inspect.signature(a).parameters) == list(inspect.signature(s).parameters)


def test_create_options_are_the_signature() -> None:
    """Every keyword of create but the client's own goes into the request body under its name."""
    params = inspect.signature(sync.Sandbox.create).parameters
    assert list(params) == list(inspect.signature(aio.AsyncSandbox.create).parameters)
    args = {name: None for name in params} | {"cls": sync.Sandbox, "template": "base", "cpu": 2.0}
    body = _core.create_body(args)
    assert body == {"template": "base", "env": {}, "metadata": {}, "cpu": 2.0}
    assert not set(body) & _core.CLIENT_ARGS
