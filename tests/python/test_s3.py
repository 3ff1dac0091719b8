"""The built-in S3-compatible artifact store, on the API's listener, with
boto3's real s3 client (path-style addressing) and the aws CLI."""
import hashlib
import os
import pathlib
import subprocess
import sys
import uuid

import boto3
import botocore.config
import botocore.exceptions
import pytest
import requests

from conftest import REGION, client_for, create_account


def s3_client(server, account, secret=None, key_id=None):
    return boto3.session.Session().client(
        "s3",
        endpoint_url=server["url"],
        region_name=REGION,
        aws_access_key_id=key_id or account["accessKeyId"],
        aws_secret_access_key=secret or account["secretAccessKey"],
        config=botocore.config.Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


def error_of(excinfo):
    response = excinfo.value.response
    return response["Error"]["Code"], response["ResponseMetadata"]["HTTPStatusCode"]


@pytest.fixture(scope="module")
def owner(server):
    return create_account(server, "s3-owner")


@pytest.fixture(scope="module")
def other(server):
    return create_account(server, "s3-other")


@pytest.fixture(scope="module")
def s3(server, owner):
    return s3_client(server, owner)


@pytest.fixture
def bucket(s3):
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    yield name
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name):
        for item in page.get("Contents", []):
            s3.delete_object(Bucket=name, Key=item["Key"])
    s3.delete_bucket(Bucket=name)


