"""The `kernel` layer: a Python virtual environment with Jupyter's kernel machinery, for code contexts.

The layer holds one directory, ``opt/cove/kernel``: a venv made from the host's ``/usr/bin/python3``
(which every sandbox sees read-only at ``/usr``) with ipykernel, jupyter_client and matplotlib in
it. ``/run/cove/kernel_bridge.py`` runs under its interpreter inside the sandbox.

A venv bakes its own absolute path into ``pyvenv.cfg`` and the shebangs of its scripts, so it is built
*at the path it will have in a sandbox*: the build runs in a private mount namespace where the layer's
``opt/cove/kernel`` is bind-mounted on ``/opt/cove/kernel``. When the host has no ``/opt/cove/kernel``
to mount on, the namespace first lays a read-only overlay on ``/opt`` (the layer's ``opt`` above the
host's ``/opt``) so the mount point exists there without anything being created on the host.
:func:`mapped_argv` gives the same mapping to any command (the tests run the bridge through it).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import io
import os
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

RECIPE_VERSION = 1  # bump when the recipe below (or how it is built) changes

MOUNT_PATH = "/opt/cove/kernel"  # where the venv lives inside a sandbox
LAYER_SUBDIR = "opt/cove/kernel"  # the same, relative to the layer's root
PACKAGES = ("ipykernel", "jupyter_client", "matplotlib", "pandas")  # pandas: DataFrames as data
# TypeScript contexts transpile each cell with the compiler's own JavaScript (one file of its npm
# package), pinned by version and the registry's sha512.
TYPESCRIPT = (
    "5.6.3",
    "https://registry.npmjs.org/typescript/-/typescript-5.6.3.tgz",
    "sha512-hjcS1mhfuyi4WW8IWtjP7brDrG2cuDZukyrYrSauoXGNgx0S7zceP07adYkJycEr56BOUTNPzbInooiN3fn1qw==",
)
TYPESCRIPT_JS = "typescript/typescript.js"  # in the venv's directory

_MAPPING_SCRIPT = r"""
set -e
layer_opt=$1; shift
if [ ! -d /opt/cove/kernel ]; then
    mount -t overlay cove-kernel-opt -o "lowerdir=$layer_opt:/opt" /opt
fi
mount --bind "$layer_opt/cove/kernel" /opt/cove/kernel
exec "$@"
"""


class KernelLayerError(RuntimeError):
    """Building the kernel layer failed (no index reachable, pip error, no namespaces, ...)."""


def python_version(python: str = "/usr/bin/python3") -> str:
    """The full version string of the interpreter the venv is made from (e.g. ``3.11.2``)."""
    out = subprocess.run(
        [python, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3], sys.implementation.name)"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def recipe_digest(python: str = "/usr/bin/python3") -> str:
    """Cache key of the layer: recipe version, interpreter version and package list."""
    key = f"kernel-layer v{RECIPE_VERSION}\n{python_version(python)}\n" + "\n".join(PACKAGES) + TYPESCRIPT[2]
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def mapped_argv(root: Path, argv: list[str]) -> list[str]:
    """``argv`` run in a private mount namespace where ``root/opt/cove/kernel`` is ``/opt/cove/kernel``.

    Needs CAP_SYS_ADMIN (the node runs as root). Nothing is created or mounted in the host's view.
    """
    layer_opt = str(Path(root).resolve() / "opt")
    if any(c in layer_opt for c in ":,\\\n"):
        raise KernelLayerError(f"layer path {layer_opt!r} cannot be used as an overlay lower dir")
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "/bin/sh",
        "-c",
        _MAPPING_SCRIPT,
        "cove-kernel-map",
        layer_opt,
        *argv,
    ]


def _run_mapped(root: Path, shell: str, timeout: float) -> None:
    argv = mapped_argv(root, ["/bin/sh", "-c", shell])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise KernelLayerError(f"kernel layer build step failed ({proc.returncode}): {shell}\n{tail}")


def fill_kernel_layer(root: Path, python: str = "/usr/bin/python3", timeout: float = 1800) -> None:
    """Populate the empty layer dir ``root`` with the kernel venv at ``root/opt/cove/kernel``.

    Packages come from the index pip is configured with (PyPI by default). Raises
    :class:`KernelLayerError` on failure, leaving ``root/opt`` removed.
    """
    root = Path(root)
    venv_dir = root / LAYER_SUBDIR
    venv_dir.mkdir(parents=True, exist_ok=False)
    os.chmod(root / "opt", 0o755)
    os.chmod(root / "opt/cove", 0o755)
    os.chmod(venv_dir, 0o755)
    venv = shlex.quote(MOUNT_PATH)
    steps = [
        f"{shlex.quote(python)} -m venv {venv}",
        f"{venv}/bin/python -m pip install --no-input --disable-pip-version-check "
        + " ".join(shlex.quote(p) for p in PACKAGES),
        # Compile everything now: inside a sandbox the layer is read-only to the kernel.
        f"{venv}/bin/python -m compileall -q -j0 {venv}/lib >/dev/null || true",
    ]
    try:
        start = time.monotonic()
        for step in steps:
            _run_mapped(root, step, timeout=max(60.0, timeout - (time.monotonic() - start)))
        # Check that the result imports where it will run.
        _run_mapped(
            root,
            f"cd / && {venv}/bin/python -c 'import ipykernel, jupyter_client, matplotlib, matplotlib_inline'",
            timeout=120,
        )
        fetch_typescript(venv_dir / TYPESCRIPT_JS, timeout=300)
    except BaseException:
        shutil.rmtree(root / "opt", ignore_errors=True)
        raise
    # Drop pip's caches/temp files if any landed inside the tree.
    for junk in (venv_dir / "share/man",):
        shutil.rmtree(junk, ignore_errors=True)


def fetch_typescript(dest: Path, timeout: float) -> None:
    """The TypeScript compiler (`lib/typescript.js` of its pinned npm tarball) at `dest`."""
    version, url, integrity = TYPESCRIPT
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            data = r.read(64 << 20)
    except OSError as e:
        raise KernelLayerError(f"downloading TypeScript {version} from {url} failed: {e}") from e
    algo, _, want = integrity.partition("-")
    if base64.b64encode(hashlib.new(algo, data).digest()).decode() != want:
        raise KernelLayerError(f"TypeScript {version} from {url} does not match its {algo} digest")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        member = tar.extractfile("package/lib/typescript.js")
        if member is None:
            raise KernelLayerError(f"TypeScript {version}'s package has no lib/typescript.js")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(member.read())
    os.chmod(dest.parent, 0o755)
    os.chmod(dest, 0o644)


def tree_size(path: Path) -> int:
    """Bytes used by the files under ``path`` (symlinks not followed)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def build_cached(cache_root: Path, python: str = "/usr/bin/python3") -> Path:
    """The layer root for this recipe under ``cache_root/<recipe_digest>``, built once if missing."""
    cache_root = Path(cache_root)
    cache_root.mkdir(parents=True, exist_ok=True)
    final = cache_root / recipe_digest(python)
    if (final / LAYER_SUBDIR / "bin/python").exists():
        return final
    with open(cache_root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; the others then find it done
        if (final / LAYER_SUBDIR / "bin/python").exists():
            return final
        scratch = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_root))
        try:
            os.chmod(scratch, 0o755)
            fill_kernel_layer(scratch, python)
            if final.exists():  # a half-made leftover without bin/python
                shutil.rmtree(final)
            os.rename(scratch, final)
        finally:
            if scratch.exists():
                shutil.rmtree(scratch, ignore_errors=True)
    return final
