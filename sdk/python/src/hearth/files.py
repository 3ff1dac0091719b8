"""``sandbox.files``: the microVM's filesystem, through the endpoint's agent
API (``PUT``/``GET /.hearth/v1/files`` stream the content, ``GET
/.hearth/v1/ls`` lists a directory). Paths are absolute; files are read and
written as root.
"""

from __future__ import annotations

import datetime as _dt
import posixpath
from dataclasses import dataclass
from typing import IO, Iterator, List, Optional, Union

from . import exceptions

#: The agent API's entry types, as E2B names them.
_TYPES = {"file": "file", "directory": "dir", "symlink": "symlink", "other": "other"}


@dataclass
class EntryInfo:
    """One entry of a directory listing. ``type`` is ``"file"``, ``"dir"``,
    ``"symlink"`` or ``"other"``; ``mode`` the permission bits."""

    name: str
    path: str
    type: str
    size: int
    mode: int
    modified_time: _dt.datetime


@dataclass
class WriteInfo:
    """What :meth:`Filesystem.write` wrote."""

    name: str
    path: str
    size: int
    type: str = "file"


def _absolute(path: str) -> str:
    if not path.startswith("/"):
        raise exceptions.ValidationError(f"path must be absolute: {path!r}")
    return path


class Filesystem:
    """Files of one microVM (``sandbox.files``)."""

    def __init__(self, sandbox):
        self._sandbox = sandbox

    def write(self, path: str, data: Union[str, bytes, IO[bytes]], *, mode: Optional[int] = None) -> WriteInfo:
        """Writes ``data`` (text as UTF-8, bytes, or a binary file object,
        streamed) to ``path``, creating missing parent directories and
        replacing an existing file. ``mode``: permission bits (default 0644)."""
        path = _absolute(path)
        if isinstance(data, str):
            data = data.encode()
        params = {"path": path}
        if mode is not None:
            params["mode"] = format(mode, "o")
        response = self._sandbox._agent_request("PUT", "/.hearth/v1/files", params=params, data=data)
        written = response.json().get("bytes", 0)
        return WriteInfo(name=posixpath.basename(path), path=path, size=written)

    def read(self, path: str, format: str = "text") -> Union[str, bytes, Iterator[bytes]]:  # noqa: A002 - E2B's name
        """Reads a file: ``format="text"`` (UTF-8) returns ``str``, ``"bytes"``
        returns ``bytes``, ``"stream"`` an iterator of byte chunks (for large
        files). A missing file raises :class:`hearth.NotFoundError`."""
        if format not in ("text", "bytes", "stream"):
            raise exceptions.ValidationError(f"format must be text, bytes or stream, not {format!r}")
        response = self._sandbox._agent_request("GET", "/.hearth/v1/files", params={"path": _absolute(path)},
                                                stream=format == "stream")
        if format == "stream":
            return response.iter_content(chunk_size=256 * 1024)
        return response.content.decode() if format == "text" else response.content

    def list(self, path: str) -> List[EntryInfo]:
        """The entries of a directory (not recursive), sorted by name. A
        missing directory raises :class:`hearth.NotFoundError`."""
        path = _absolute(path)
        response = self._sandbox._agent_request("GET", "/.hearth/v1/ls", params={"path": path})
        entries = []
        for entry in response.json().get("entries", []):
            entries.append(EntryInfo(
                name=entry["name"],
                path=posixpath.join(path, entry["name"]),
                type=_TYPES.get(entry.get("type"), "other"),
                size=int(entry.get("size", 0)),
                mode=int(entry.get("mode", "0"), 8),
                modified_time=_dt.datetime.fromtimestamp(float(entry.get("modifiedAt", 0)), _dt.timezone.utc),
            ))
        return sorted(entries, key=lambda e: e.name)

    def exists(self, path: str) -> bool:
        """Whether ``path`` exists (a dangling symlink counts)."""
        return self._sandbox._exec_status(["/bin/sh", "-c", 'test -e "$1" || test -L "$1"', "sh",
                                           _absolute(path)]) == 0

    def make_dir(self, path: str) -> bool:
        """Creates a directory and its parents; returns False when it already
        existed."""
        status = self._sandbox._exec_status(["/bin/sh", "-c", 'test -d "$1" && exit 3; mkdir -p -- "$1"', "sh",
                                             _absolute(path)])
        if status not in (0, 3):
            raise exceptions.HearthError(f"cannot create {path}")
        return status == 0

    def remove(self, path: str) -> None:
        """Removes a file or a directory with everything in it."""
        if self._sandbox._exec_status(["rm", "-rf", "--", _absolute(path)]) != 0:
            raise exceptions.HearthError(f"cannot remove {path}")

    def rename(self, old_path: str, new_path: str) -> EntryInfo:
        """Moves ``old_path`` to ``new_path``; returns the new entry."""
        if self._sandbox._exec_status(["mv", "--", _absolute(old_path), _absolute(new_path)]) != 0:
            raise exceptions.NotFoundError(f"cannot move {old_path} to {new_path}")
        parent, name = posixpath.split(new_path.rstrip("/"))
        for entry in self.list(parent or "/"):
            if entry.name == name:
                return entry
        raise exceptions.NotFoundError(f"{new_path} vanished after the move")