def test_put_get_head_delete(s3, bucket):
    body = b"hello, artifacts"
    put = s3.put_object(Bucket=bucket, Key="dir/app.zip", Body=body, ContentType="application/zip", Metadata={"build": "42"})
    assert put["ETag"] == f'"{hashlib.md5(body).hexdigest()}"'

    got = s3.get_object(Bucket=bucket, Key="dir/app.zip")
    assert got["Body"].read() == body
    assert got["ContentType"] == "application/zip"
    assert got["ETag"] == put["ETag"]
    assert got["Metadata"] == {"build": "42"}

    head = s3.head_object(Bucket=bucket, Key="dir/app.zip")
    assert head["ContentLength"] == len(body)
    assert head["LastModified"].year >= 2025

    part = s3.get_object(Bucket=bucket, Key="dir/app.zip", Range="bytes=7-15")
    assert part["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert part["Body"].read() == body[7:16]
    assert part["ContentRange"] == f"bytes 7-15/{len(body)}"
    suffix = s3.get_object(Bucket=bucket, Key="dir/app.zip", Range="bytes=-4")
    assert suffix["Body"].read() == body[-4:]
    with pytest.raises(botocore.exceptions.ClientError) as excinfo:
        s3.get_object(Bucket=bucket, Key="dir/app.zip", Range="bytes=100-200")
    assert error_of(excinfo) == ("InvalidRange", 416)

    s3.delete_object(Bucket=bucket, Key="dir/app.zip")
    with pytest.raises(botocore.exceptions.ClientError) as excinfo:
        s3.head_object(Bucket=bucket, Key="dir/app.zip")
    assert error_of(excinfo) == ("404", 404)
    # Deleting a missing key succeeds, as in S3.
    s3.delete_object(Bucket=bucket, Key="dir/app.zip")


def test_odd_keys_round_trip(s3, bucket):
    keys = ["../escape", "/abs/path", "a b+c&d=e?.txt", "ключ/🙂.zip", "k" * 1024, "a", "a/b"]
    for key in keys:
        s3.put_object(Bucket=bucket, Key=key, Body=key.encode())
    for key in keys:
        assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == key.encode()
    # boto3 asks for EncodingType=url and decodes the keys back.
    listed = [item["Key"] for item in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert listed == sorted(keys, key=lambda k: k.encode())
    with pytest.raises(botocore.exceptions.ClientError) as excinfo:
        s3.put_object(Bucket=bucket, Key="k" * 1025, Body=b"x")
    assert error_of(excinfo)[1] == 400


def test_list_prefix_delimiter_and_pages(s3, bucket):
    keys = [f"logs/{i:02}.txt" for i in range(7)] + ["photos/2024/a.jpg", "photos/2025/b.jpg", "readme.md"]
    for key in keys:
        s3.put_object(Bucket=bucket, Key=key, Body=b"x")

    top = s3.list_objects_v2(Bucket=bucket, Delimiter="/")
    assert [p["Prefix"] for p in top["CommonPrefixes"]] == ["logs/", "photos/"]
    assert [item["Key"] for item in top["Contents"]] == ["readme.md"]
    assert top["KeyCount"] == 3 and not top["IsTruncated"]

    photos = s3.list_objects_v2(Bucket=bucket, Prefix="photos/", Delimiter="/")
    assert [p["Prefix"] for p in photos["CommonPrefixes"]] == ["photos/2024/", "photos/2025/"]
    assert "Contents" not in photos

    pages = list(s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, PaginationConfig={"PageSize": 3}))
    assert len(pages) == 4
    assert all(page["KeyCount"] <= 3 for page in pages)
    assert [item["Key"] for page in pages for item in page.get("Contents", [])] == sorted(keys)

    v1 = s3.list_objects(Bucket=bucket, Prefix="logs/", MaxKeys=5)
    assert len(v1["Contents"]) == 5 and v1["IsTruncated"]


def test_upload_file_multipart_round_trip(s3, bucket, tmp_path):
    src = tmp_path / "big.bin"
    data = os.urandom(20 * 1024 * 1024)
    src.write_bytes(data)
    # boto3 switches to multipart above 8 MiB: 8 + 8 + 4 MiB parts.
    s3.upload_file(str(src), bucket, "big.bin")
    head = s3.head_object(Bucket=bucket, Key="big.bin")
    assert head["ContentLength"] == len(data)
    md5s = b"".join(hashlib.md5(data[i : i + 8 * 1024 * 1024]).digest() for i in range(0, len(data), 8 * 1024 * 1024))
    assert head["ETag"] == f'"{hashlib.md5(md5s).hexdigest()}-3"'
    dest = tmp_path / "back.bin"
    s3.download_file(bucket, "big.bin", str(dest))
    assert hashlib.sha256(dest.read_bytes()).digest() == hashlib.sha256(data).digest()


def test_multipart_by_hand(s3, bucket):
    upload = s3.create_multipart_upload(Bucket=bucket, Key="mp.bin", ContentType="application/octet-stream")
    upload_id = upload["UploadId"]
    first = b"a" * (5 * 1024 * 1024)
    second = b"tail"
    e1 = s3.upload_part(Bucket=bucket, Key="mp.bin", UploadId=upload_id, PartNumber=1, Body=first)["ETag"]
    e2 = s3.upload_part(Bucket=bucket, Key="mp.bin", UploadId=upload_id, PartNumber=2, Body=second)["ETag"]
    parts = s3.list_parts(Bucket=bucket, Key="mp.bin", UploadId=upload_id)["Parts"]
    assert [(p["PartNumber"], p["Size"]) for p in parts] == [(1, len(first)), (2, len(second))]
    with pytest.raises(botocore.exceptions.ClientError) as excinfo:
        s3.complete_multipart_upload(
            Bucket=bucket,
            Key="mp.bin",
            UploadId=upload_id,
            MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": e1}, {"PartNumber": 2, "ETag": '"0000"'}]},
        )
    assert error_of(excinfo) == ("InvalidPart", 400)
    done = s3.complete_multipart_upload(
        Bucket=bucket,
        Key="mp.bin",
        UploadId=upload_id,
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": e1}, {"PartNumber": 2, "ETag": e2}]},
    )
    assert done["ETag"].endswith('-2"')
    assert s3.get_object(Bucket=bucket, Key="mp.bin")["Body"].read() == first + second

    aborted = s3.create_multipart_upload(Bucket=bucket, Key="gone.bin")["UploadId"]
    s3.upload_part(Bucket=bucket, Key="gone.bin", UploadId=aborted, PartNumber=1, Body=b"x")
    s3.abort_multipart_upload(Bucket=bucket, Key="gone.bin", UploadId=aborted)
    with pytest.raises(botocore.exceptions.ClientError) as excinfo:
        s3.list_parts(Bucket=bucket, Key="gone.bin", UploadId=aborted)
    assert error_of(excinfo) == ("NoSuchUpload", 404)


def test_another_account_is_denied_everything(server, s3, bucket, other):
    s3.put_object(Bucket=bucket, Key="secret.zip", Body=b"mine")
    theirs = s3_client(server, other)
    calls = [
        lambda: theirs.get_object(Bucket=bucket, Key="secret.zip"),
        lambda: theirs.put_object(Bucket=bucket, Key="x", Body=b"x"),
        lambda: theirs.delete_object(Bucket=bucket, Key="secret.zip"),
        lambda: theirs.list_objects_v2(Bucket=bucket),
        lambda: theirs.create_multipart_upload(Bucket=bucket, Key="x"),
        lambda: theirs.delete_bucket(Bucket=bucket),
    ]
    for call in calls:
        with pytest.raises(botocore.exceptions.ClientError) as excinfo:
            call()
        assert error_of(excinfo) == ("AccessDenied", 403)
    for call in [
        lambda: theirs.head_bucket(Bucket=bucket),
        lambda: theirs.head_object(Bucket=bucket, Key="secret.zip"),
    ]:
        with pytest.raises(botocore.exceptions.ClientError) as excinfo:
            call()
        assert error_of(excinfo) == ("403", 403)
    with pytest.raises(botocore.exceptions.ClientError) as excinfo:
        theirs.create_bucket(Bucket=bucket)
    assert error_of(excinfo) == ("BucketAlreadyExists", 409)
    assert bucket not in [b["Name"] for b in theirs.list_buckets()["Buckets"]]
    assert bucket in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    # Nothing changed for the owner.
    assert s3.get_object(Bucket=bucket, Key="secret.zip")["Body"].read() == b"mine"


def test_missing_bucket_and_key(s3, bucket):
    missing = f"missing-{uuid.uuid4().hex[:12]}"
    with pytest.raises(botocore.exceptions.ClientError) as excinfo:
        s3.get_object(Bucket=missing, Key="k")
    assert error_of(excinfo) == ("NoSuchBucket", 404)
    with pytest.raises(botocore.exceptions.ClientError) as excinfo:
        s3.list_objects_v2(Bucket=missing)
    assert error_of(excinfo) == ("NoSuchBucket", 404)
    with pytest.raises(botocore.exceptions.ClientError) as excinfo:
        s3.head_bucket(Bucket=missing)
    assert error_of(excinfo) == ("404", 404)
    with pytest.raises(botocore.exceptions.ClientError) as excinfo:
        s3.get_object(Bucket=bucket, Key="nope")
    assert error_of(excinfo) == ("NoSuchKey", 404)
    with pytest.raises(botocore.exceptions.ClientError) as excinfo:
        s3.create_bucket(Bucket=bucket)
    assert error_of(excinfo) == ("BucketAlreadyOwnedByYou", 409)
    s3.put_object(Bucket=bucket, Key="k", Body=b"x")
    with pytest.raises(botocore.exceptions.ClientError) as excinfo:
        s3.delete_bucket(Bucket=bucket)
    assert error_of(excinfo) == ("BucketNotEmpty", 409)
    with pytest.raises(botocore.exceptions.ClientError) as excinfo:
        s3.create_bucket(Bucket="Not_A_Valid_Name")
    assert error_of(excinfo)[1] == 400


def test_bad_signature_and_unknown_key(server, owner, bucket):
    bad = s3_client(server, owner, secret="wrong" * 8)
    with pytest.raises(botocore.exceptions.ClientError) as excinfo:
        bad.list_objects_v2(Bucket=bucket)
    assert error_of(excinfo) == ("SignatureDoesNotMatch", 403)
    unknown = s3_client(server, owner, key_id="AKIANOTAKEY000000000")
    with pytest.raises(botocore.exceptions.ClientError) as excinfo:
        unknown.list_buckets()
    assert error_of(excinfo) == ("InvalidAccessKeyId", 403)
    # Unsigned requests are not S3's: the API answers them.
    assert requests.get(f"{server['url']}/{bucket}/k", timeout=5).status_code in (403, 404)


@pytest.mark.parametrize("signature_version", [None, "s3v4"])
def test_presigned_get(server, owner, s3, bucket, signature_version):
    s3.put_object(Bucket=bucket, Key="shared.txt", Body=b"presigned")
    # boto3 presigns with SigV2 by default here, SigV4 when asked.
    signer = boto3.session.Session().client(
        "s3",
        endpoint_url=server["url"],
        region_name=REGION,
        aws_access_key_id=owner["accessKeyId"],
        aws_secret_access_key=owner["secretAccessKey"],
        config=botocore.config.Config(signature_version=signature_version, s3={"addressing_style": "path"}),
    )
    url = signer.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "shared.txt"}, ExpiresIn=60)
    response = requests.get(url, timeout=10)
    assert response.status_code == 200, response.text
    assert response.content == b"presigned"
    tampered = url.replace("shared.txt", "other.txt")
    assert requests.get(tampered, timeout=10).status_code == 403


