"""The cove Python SDK.

::

    from cove import Sandbox

    with Sandbox.create(template="base") as sb:
        print(sb.exec("python3 -c 'print(6*7)'").stdout)   # 42
        sb.files.write("/home/user/a.txt", "hello")

:class:`Sandbox` blocks; :class:`AsyncSandbox` is the same API for asyncio. Both read the server
address and key from ``COVE_URL`` (default ``http://127.0.0.1:7770``) and ``COVE_API_KEY`` unless
``url=`` / ``api_key=`` are given.
"""

from cove.sdk._processes import ProcessEvent, ProcessInfo, WatchEvent
from cove.sdk.aio import AsyncFiles, AsyncProcess, AsyncSandbox
from cove.sdk.models import ApiKey, EntryInfo, ExecEvent, ExecResult, Limits, SandboxInfo, SnapshotInfo
from cove.sdk.sync import Files, Process, Sandbox
from cove.sdk.templates import BuildError, Template, TemplateInfo
from cove.sdk.volumes import AsyncVolume, BucketMount, Volume, VolumeInfo, VolumeMount

__all__ = [
    "ApiKey",
    "AsyncFiles",
    "AsyncProcess",
    "AsyncSandbox",
    "AsyncVolume",
    "BucketMount",
    "BuildError",
    "EntryInfo",
    "ExecEvent",
    "ExecResult",
    "Files",
    "Limits",
    "Process",
    "ProcessEvent",
    "ProcessInfo",
    "Sandbox",
    "SandboxInfo",
    "SnapshotInfo",
    "Template",
    "TemplateInfo",
    "Volume",
    "VolumeInfo",
    "VolumeMount",
    "WatchEvent",
]
