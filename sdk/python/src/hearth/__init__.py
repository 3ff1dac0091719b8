"""hearth: E2B-style sandboxes on hearth, a self-hosted AWS Lambda MicroVMs.

    import hearth

    hearth.Image.build("./app", "web")
    with hearth.Sandbox.create("web") as sandbox:
        print(sandbox.commands.run("echo hi").stdout)
        sandbox.files.write("/tmp/x", "data")
        print(sandbox.http().get("/").text)

Built on boto3's ``lambda-microvms`` client: credentials, region and endpoint
come from the usual AWS sources, the endpoint also from ``HEARTH_ENDPOINT_URL``.
"""

from ._connection import Connection
from .commands import CommandHandle, CommandResult, Commands
from .exceptions import (
    AccessDeniedError,
    ApiError,
    BuildError,
    CommandExitError,
    CommandTimeoutError,
    ConflictError,
    ConnectionError,
    HearthError,
    NotFoundError,
    QuotaExceededError,
    SandboxError,
    ServerError,
    ThrottlingError,
    ValidationError,
)
from .files import EntryInfo, Filesystem, WriteInfo
from .image import Image
from .sandbox import LogEvent, Sandbox, SandboxInfo
from .usage import UsageItem, UsageReport, usage

__version__ = "0.1.0"

__all__ = [
    "AccessDeniedError", "ApiError", "BuildError", "CommandExitError", "CommandHandle", "CommandResult",
    "CommandTimeoutError", "Commands", "ConflictError", "Connection", "ConnectionError", "EntryInfo",
    "Filesystem", "HearthError", "Image", "LogEvent", "NotFoundError", "QuotaExceededError", "Sandbox",
    "SandboxError", "SandboxInfo", "ServerError", "ThrottlingError", "UsageItem", "UsageReport",
    "ValidationError", "WriteInfo", "usage",
]
