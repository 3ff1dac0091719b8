"""``sandbox.commands``: run shell commands in the microVM.

Commands go through the endpoint's agent API (``POST /.hearth/v1/exec``,
authorised by a shell token), which streams the output as JSON lines while
the command runs. Closing that request kills the command (its whole process
group), which is what :meth:`CommandHandle.kill` does.
"""

from __future__ import annotations

import base64
import codecs
import json
import threading
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import requests

from . import exceptions
from ._endpoint import abort

#: What ``timeout=0`` means: the longest run the agent API allows.
LONGEST_TIMEOUT = 86_400
#: The agent API's default when no timeout is given.
DEFAULT_TIMEOUT = 300
#: Exit status a shell reports for a process killed by SIGKILL.
KILLED_EXIT_CODE = 128 + 9


@dataclass
class CommandResult:
    """A finished command: all it printed and how it ended. ``exit_code`` is
    128 + the signal number for a command killed by a signal."""

    stdout: str
    stderr: str
    exit_code: int
    signal: Optional[int] = None
    error: Optional[str] = None


class CommandHandle:
    """A command started with ``background=True``: :meth:`wait` for its
    result, :meth:`kill` to end it. Output callbacks run on a reader thread."""

    def __init__(self, response: requests.Response, on_stdout: Optional[Callable[[str], None]],
                 on_stderr: Optional[Callable[[str], None]]):
        self._response = response
        self._on = {"stdout": on_stdout, "stderr": on_stderr}
        self._decoders = {name: codecs.getincrementaldecoder("utf-8")("replace") for name in self._on}
        self._chunks: Dict[str, List[str]] = {"stdout": [], "stderr": []}
        self._end: Optional[dict] = None
        self._failure: Optional[BaseException] = None
        self._killed = False
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._read, name="hearth-command", daemon=True)
        self._thread.start()

    @property
    def stdout(self) -> str:
        """What the command printed on stdout so far."""
        return "".join(self._chunks["stdout"])

    @property
    def stderr(self) -> str:
        """What the command printed on stderr so far."""
        return "".join(self._chunks["stderr"])

    def _emit(self, name: str, data: bytes, final: bool = False) -> None:
        text = self._decoders[name].decode(data, final)
        if not text:
            return
        self._chunks[name].append(text)
        callback = self._on[name]
        if callback is not None:
            callback(text)

    def _read(self) -> None:
        try:
            for raw in self._response.iter_lines(chunk_size=None):
                if not raw:
                    continue
                line = json.loads(raw)
                if "stdout" in line:
                    self._emit("stdout", base64.b64decode(line["stdout"]))
                elif "stderr" in line:
                    self._emit("stderr", base64.b64decode(line["stderr"]))
                else:
                    self._end = line
                    break
        except Exception as err:  # noqa: BLE001 - kept for wait(), which raises it typed
            if not self._killed:
                self._failure = err
        finally:
            for name in self._chunks:
                self._emit(name, b"", final=True)
            self._response.close()
            self._done.set()

    def kill(self) -> bool:
        """Kills the command (SIGKILL to its process group in the guest);
        returns False when it had already ended."""
        with self._lock:
            if self._done.is_set() or self._killed:
                return False
            self._killed = True
        abort(self._response)
        self._done.wait(30)
        return self._end is None

    def wait(self, timeout: Optional[float] = None) -> CommandResult:
        """Waits for the command to end; returns its result, or raises
        :class:`hearth.CommandExitError` for a non-zero exit (after
        :meth:`kill`: exit code 137, signal 9), :class:`hearth.CommandTimeoutError`
        when it outlived its timeout. ``timeout`` bounds this wait only
        (``TimeoutError`` when it passes; the command keeps running)."""
        if not self._done.wait(timeout):
            raise TimeoutError("the command is still running")
        if self._failure is not None:
            raise exceptions.ConnectionError("the command's output stream broke") from self._failure
        end = self._end
        if end is None:
            if self._killed:
                end = {"signal": 9, "timedOut": False}
            else:
                raise exceptions.ConnectionError("the command's output stream ended early")
        if "error" in end:
            raise exceptions.ServerError(f"exec failed: {end['error']}")
        signal = end.get("signal")
        exit_code = end.get("exitCode")
        if exit_code is None:
            exit_code = 128 + signal if signal is not None else -1
        result = CommandResult(stdout=self.stdout, stderr=self.stderr, exit_code=exit_code, signal=signal)
        if end.get("timedOut"):
            raise exceptions.CommandTimeoutError(stdout=result.stdout, stderr=result.stderr,
                                                 exit_code=exit_code, signal=signal, error="timed out")
        if exit_code != 0:
            raise exceptions.CommandExitError(stdout=result.stdout, stderr=result.stderr, exit_code=exit_code,
                                              signal=signal)
        return result


class Commands:
    """Runs commands in one microVM (``sandbox.commands``)."""

    def __init__(self, sandbox):
        self._sandbox = sandbox

    def run(self, cmd: str, *, timeout: Optional[float] = None, cwd: Optional[str] = None,
            envs: Optional[Dict[str, str]] = None, user: Optional[str] = None,
            on_stdout: Optional[Callable[[str], None]] = None, on_stderr: Optional[Callable[[str], None]] = None,
            background: bool = False):
        """Runs ``cmd`` with ``/bin/sh -c`` in the microVM.

        - ``timeout``: seconds before the command is killed (default 300 in
          the foreground and 86,400 in the background; 0 = 86,400, the most
          the agent allows). Past it, :class:`hearth.CommandTimeoutError`.
        - ``cwd``: working directory (default ``/``; ``HOME`` is ``/root``).
        - ``envs``: environment variables, over the sandbox's ``envs``.
        - ``user``: run as this user (through ``runuser -u USER --``, which the
          image must have; Debian's util-linux does). Default: root.
        - ``on_stdout``/``on_stderr``: called with output text as it arrives.
        - ``background``: return a :class:`CommandHandle` at once instead of
          waiting.

        Returns a :class:`CommandResult` (``stdout``, ``stderr``,
        ``exit_code``); a non-zero exit raises :class:`hearth.CommandExitError`
        carrying the same fields.
        """
        argv: List[str] = ["/bin/sh", "-c", cmd]
        if user is not None and user != "root":
            argv = ["runuser", "-u", user, "--", *argv]
        if timeout is None:
            seconds = LONGEST_TIMEOUT if background else DEFAULT_TIMEOUT
        elif timeout == 0:
            seconds = LONGEST_TIMEOUT
        else:
            seconds = max(1, min(LONGEST_TIMEOUT, int(-(-timeout // 1))))
        env = {**self._sandbox.envs, **(envs or {})}
        body = {"argv": argv, "env": env, "timeoutInSeconds": seconds}
        if cwd is not None:
            body["cwd"] = cwd
        response = self._sandbox._agent_request("POST", "/.hearth/v1/exec", json=body, stream=True,
                                                read_timeout=seconds + 60)
        handle = CommandHandle(response, on_stdout, on_stderr)
        return handle if background else handle.wait()
