"""``hearth.Image``: images built from a Dockerfile in a local directory, as
``hearth image build`` does: the directory is zipped (minus what
``.dockerignore`` excludes), uploaded to the server's built-in S3 store, and
built by CreateMicrovmImage (UpdateMicrovmImage when the image exists, which
makes a new version) while its build log streams."""

from __future__ import annotations

import base64
import fnmatch
import io
import json
import os
import pathlib
import stat
import sys
import time
import zipfile
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import boto3
import botocore.exceptions

from . import exceptions
from ._connection import Connection

#: The build role recorded with a version when none is given (hearth does not
#: assume roles; the reference requires the field).
DEFAULT_BUILD_ROLE = "arn:aws:iam::000000000000:role/hearth-build"
#: Largest build context zipped (the server's artifact limit).
MAX_CONTEXT_BYTES = 1 << 30
#: Between two reads of a build log that had nothing new.
POLL = 0.5
#: Zip entries get this timestamp, so an unchanged directory zips the same.
ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def _stderr(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


# ------------------------------------------------------------------ .dockerignore


def _clean(path: str) -> str:
    return "/".join(c for c in path.split("/") if c and c != ".")


def _component_glob(pattern: str, name: str) -> bool:
    """``*``, ``?``, ``[...]`` (``[^...]`` negated) and ``\\`` escapes within
    one path component, as Docker's (Go's filepath.Match)."""
    translated, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            translated.append("[" + pattern[i + 1] + "]")
            i += 2
            continue
        if c == "[" and pattern[i + 1:i + 2] == "^":
            translated.append("[!")
            i += 2
            continue
        translated.append(c)
        i += 1
    return fnmatch.fnmatchcase(name, "".join(translated))


def _match_components(pattern: Sequence[str], path: Sequence[str]) -> bool:
    """Whether the pattern's components match the path's; ``**`` matches zero
    or more components (dynamic programming, as the server's matcher)."""
    n = len(path)
    following = [False] * (n + 1)
    following[n] = True
    for p in reversed(pattern):
        current = [False] * (n + 1)
        for j in range(n, -1, -1):
            if p == "**":
                current[j] = following[j] or (j < n and current[j + 1])
            else:
                current[j] = j < n and following[j + 1] and _component_glob(p, path[j])
        following = current
    return following[0]


def ignored(path: str, patterns: Iterable[str]) -> bool:
    """Whether ``.dockerignore`` ``patterns`` exclude the context path
    ``path``: the last matching pattern wins, ``!`` re-includes, a pattern
    matching a directory excludes what is below it (the same rules as the
    server's build context and ``hearth image build``)."""
    components = _clean(path).split("/")
    result = False
    for raw in patterns:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = _clean(line[1:].strip() if negate else line)
        if not pattern:
            continue
        if _match_components(pattern.split("/") + ["**"], components):
            result = not negate
    return result


def zip_context(context: Union[str, os.PathLike], dockerfile: Optional[Union[str, os.PathLike]] = None) -> bytes:
    """Zips the directory ``context`` with ``dockerfile`` (default
    ``context/Dockerfile``) as ``Dockerfile`` at the root, leaving out what
    ``.dockerignore`` excludes, symlinks and special files."""
    root = pathlib.Path(context)
    dockerfile = pathlib.Path(dockerfile) if dockerfile else root / "Dockerfile"
    ignore_file = root / ".dockerignore"
    patterns = ignore_file.read_text().splitlines() if ignore_file.is_file() else []
    buffer = io.BytesIO()
    total = 0
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        def add(name: str, data: bytes, mode: int) -> None:
            info = zipfile.ZipInfo(name, ZIP_TIME)
            info.external_attr = mode << 16
            info.compress_type = zipfile.ZIP_DEFLATED if not name.endswith("/") else zipfile.ZIP_STORED
            archive.writestr(info, data)

        text = dockerfile.read_bytes()
        total += len(text)
        add("Dockerfile", text, stat.S_IFREG | 0o644)
        stack = [pathlib.PurePosixPath()]
        while stack:
            relative = stack.pop()
            for entry in sorted(os.scandir(root / relative), key=lambda e: e.name):
                name = str(relative / entry.name)
                if name == "Dockerfile" or ignored(name, patterns):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    add(name + "/", b"", stat.S_IFDIR | 0o755)
                    stack.append(relative / entry.name)
                elif entry.is_file(follow_symlinks=False):
                    size = entry.stat(follow_symlinks=False).st_size
                    total += size
                    if total > MAX_CONTEXT_BYTES:
                        raise exceptions.ValidationError(f"the build context is larger than {MAX_CONTEXT_BYTES} bytes")
                    mode = stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode)
                    add(name, pathlib.Path(entry.path).read_bytes(), stat.S_IFREG | mode)
    return buffer.getvalue()