def test_api_and_s3_share_the_listener(server, owner, s3):
    # A bucket named like one of the server's own routes is still S3's.
    name = "metrics"
    s3.create_bucket(Bucket=name)
    try:
        s3.put_object(Bucket=name, Key="k", Body=b"v")
        assert [item["Key"] for item in s3.list_objects_v2(Bucket=name)["Contents"]] == ["k"]
        s3.delete_object(Bucket=name, Key="k")
    finally:
        s3.delete_bucket(Bucket=name)
    assert "hearth_api_requests_total" in requests.get(f"{server['url']}/metrics", timeout=5).text
    api = client_for(server, owner)
    assert api.list_managed_microvm_images()["ResponseMetadata"]["HTTPStatusCode"] == 200


def test_aws_cli_cp(server, owner, s3, bucket, tmp_path):
    aws = pathlib.Path(sys.executable).parent / "aws"
    if not aws.exists():
        pytest.skip("the aws CLI is not installed in the test virtualenv (scripts/setup-host --with-python)")
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": owner["accessKeyId"],
        "AWS_SECRET_ACCESS_KEY": owner["secretAccessKey"],
        "AWS_DEFAULT_REGION": REGION,
        "AWS_CONFIG_FILE": str(tmp_path / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials"),
    }
    (tmp_path / "config").write_text("[default]\ns3 =\n    addressing_style = path\n")
    src = tmp_path / "app.zip"
    data = os.urandom(9 * 1024 * 1024 + 123)
    src.write_bytes(data)

    def run(*args):
        return subprocess.run(
            [str(aws), "--endpoint-url", server["url"], *args], env=env, capture_output=True, text=True, timeout=120
        )

    up = run("s3", "cp", str(src), f"s3://{bucket}/cli/app.zip")
    assert up.returncode == 0, up.stderr
    listing = run("s3", "ls", f"s3://{bucket}/cli/")
    assert listing.returncode == 0 and "app.zip" in listing.stdout, listing.stderr
    dest = tmp_path / "back.zip"
    down = run("s3", "cp", f"s3://{bucket}/cli/app.zip", str(dest))
    assert down.returncode == 0, down.stderr
    assert dest.read_bytes() == data
    assert s3.head_object(Bucket=bucket, Key="cli/app.zip")["ContentLength"] == len(data)
