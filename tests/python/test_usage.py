"""Usage metering and the tenant's cost report through a real `hearth serve`:
`GET /hearth/2025-09-09/usage` (SigV4) after a microVM ran, suspended and
resumed shows its vCPU, memory and snapshot usage with costs; another account
sees none of it; a bad time is a ValidationException; the SDK's
`hearth.usage()` reads the same report."""
import sys
import time

import botocore.auth
import botocore.awsrequest
import botocore.credentials
import pytest
import requests

from conftest import (REGION, ROOT, client_for, create_account, import_image, short_data_dir, start_server,
                      stop_server, kill_qemu_under, wait_for_state, FAST_RATES)

IDLE = ["sleep", "infinity"]


def signed_get(server, account, path):
    url = f"{server['url']}{path}"
    request = botocore.awsrequest.AWSRequest(method="GET", url=url)
    credentials = botocore.credentials.Credentials(account["accessKeyId"], account["secretAccessKey"])
    botocore.auth.SigV4Auth(credentials, "lambda", REGION).add_auth(request)
    return requests.get(url, headers=dict(request.headers.items()), timeout=60)


@pytest.fixture(scope="module")
def metered(model_path, guest_cleanup, tmp_path_factory, app_rootfs):
    """A server sampling every second, two accounts, one microVM of the first
    that ran, was suspended and resumed, then was terminated."""
    data = short_data_dir(tmp_path_factory, "usage")
    proc, url = start_server(data, "--usage-interval", "1", *FAST_RATES)
    server = {"url": url, "data_dir": data}
    try:
        owner = create_account(server, "usage-a")
        other = create_account(server, "usage-b")
        import_image(data, owner["accountId"], "idle", app_rootfs, IDLE, memory=512)
        client = client_for(server, owner)
        microvm_id = client.run_microvm(imageIdentifier="idle")["microvmId"]
        wait_for_state(client, microvm_id, "RUNNING", timeout=120)
        time.sleep(3)
        client.suspend_microvm(microvmIdentifier=microvm_id)
        wait_for_state(client, microvm_id, "SUSPENDED", timeout=120)
        client.resume_microvm(microvmIdentifier=microvm_id)
        wait_for_state(client, microvm_id, "RUNNING", timeout=120)
        time.sleep(3)
        client.terminate_microvm(microvmIdentifier=microvm_id)
        wait_for_state(client, microvm_id, "TERMINATED", timeout=120)
        time.sleep(2)  # a last sample closes its mark
        yield {"server": server, "owner": owner, "other": other, "microvm": microvm_id}
    finally:
        stop_server(proc)
        kill_qemu_under(f"{data}/")


def test_the_owner_sees_its_microvm_usage_priced(metered):
    response = signed_get(metered["server"], metered["owner"], "/hearth/2025-09-09/usage")
    assert response.status_code == 200, response.text
    report = response.json()
    mine = [i for i in report["items"] if i.get("microvmId") == metered["microvm"]]
    types = {i["usageType"]: i for i in mine}
    vcpu = next(i for t, i in types.items() if t.startswith("Lambda-MicroVM-vCPU-Second-"))
    memory = next(i for t, i in types.items() if t.startswith("Lambda-MicroVM-Memory-GB-Second-"))
    # At least the ~6 s it ran on the 512 MiB size's baseline (a quarter vCPU, 0.5 GB).
    assert vcpu["unit"] == "vCPU-Seconds" and vcpu["quantity"] >= 0.25 * 5, vcpu
    assert memory["unit"] == "GB-Seconds" and memory["quantity"] >= 0.5 * 5, memory
    assert types["Lambda-MicroVM-Snapshot-Write-GB"]["quantity"] > 0
    # A launch and a resume: reads of the snapshot and of the saved state.
    assert types["Lambda-MicroVM-Snapshot-Read-GB"]["quantity"] > types["Lambda-MicroVM-Snapshot-Write-GB"]["quantity"] * 0.5
    for item in mine:
        assert item["imageArn"].endswith(":microvm-image:idle"), item
        assert item["costUsd"] >= 0
    assert vcpu["costUsd"] == pytest.approx(vcpu["quantity"] * 0.0000276944)
    assert report["totalCostUsd"] == pytest.approx(sum(i["costUsd"] for i in report["items"]))


def test_another_account_sees_nothing_and_bad_times_are_refused(metered):
    response = signed_get(metered["server"], metered["other"], "/hearth/2025-09-09/usage")
    assert response.status_code == 200, response.text
    assert response.json() == {"items": [], "totalCostUsd": 0.0}
    bad = signed_get(metered["server"], metered["owner"], "/hearth/2025-09-09/usage?since=yesterday")
    assert bad.status_code == 400 and "epoch seconds" in bad.json()["message"], bad.text
    assert bad.headers.get("x-amzn-errortype", "").startswith("ValidationException"), bad.headers
    future = signed_get(metered["server"], metered["owner"], f"/hearth/2025-09-09/usage?since={int(time.time()) + 7200}")
    assert future.json()["items"] == []


def test_the_sdk_reads_the_same_report(metered):
    sys.path.insert(0, str(ROOT / "sdk/python/src"))
    import hearth
    connection = hearth.Connection(endpoint_url=metered["server"]["url"], region=REGION,
                                   session=__import__("boto3").session.Session(
                                       aws_access_key_id=metered["owner"]["accessKeyId"],
                                       aws_secret_access_key=metered["owner"]["secretAccessKey"],
                                       region_name=REGION))
    report = hearth.usage(connection=connection)
    assert any(i.microvm_id == metered["microvm"] for i in report.items)
    assert report.total_cost_usd > 0
