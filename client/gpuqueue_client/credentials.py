"""The token cache: `<config dir>/credentials.json`, one entry per API URL, owner-only.

The config dir is `$GPUQUEUE_CONFIG_DIR`, else `$XDG_CONFIG_HOME/gpuqueue`, else
`~/.config/gpuqueue`. The file is `{api_url: {"token", "username", "expires_at"}}`.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FILE_NAME = "credentials.json"
FILE_MODE = 0o600
DIR_MODE = 0o700


@dataclass(frozen=True)
class Credentials:
    token: str
    username: str | None
    expires_at: float | None  # epoch seconds; None when the API did not say

    def expired(self, now: float | None = None) -> bool:
        if self.expires_at is None:
            return False
        return (time.time() if now is None else now) >= self.expires_at


def config_dir() -> Path:
    explicit = os.environ.get("GPUQUEUE_CONFIG_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".config"
    return base / "gpuqueue"


def credentials_path() -> Path:
    return config_dir() / FILE_NAME


def _key(api_url: str) -> str:
    return api_url.rstrip("/")


def _read_all(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}  # a damaged cache is as good as none: the next login rewrites it
    return data if isinstance(data, dict) else {}


def load(api_url: str) -> Credentials | None:
    """The cached credentials for this API URL, or None."""
    entry = _read_all(credentials_path()).get(_key(api_url))
    if not isinstance(entry, dict):
        return None
    token = entry.get("token")
    if not isinstance(token, str) or not token:
        return None
    username = entry.get("username")
    expires_at = entry.get("expires_at")
    return Credentials(
        token=token,
        username=username if isinstance(username, str) else None,
        expires_at=float(expires_at) if isinstance(expires_at, int | float) else None,
    )


def save(api_url: str, token: str, username: str | None, expires_at: float | None) -> Path:
    """Store (replace) this API URL's credentials; returns the file's path."""
    path = credentials_path()
    data = _read_all(path)
    data[_key(api_url)] = {"token": token, "username": username, "expires_at": expires_at}
    _write(path, data)
    return path


def delete(api_url: str) -> bool:
    """Forget this API URL's credentials; True when there were some."""
    path = credentials_path()
    data = _read_all(path)
    if data.pop(_key(api_url), None) is None:
        return False
    _write(path, data)
    return True


def _write(path: Path, data: dict[str, Any]) -> None:
    directory = path.parent
    directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    os.chmod(directory, DIR_MODE)
    # Write a sibling created owner-only (never world-readable, not even for an instant),
    # then swap it in atomically.
    tmp = directory / f".{path.name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), FILE_MODE)  # a leftover tmp keeps its old mode
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    os.chmod(path, FILE_MODE)
