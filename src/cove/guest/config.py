"""The sandbox's config (its default env, user and workdir), written by the host to CONFIG_PATH."""

from __future__ import annotations

import os

from . import protocol

CONFIG_PATH = "/run/cove/config.json"
CONFIG: dict = {"env": {}, "user": None, "workdir": None}
CONFIG_FILE = [CONFIG_PATH, None]  # the file read, and its (inode, mtime, size) when read


def load_config(path: str, required: bool) -> None:
    CONFIG_FILE[0] = path
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = protocol.decode_json(f.read())
    except FileNotFoundError:
        if required:
            raise
        return
    CONFIG_FILE[1] = (st.st_ino, st.st_mtime_ns, st.st_size)
    env = data.get("env") or {}
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise ValueError("config env must be an object of strings")
    CONFIG["env"] = env
    CONFIG["user"] = data.get("user")
    CONFIG["workdir"] = data.get("workdir")


def config_replaced() -> bool:
    """Whether the host replaced the config file since it was read (one stat)."""
    try:
        st = os.stat(CONFIG_FILE[0])
    except OSError:
        return False
    return (st.st_ino, st.st_mtime_ns, st.st_size) != CONFIG_FILE[1]
