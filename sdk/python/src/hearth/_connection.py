"""The API connection every object of the SDK shares: a boto3
``lambda-microvms`` client (credentials, region and endpoint from the usual
AWS sources), hearth's SigV4-signed extension routes, and the S3 client of the
built-in artifact store."""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import boto3
import botocore.auth
import botocore.awsrequest
import botocore.config
import botocore.exceptions
import requests

from . import exceptions

#: Region used when neither the argument nor the AWS configuration names one
#: (``hearth serve``'s default region).
DEFAULT_REGION = "us-east-1"
#: Seconds a single API request may take.
HTTP_TIMEOUT = 60


class Connection:
    """Resolves where and as whom to call.

    Endpoint: ``endpoint_url``, else ``HEARTH_ENDPOINT_URL``, else what boto3
    reads itself (``AWS_ENDPOINT_URL_LAMBDA_MICROVMS``, ``AWS_ENDPOINT_URL``,
    ``endpoint_url`` in the profile). Region: ``region``, else the AWS
    configuration (``AWS_REGION``, ``AWS_DEFAULT_REGION``, the profile), else
    ``us-east-1``. Credentials: boto3's chain (environment, profile, ...), or
    those of an explicit ``session``.
    """

    def __init__(self, endpoint_url: Optional[str] = None, region: Optional[str] = None,
                 session: Optional[boto3.session.Session] = None):
        self.session = session or boto3.session.Session()
        endpoint_url = endpoint_url or os.environ.get("HEARTH_ENDPOINT_URL") or None
        # botocore reads AWS_DEFAULT_REGION and the profile; AWS_REGION is what
        # the other AWS SDKs read.
        region = region or self.session.region_name or os.environ.get("AWS_REGION") or DEFAULT_REGION
        config = botocore.config.Config(retries={"mode": "standard", "max_attempts": 5})
        self.client = self.session.client("lambda-microvms", endpoint_url=endpoint_url, region_name=region,
                                          config=config)
        self.endpoint_url = self.client.meta.endpoint_url.rstrip("/")
        self.region = self.client.meta.region_name
        self._http = requests.Session()

    def __repr__(self) -> str:
        return f"Connection(endpoint_url={self.endpoint_url!r}, region={self.region!r})"

    def call(self, operation: str, **params: Any) -> Dict[str, Any]:
        """Calls an API operation by its boto3 method name; errors become
        typed :mod:`hearth.exceptions`."""
        method = getattr(self.client, operation)
        try:
            return method(**params)
        except botocore.exceptions.ClientError as err:
            raise exceptions.from_client_error(err) from err
        except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectionClosedError) as err:
            raise exceptions.ConnectionError(f"cannot reach {self.endpoint_url}") from err
        except botocore.exceptions.NoCredentialsError as err:
            raise exceptions.HearthError("no AWS credentials: set AWS_ACCESS_KEY_ID and "
                                         "AWS_SECRET_ACCESS_KEY or a profile") from err

    def paginate(self, operation: str, key: str = "items", **params: Any):
        """Every item of a paginated list operation."""
        while True:
            page = self.call(operation, **params)
            yield from page.get(key, [])
            token = page.get("nextToken")
            if not token:
                return
            params["nextToken"] = token

    def credentials(self):
        credentials = self.session.get_credentials()
        if credentials is None:
            raise exceptions.HearthError("no AWS credentials: set AWS_ACCESS_KEY_ID and "
                                         "AWS_SECRET_ACCESS_KEY or a profile")
        return credentials.get_frozen_credentials()

    def signed(self, method: str, path: str, params: Optional[Dict[str, Any]] = None,
               timeout: float = HTTP_TIMEOUT) -> Dict[str, Any]:
        """Calls one of hearth's extension routes (``/hearth/...``), signed
        with SigV4 for service ``lambda`` like the API; returns its JSON."""
        query = {k: str(v) for k, v in (params or {}).items() if v is not None}
        prepared = requests.Request(method, self.endpoint_url + path, params=query).prepare()
        request = botocore.awsrequest.AWSRequest(method=method, url=prepared.url, data=b"")
        botocore.auth.SigV4Auth(self.credentials(), "lambda", self.region).add_auth(request)
        try:
            response = self._http.request(method, prepared.url, headers=dict(request.headers.items()),
                                          timeout=timeout)
        except requests.ConnectionError as err:
            raise exceptions.ConnectionError(f"cannot reach {self.endpoint_url}") from err
        if response.status_code >= 400:
            raise exceptions.from_response(response)
        return response.json()

    def s3(self):
        """An S3 client for the server's built-in artifact store (same
        endpoint and keys; path-style addressing, as the store needs where
        ``<bucket>.localhost`` does not resolve)."""
        config = botocore.config.Config(s3={"addressing_style": "path"}, retries={"mode": "standard"})
        return self.session.client("s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config)