# ------------------------------------------------------------------ the image


@dataclass
class Image:
    """An image version that finished building."""

    name: str
    version: str
    arn: str
    build_id: Optional[str] = None

    @classmethod
    def build(cls, path: Union[str, os.PathLike], name: str, *, dockerfile: Optional[Union[str, os.PathLike]] = None,
              base: str = "debian-12", memory: int = 512, envs: Optional[Dict[str, str]] = None,
              hooks_port: Optional[int] = None, ready: bool = False, validate: bool = False,
              microvm_hooks: Sequence[str] = (), build_args: Optional[Dict[str, str]] = None, egress: bool = False,
              bucket: Optional[str] = None, build_role: str = DEFAULT_BUILD_ROLE,
              on_log: Optional[Callable[[str], None]] = _stderr, endpoint_url: Optional[str] = None,
              region: Optional[str] = None, session: Optional[boto3.session.Session] = None,
              timeout: float = 7200.0) -> "Image":
        """Builds the Dockerfile of the directory ``path`` into image ``name``
        (a new image, or a new version of an existing one) and returns once
        the version is built; a failed build raises :class:`hearth.BuildError`
        with the build's ``stateReason``.

        - ``dockerfile``: another Dockerfile (default ``path/Dockerfile``);
          ``base``: the managed base image ``FROM public.ecr.aws/lambda/microvms:*``
          means (``baseImageArn``).
        - ``memory``: MiB of every microVM of this version.
        - ``envs``: the app's environment (``environmentVariables``).
        - ``hooks_port`` with ``ready``/``validate``: the image hooks;
          ``microvm_hooks``: runtime hooks to enable (``run``, ``resume``,
          ``suspend``, ``terminate``).
        - ``build_args``: ``ARG`` values for this build only (masked in the log).
        - ``egress``: outbound network for RUN steps (INTERNET_EGRESS).
        - ``bucket``: where the zipped context goes (default
          ``hearth-artifacts-<access key id>``, created when missing).
        - ``on_log``: called with the build log's text as it grows (default:
          written to stderr; ``None`` for quiet).
        """
        connection = Connection(endpoint_url, region, session)
        zipped = zip_context(path, dockerfile)
        if bucket is None:
            bucket = f"hearth-artifacts-{connection.credentials().access_key.lower()}"
        key = f"{name}/{int(time.time() * 1000)}.zip"
        s3 = connection.s3()
        try:
            s3.create_bucket(Bucket=bucket)
        except botocore.exceptions.ClientError as err:
            if err.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise exceptions.from_client_error(err) from err
        try:
            s3.put_object(Bucket=bucket, Key=key, Body=zipped)
        except botocore.exceptions.ClientError as err:
            raise exceptions.from_client_error(err) from err

        params: Dict[str, object] = {
            "baseImageArn": f"arn:aws:lambda:{connection.region}:aws:microvm-image:{base}",
            "buildRoleArn": build_role,
            "codeArtifact": {"uri": f"s3://{bucket}/{key}"},
            "resources": [{"minimumMemoryInMiB": int(memory)}],
        }
        if hooks_port is not None:
            image_hooks = {}
            if ready:
                image_hooks["ready"] = "ENABLED"
            if validate:
                image_hooks["validate"] = "ENABLED"
            hooks: Dict[str, object] = {"port": hooks_port, "microvmImageHooks": image_hooks}
            if microvm_hooks:
                runtime: Dict[str, object] = {}
                for hook in microvm_hooks:
                    runtime[hook] = "ENABLED"
                    runtime[f"{hook}TimeoutInSeconds"] = 5
                hooks["microvmHooks"] = runtime
            params["hooks"] = hooks
        elif ready or validate or microvm_hooks:
            raise exceptions.ValidationError("hooks need hooks_port")
        if envs:
            params["environmentVariables"] = dict(envs)
        if egress:
            params["egressNetworkConnectors"] = [
                f"arn:aws:lambda:{connection.region}:aws:network-connector:aws-network-connector:INTERNET_EGRESS"]

        try:
            connection.call("get_microvm_image", imageIdentifier=name)
            exists = True
        except exceptions.NotFoundError:
            exists = False
        operation = "update_microvm_image" if exists else "create_microvm_image"
        if exists:
            params["imageIdentifier"] = name
        else:
            params["name"] = name
        created = _with_build_args(connection, build_args, lambda: connection.call(operation, **params))
        version = created["imageVersion"]
        return cls._follow(connection, name, version, on_log, timeout)

    @classmethod
    def _follow(cls, connection: Connection, name: str, version: str, on_log, timeout: float) -> "Image":
        deadline = time.monotonic() + timeout
        build_id = None
        while build_id is None:
            builds = list(connection.paginate("list_microvm_image_builds", imageIdentifier=name, imageVersion=version))
            if builds:
                build_id = builds[0]["buildId"]
            elif time.monotonic() > deadline:
                raise exceptions.BuildError(f"{name} version {version} has no build", image=name, version=version,
                                            build_id=None, state_reason=None)
            else:
                time.sleep(POLL)
        log: List[str] = []
        offset = 0
        while True:
            page = connection.signed("GET", f"/hearth/2025-09-09/builds/{build_id}/logs", {"offset": offset})
            text = page.get("log") or ""
            if text:
                log.append(text)
                if on_log is not None:
                    on_log(text)
            next_offset = page.get("nextOffset", offset)
            if page.get("complete", True):
                break
            if time.monotonic() > deadline:
                raise exceptions.BuildError(f"{name} version {version} still building after {timeout} s",
                                            image=name, version=version, build_id=build_id, state_reason=None,
                                            log="".join(log))
            if next_offset == offset:
                time.sleep(POLL)
            offset = next_offset
        build = connection.call("get_microvm_image_build", imageIdentifier=name, imageVersion=version,
                                buildId=build_id)
        if build["buildState"] != "SUCCESSFUL":
            reason = build.get("stateReason")
            raise exceptions.BuildError(f"{name} version {version}: {build['buildState']}: {reason or 'no reason given'}",
                                        image=name, version=version, build_id=build_id, state_reason=reason,
                                        log="".join(log))
        described = connection.call("get_microvm_image_version", imageIdentifier=name, imageVersion=version)
        return cls(name=name, version=version, arn=described["imageArn"], build_id=build_id)

    @staticmethod
    def delete(name: str, *, endpoint_url: Optional[str] = None, region: Optional[str] = None,
               session: Optional[boto3.session.Session] = None) -> None:
        """Deletes the image and its versions."""
        Connection(endpoint_url, region, session).call("delete_microvm_image", imageIdentifier=name)


def _with_build_args(connection: Connection, build_args: Optional[Dict[str, str]], call):
    """Runs ``call`` with the build arguments in hearth's
    ``x-hearth-build-args`` header (base64 of a JSON object)."""
    if not build_args:
        return call()
    value = base64.b64encode(json.dumps(dict(build_args)).encode()).decode()

    def add_header(request, **_):
        request.headers["x-hearth-build-args"] = value

    events = connection.client.meta.events
    events.register_first("before-sign.lambda-microvms.*", add_header)
    try:
        return call()
    finally:
        events.unregister("before-sign.lambda-microvms.*", add_header)
