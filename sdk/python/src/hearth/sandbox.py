"""``hearth.Sandbox``: one microVM, E2B-style."""

from __future__ import annotations

import datetime as _dt
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import boto3
import requests

from . import exceptions
from ._connection import Connection
from ._endpoint import EndpointSession, TokenSource, new_session
from .commands import CommandHandle, Commands
from .files import Filesystem

#: The ingress connectors a sandbox is run with: the endpoint for the app
#: (HTTP_INGRESS) and the shell, which also authorises the agent API that
#: commands and files use (SHELL_INGRESS).
INGRESS = ("HTTP_INGRESS", "SHELL_INGRESS")
#: The app port the endpoint forwards to when a request names none.
DEFAULT_PORT = 8080
#: How long create/connect/suspend/resume wait for the state they need.
WAIT_TIMEOUT = 180.0
#: What ``idle_timeout`` leaves a suspended sandbox before it is terminated:
#: it may stay suspended until its maximum duration ends it.
SUSPENDED_FOREVER = 28_800


def connector_arn(region: str, name: str) -> str:
    """The ARN of a managed network connector (``HTTP_INGRESS``, ...)."""
    return f"arn:aws:lambda:{region}:aws:network-connector:aws-network-connector:{name}"


@dataclass
class SandboxInfo:
    """A microVM as ListMicrovms/GetMicrovm describe it."""

    sandbox_id: str
    state: str
    image_arn: str
    image_version: str
    started_at: Optional[_dt.datetime]
    endpoint: Optional[str] = None
    state_reason: Optional[str] = None

    @classmethod
    def of(cls, item: Dict[str, Any]) -> "SandboxInfo":
        return cls(sandbox_id=item["microvmId"], state=item["state"], image_arn=item.get("imageArn", ""),
                   image_version=item.get("imageVersion", ""), started_at=item.get("startedAt"),
                   endpoint=item.get("endpoint"), state_reason=item.get("stateReason"))


@dataclass
class LogEvent:
    """One line the app printed: ``stream`` is ``"stdout"`` or ``"stderr"``."""

    timestamp: _dt.datetime
    stream: str
    message: str


def _epoch_ms(value) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.timezone.utc)
        return int(value.timestamp() * 1000)
    return int(value)


