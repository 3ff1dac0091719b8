"""Wire compatibility with the real boto3 client."""
import datetime

import botocore.exceptions
import pytest
import requests

from conftest import REGION, client_for, create_account, short_data_dir, start_server


def error_of(excinfo):
    return excinfo.value.response["Error"]["Code"], excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"]


def test_health_endpoints(server):
    assert requests.get(server["url"] + "/live", timeout=5).status_code == 200
    assert requests.get(server["url"] + "/ready", timeout=5).status_code == 200
    metrics = requests.get(server["url"] + "/metrics", timeout=5).text
    assert "hearth_api_requests_total" in metrics


def test_list_managed_images(client):
    out = client.list_managed_microvm_images()
    arns = [item["imageArn"] for item in out["items"]]
    assert f"arn:aws:lambda:{REGION}:aws:microvm-image:debian-12" in arns
    # boto3 parsed the epoch-seconds timestamp into a datetime.
    assert isinstance(out["items"][0]["createdAt"], datetime.datetime)
    assert out["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert out["ResponseMetadata"]["RequestId"]


def test_list_managed_image_versions_by_name_and_arn(client):
    by_name = client.list_managed_microvm_image_versions(imageIdentifier="debian-12")["items"]
    arn = f"arn:aws:lambda:{REGION}:aws:microvm-image:debian-12"
    by_arn = client.list_managed_microvm_image_versions(imageIdentifier=arn)["items"]
    assert by_name == by_arn
    assert any(v["status"] == "AVAILABLE" for v in by_name)
    assert by_name[0]["imageVersion"] == "1.0"
    assert by_name[0]["supportedCpuConfigurations"] == [{"architecture": "X86_64"}]


def test_missing_managed_image_is_404(client):
    with pytest.raises(botocore.exceptions.ClientError) as excinfo:
        client.list_managed_microvm_image_versions(imageIdentifier="no-such-image")
    assert error_of(excinfo) == ("ResourceNotFoundException", 404)


def test_validation_error_shape(client):
    # maxResults is 1..50 in the model; boto3 validates client side, so skip it.
    client.meta.config.parameter_validation = False
    with pytest.raises(botocore.exceptions.ClientError) as excinfo:
        client.list_managed_microvm_images(maxResults=500)
    code, status = error_of(excinfo)
    assert (code, status) == ("ValidationException", 400)
    assert "maxResults" in excinfo.value.response["Error"]["Message"]


def test_bad_secret_and_unknown_key_are_the_same_403(server, account):
    messages = set()
    for bad in [
        client_for(server, account, secret="x" * 40),
        client_for(server, account, key_id="HKIAUNKNOWNKEY000000"),
    ]:
        with pytest.raises(botocore.exceptions.ClientError) as excinfo:
            bad.list_managed_microvm_images()
        assert error_of(excinfo) == ("InvalidSignatureException", 403)
        messages.add(excinfo.value.response["Error"]["Message"])
    # No hint about which part was wrong.
    assert len(messages) == 1


def test_wrong_region_is_403(server, account):
    with pytest.raises(botocore.exceptions.ClientError) as excinfo:
        client_for(server, account, region="eu-west-1").list_managed_microvm_images()
    assert error_of(excinfo)[1] == 403


def test_unsigned_request_is_403(server):
    response = requests.get(server["url"] + "/2025-09-09/managed-microvm-images", timeout=5)
    assert response.status_code == 403
    assert response.headers["x-amzn-errortype"].startswith("MissingAuthenticationToken")
    assert "message" in response.json()


def test_second_account_works_independently(server):
    other = create_account(server, "tenant-b")
    assert client_for(server, other).list_managed_microvm_images()["items"]


def test_pagination_with_max_results(client):
    paginator_pages = []
    token = None
    while True:
        kwargs = {"imageIdentifier": "debian-12", "maxResults": 1}
        if token:
            kwargs["nextToken"] = token
        page = client.list_managed_microvm_image_versions(**kwargs)
        paginator_pages.append(page["items"])
        token = page.get("nextToken")
        if not token:
            break
    flat = [v["imageVersion"] for page in paginator_pages for v in page]
    assert len(flat) == len(set(flat)) >= 1


def test_rate_limit_is_429_per_account(model_path, tmp_path_factory):
    tmp_path = short_data_dir(tmp_path_factory, "rates")
    proc, url = start_server(tmp_path, "--rate-limit", "ListManagedMicrovmImages=1")
    try:
        server = {"url": url, "data_dir": tmp_path}
        first = client_for(server, create_account(server, "limited-a"))
        second = client_for(server, create_account(server, "limited-b"))
        first.list_managed_microvm_images()
        with pytest.raises(botocore.exceptions.ClientError) as excinfo:
            for _ in range(5):
                first.list_managed_microvm_images()
        assert error_of(excinfo) == ("ThrottlingException", 429)
        # Another account has its own budget.
        second.list_managed_microvm_images()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_bad_rate_limit_flag_is_refused(tmp_path):
    import subprocess
    from conftest import HEARTH
    out = subprocess.run(
        [str(HEARTH), "serve", "--data-dir", str(tmp_path), "--listen", "127.0.0.1:0", "--rate-limit", "Nope=1"],
        capture_output=True, text=True, timeout=20,
    )
    assert out.returncode != 0
    assert "unknown operation" in out.stderr
