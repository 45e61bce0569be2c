"""nftables through libnftables, in process: one JSON document per change, no `nft` exec.

libnftables is the library the `nft` command is built on (Debian: libnftables1, a dependency of
nftables); its JSON API takes a whole batch and applies it atomically. Debian's python3-nftables
binds the same library for the system interpreter only, so this is the few calls it wraps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import threading
from typing import Any

_OUTPUT_JSON = 1 << 4  # NFT_CTX_OUTPUT_JSON
_OUTPUT_HANDLE = 1 << 3  # NFT_CTX_OUTPUT_HANDLE


class NftError(RuntimeError):
    """libnftables refused a batch; the message is its own."""


class Nft:
    def __init__(self) -> None:
        name = ctypes.util.find_library("nftables") or "libnftables.so.1"
        try:
            lib = ctypes.CDLL(name)
        except OSError as e:
            raise NftError(f"libnftables is not installed (apt install nftables): {e}") from None
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self._lib = lib
        self._ctx = lib.nft_ctx_new(0)
        lib.nft_ctx_output_set_flags(self._ctx, _OUTPUT_JSON | _OUTPUT_HANDLE)
        lib.nft_ctx_buffer_output(self._ctx)
        lib.nft_ctx_buffer_error(self._ctx)
        self._lock = threading.Lock()  # a context is not thread-safe

    def run(self, commands: list[dict[str, Any]]) -> dict[str, Any]:
        """Apply a batch of JSON commands (`{"add": {...}}`, `{"list": {...}}`…) atomically."""
        return self.run_text(json.dumps({"nftables": commands}))

    def run_text(self, text: str) -> dict[str, Any]:
        """A command in nft's own syntax or a JSON document; its JSON output (if any)."""
        with self._lock:
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, text.encode())
            out = self._lib.nft_ctx_get_output_buffer(self._ctx) or b""
            err = self._lib.nft_ctx_get_error_buffer(self._ctx) or b""
        if rc != 0:
            raise NftError(err.decode(errors="replace").strip() or f"nft failed ({rc})")
        return json.loads(out) if out.strip() else {}


_shared: Nft | None = None


def shared() -> Nft:
    global _shared
    if _shared is None:
        _shared = Nft()
    return _shared
