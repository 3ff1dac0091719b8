"""The caller's metered usage and its cost (hearth's usage extension route)."""

from dataclasses import dataclass
from datetime import datetime
from typing import List, Optional, Union

from ._connection import Connection

Time = Union[datetime, float, int]


@dataclass(frozen=True)
class UsageItem:
    """One microVM's (or image's) usage of one type, priced."""
    usage_type: str
    quantity: float
    unit: str
    cost_usd: float
    microvm_id: Optional[str] = None
    image_arn: Optional[str] = None


@dataclass(frozen=True)
class UsageReport:
    items: List[UsageItem]
    total_cost_usd: float


def _epoch(value: Time) -> float:
    return value.timestamp() if isinstance(value, datetime) else float(value)


def usage(since: Optional[Time] = None, until: Optional[Time] = None,
          connection: Optional[Connection] = None) -> UsageReport:
    """The caller's account's usage in the hours starting in ``[since, until)``
    (``GET /hearth/2025-09-09/usage``): one item per microVM or image and
    usage type, priced by the server's price sheet."""
    connection = connection or Connection()
    params = {}
    if since is not None:
        params["since"] = _epoch(since)
    if until is not None:
        params["until"] = _epoch(until)
    answer = connection.signed("GET", "/hearth/2025-09-09/usage", params)
    items = [UsageItem(usage_type=item["usageType"], quantity=item["quantity"], unit=item["unit"],
                       cost_usd=item["costUsd"], microvm_id=item.get("microvmId"),
                       image_arn=item.get("imageArn"))
             for item in answer.get("items", [])]
    return UsageReport(items=items, total_cost_usd=answer.get("totalCostUsd", 0.0))