class Sandbox:
    """A running microVM of an image, with its commands (:attr:`commands`),
    files (:attr:`files`) and endpoint (:meth:`get_host`, :meth:`get_url`,
    :meth:`http`).

    Make one with :meth:`create` or :meth:`connect`; use it as a context
    manager to terminate it on exit::

        with hearth.Sandbox.create("web") as sandbox:
            print(sandbox.commands.run("uname -a").stdout)
    """

    def __init__(self, connection: Connection, info: Dict[str, Any], envs: Optional[Dict[str, str]] = None):
        self._connection = connection
        self._info = info
        self.id: str = info["microvmId"]
        #: Default environment of :meth:`Commands.run` (per-call ``envs`` win).
        self.envs: Dict[str, str] = dict(envs or {})
        #: Scheme of the endpoint (``http``; ``https`` for a server with
        #: ``--endpoint-tls-listen`` whose endpoint URLs you pass yourself).
        self.endpoint_scheme = "http"
        self.commands = Commands(self)
        self.files = Filesystem(self)
        self._shell_token = TokenSource(self._mint_shell_token)
        self._app_tokens: Dict[int, TokenSource] = {}
        self._agent = new_session()

    def __repr__(self) -> str:
        return f"Sandbox(id={self.id!r}, endpoint={self.endpoint!r})"

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()

    # ------------------------------------------------------------ lifecycle

    @classmethod
    def create(cls, image: str, *, memory: Optional[int] = None, timeout: Optional[int] = None,
               idle_timeout: Optional[int] = None, envs: Optional[Dict[str, str]] = None,
               endpoint_url: Optional[str] = None, region: Optional[str] = None, version: Optional[str] = None,
               auto_resume: bool = True, session: Optional[boto3.session.Session] = None,
               wait_timeout: float = WAIT_TIMEOUT) -> "Sandbox":
        """Runs a microVM of ``image`` (a name or ARN; ``version`` picks a
        version, default the latest) and waits until it is RUNNING.

        - ``timeout``: the microVM's maximum lifetime in seconds
          (``maximumDurationInSeconds``, 1-28,800, suspended time included;
          default the server's, 28,800). It cannot be changed later.
        - ``idle_timeout``: suspend after this many seconds (at least 60)
          without endpoint traffic; with ``auto_resume`` a request to the
          endpoint (or any SDK call through it) wakes it again.
        - ``memory``: MiB. Memory belongs to the image in Lambda MicroVMs
          (``Image.build(memory=...)``), not to a run: the value is checked
          against the image version's and a larger one raises
          :class:`hearth.ValidationError`.
        - ``envs``: the default environment of :meth:`Commands.run` in this
          sandbox. The app's environment is the image's
          (``Image.build(envs=...)``) and is not changed.
        - ``endpoint_url``, ``region``, ``session``: see
          :class:`hearth.Connection` (default: ``HEARTH_ENDPOINT_URL``, then
          boto3's own ``AWS_ENDPOINT_URL_LAMBDA_MICROVMS``/``AWS_ENDPOINT_URL``).
        """
        connection = Connection(endpoint_url, region, session)
        if memory is not None:
            cls._check_memory(connection, image, version, memory)
        params: Dict[str, Any] = {
            "imageIdentifier": image,
            "ingressNetworkConnectors": [connector_arn(connection.region, name) for name in INGRESS],
        }
        if version is not None:
            params["imageVersion"] = version
        if timeout is not None:
            params["maximumDurationInSeconds"] = int(timeout)
        if idle_timeout is not None:
            params["idlePolicy"] = {"maxIdleDurationSeconds": int(idle_timeout),
                                    "suspendedDurationSeconds": SUSPENDED_FOREVER,
                                    "autoResumeEnabled": auto_resume}
        info = connection.call("run_microvm", **params)
        sandbox = cls(connection, info, envs)
        try:
            sandbox._wait_for("RUNNING", wait_timeout)
        except BaseException:
            sandbox.kill()
            raise
        return sandbox

    @staticmethod
    def _check_memory(connection: Connection, image: str, version: Optional[str], memory: int) -> None:
        if version is None:
            version = connection.call("get_microvm_image", imageIdentifier=image).get("latestActiveImageVersion")
        if version is None:
            return
        described = connection.call("get_microvm_image_version", imageIdentifier=image, imageVersion=version)
        sizes = [r.get("minimumMemoryInMiB") for r in described.get("resources", []) if r.get("minimumMemoryInMiB")]
        if sizes and memory > max(sizes):
            raise exceptions.ValidationError(
                f"image {image} version {version} gives its microVMs {max(sizes)} MiB; memory is set per image "
                f"(Image.build(..., memory={memory})), not per sandbox")

    @classmethod
    def connect(cls, sandbox_id: str, *, endpoint_url: Optional[str] = None, region: Optional[str] = None,
                envs: Optional[Dict[str, str]] = None, session: Optional[boto3.session.Session] = None,
                wait_timeout: float = WAIT_TIMEOUT) -> "Sandbox":
        """A :class:`Sandbox` for an existing microVM; a suspended one is
        resumed (as E2B's ``connect``). A terminated one raises
        :class:`hearth.SandboxError`, an unknown id :class:`hearth.NotFoundError`."""
        connection = Connection(endpoint_url, region, session)
        info = connection.call("get_microvm", microvmIdentifier=sandbox_id)
        sandbox = cls(connection, info, envs)
        if info["state"] in ("SUSPENDING", "SUSPENDED"):
            sandbox._wait_for("SUSPENDED", wait_timeout)
            sandbox.resume(wait_timeout=wait_timeout)
        else:
            sandbox._wait_for("RUNNING", wait_timeout)
        return sandbox

    @classmethod
    def list(cls, *, image: Optional[str] = None, include_terminated: bool = False,
             endpoint_url: Optional[str] = None, region: Optional[str] = None,
             session: Optional[boto3.session.Session] = None) -> List[SandboxInfo]:
        """The account's microVMs (of ``image`` when given), without the
        terminated ones unless ``include_terminated``."""
        connection = Connection(endpoint_url, region, session)
        params = {"imageIdentifier": image} if image else {}
        return [SandboxInfo.of(item) for item in connection.paginate("list_microvms", **params)
                if include_terminated or item["state"] not in ("TERMINATING", "TERMINATED")]

    def get_info(self) -> SandboxInfo:
        """The microVM as GetMicrovm describes it now."""
        self._info = self._connection.call("get_microvm", microvmIdentifier=self.id)
        return SandboxInfo.of(self._info)

    def is_running(self) -> bool:
        """Whether the microVM is RUNNING."""
        return self.get_info().state == "RUNNING"

    def suspend(self, *, wait: bool = True, wait_timeout: float = WAIT_TIMEOUT) -> None:
        """Suspends the microVM (memory and disk kept, nothing runs); with
        ``wait``, returns once it is SUSPENDED."""
        self._connection.call("suspend_microvm", microvmIdentifier=self.id)
        if wait:
            self._wait_for("SUSPENDED", wait_timeout)

    def resume(self, *, wait: bool = True, wait_timeout: float = WAIT_TIMEOUT) -> None:
        """Resumes a suspended microVM where it stopped; with ``wait``,
        returns once it is RUNNING."""
        self._connection.call("resume_microvm", microvmIdentifier=self.id)
        if wait:
            self._wait_for("RUNNING", wait_timeout)

    def kill(self) -> bool:
        """Terminates the microVM; returns False when it was already gone."""
        try:
            self._connection.call("terminate_microvm", microvmIdentifier=self.id)
        except (exceptions.NotFoundError, exceptions.ConflictError):
            return False
        return True

    def _wait_for(self, wanted: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            state = self.get_info().state
            if state == wanted:
                return
            if state in ("TERMINATING", "TERMINATED") and wanted not in ("TERMINATING", "TERMINATED"):
                reason = self._info.get("stateReason")
                raise exceptions.SandboxError(f"microVM {self.id} is {state}" + (f": {reason}" if reason else ""),
                                              state=state, state_reason=reason)
            if time.monotonic() > deadline:
                raise exceptions.SandboxError(f"microVM {self.id} is still {state}, not {wanted}, after {timeout} s",
                                              state=state, state_reason=self._info.get("stateReason"))
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    # ------------------------------------------------------------ endpoint

    @property
    def endpoint(self) -> str:
        """The microVM's endpoint host, ``<id>.localhost:PORT`` on a local
        server (GetMicrovm's ``endpoint``)."""
        return self._info["endpoint"]

    def get_host(self, port: int = DEFAULT_PORT) -> str:
        """The host to reach ``port`` of the microVM at. Unlike E2B, hearth has
        one host per microVM for every port: the port travels in the
        ``X-aws-proxy-port`` header (see :meth:`auth_headers`)."""
        _check_port(port)
        return self.endpoint

    def get_url(self, port: int = DEFAULT_PORT) -> str:
        """``http://<id>.localhost:PORT``: the endpoint's URL, which curl and
        browsers resolve to this machine. A request needs a token
        (:meth:`auth_headers`, or :meth:`http`, which adds it), and for a port
        other than 8080 the ``X-aws-proxy-port`` header. Python's own resolver
        does not resolve ``*.localhost``: use :meth:`http`."""
        _check_port(port)
        return f"{self.endpoint_scheme}://{self.endpoint}"

    def auth_headers(self, port: int = DEFAULT_PORT) -> Dict[str, str]:
        """Headers that open ``port`` of the endpoint: a token for that port
        (valid for an hour, minted once and renewed when near its end) and the
        port."""
        return {"X-aws-proxy-auth": self._app_token(port)(), "X-aws-proxy-port": str(port)}

    def http(self, port: int = DEFAULT_PORT) -> EndpointSession:
        """A ``requests.Session`` for ``port`` of the app: relative URLs go to
        the endpoint, each request carries the token and the port::

            sandbox.http().get("/health").raise_for_status()
        """
        _check_port(port)
        return EndpointSession(self.get_url(port), port, self._app_token(port))

    def _app_token(self, port: int) -> TokenSource:
        if port not in self._app_tokens:
            def mint(minutes: int) -> str:
                out = self._connection.call("create_microvm_auth_token", microvmIdentifier=self.id,
                                            expirationInMinutes=minutes, allowedPorts=[{"port": port}])
                return out["authToken"]["X-aws-proxy-auth"]
            self._app_tokens[port] = TokenSource(mint)
        return self._app_tokens[port]

    def _mint_shell_token(self, minutes: int) -> str:
        out = self._connection.call("create_microvm_shell_auth_token", microvmIdentifier=self.id,
                                    expirationInMinutes=minutes)
        return out["authToken"]["X-aws-proxy-auth"]

    def _agent_request(self, method: str, path: str, *, read_timeout: float = 120.0, **kwargs) -> requests.Response:
        """A request to the endpoint's agent API with the shell token;
        errors become typed exceptions."""
        url = f"{self.endpoint_scheme}://{self.endpoint}{path}"
        headers = {"X-aws-proxy-auth": self._shell_token()}
        try:
            response = self._agent.request(method, url, headers=headers, timeout=(30, read_timeout), **kwargs)
        except requests.ConnectionError as err:
            raise exceptions.ConnectionError(f"cannot reach the endpoint {self.endpoint}") from err
        if response.status_code >= 400:
            error = exceptions.from_response(response)
            response.close()
            raise error
        return response

    def _exec_status(self, argv: List[str]) -> int:
        """Runs argv and returns its exit status (output discarded)."""
        response = self._agent_request("POST", "/.hearth/v1/exec", json={"argv": argv, "timeoutInSeconds": 60},
                                       stream=True)
        try:
            return CommandHandle(response, None, None).wait().exit_code
        except exceptions.CommandExitError as err:
            return err.exit_code

    # ------------------------------------------------------------ logs

    def logs(self, *, since=None) -> List[LogEvent]:
        """What the app (the image's command) printed on stdout and stderr,
        oldest first; ``since`` (a datetime or epoch milliseconds) skips
        older lines. Read from the server's log store, so it covers time the
        sandbox spent suspended and works after it terminated."""
        return list(self.iter_logs(since=since))

    def iter_logs(self, *, since=None):
        """:meth:`logs` one event at a time, fetching page after page."""
        offset = None
        while True:
            page = self._connection.signed("GET", f"/hearth/2025-09-09/microvms/{self.id}/logs",
                                           {"since": _epoch_ms(since), "offset": offset, "follow": "false"})
            events = page.get("events", [])
            for event in events:
                stamp = event.get("timestamp")
                if isinstance(stamp, (int, float)):
                    stamp = _dt.datetime.fromtimestamp(stamp / 1000, _dt.timezone.utc)
                elif isinstance(stamp, str):
                    stamp = _dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
                yield LogEvent(timestamp=stamp, stream=event.get("stream", "stdout"),
                               message=event.get("message", ""))
            next_offset = page.get("nextOffset")
            if not events or next_offset is None or next_offset == offset:
                return
            offset = next_offset


def _check_port(port: int) -> None:
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise exceptions.ValidationError(f"port must be 1-65535, not {port!r}")
