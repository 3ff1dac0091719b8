"""The API's defaults, end to end, as a new user takes them first (issue 9).

One image is built with only the required fields of CreateMicrovmImage (no
`resources`: the reference's default size, 2048 MiB, which once never booted)
and hooks without timeouts; microVMs are run with only `imageIdentifier`. Each
default is then observed where it matters: the guest's memory, the newest
version chosen, the lifetime, the default ingress connector and upstream port
of the endpoint, and the hook time limits (image hooks 30 s, runtime hooks 1 s).
"""

import json
import time

import pytest

from conftest import create_account, short_data_dir, wait_for_state
from endpoint_support import Hearth, app_token, ep_request, kill_leftover_qemu, terminate_quietly
from test_builds import BASE_ARN, ROLE, s3_client, wait_image, zip_bytes, build_of

DEFAULT_MEMORY_MIB = 2048
# The guest sees the size's peak: 4x the baseline, one vCPU per 2 GiB.
DEFAULT_PEAK_MIB = 4 * DEFAULT_MEMORY_MIB
DEFAULT_VCPUS = DEFAULT_PEAK_MIB // 2048
DEFAULT_LIFETIME_SECS = 28_800

# The app: answers on 8080 with what the guest sees; hooks on 9000. The ready
# hook says 503 for the first 3 s (inside the 30 s default, beyond a 1 s one);
# /run takes 3 s when the payload says "slow" (beyond the runtime default, 1 s).
APP = r'''
import http.server, json, os, threading, time

STARTED = time.time()


def meminfo_kib():
    for line in open("/proc/meminfo"):
        if line.startswith("MemTotal:"):
            return int(line.split()[1])


class App(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = json.dumps({"memTotalKiB": meminfo_kib(), "cpus": os.cpu_count()}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Hooks(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        status = 200
        if self.path.endswith("/ready") and time.time() - STARTED < 3:
            status = 503
        if self.path.endswith("/run") and b"slow" in body:
            time.sleep(3)
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()

    do_GET = do_POST

    def log_message(self, *args):
        pass


hooks = http.server.ThreadingHTTPServer(("0.0.0.0", 9000), Hooks)
threading.Thread(target=hooks.serve_forever, daemon=True).start()
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), App).serve_forever()
'''

DOCKERFILE = """\
FROM debian-12
WORKDIR /srv
COPY app.py ./
CMD ["python3", "app.py"]
"""


@pytest.fixture(scope="module")
def hearth(model_path, guest_cleanup, tmp_path_factory, request):
    data_dir = short_data_dir(tmp_path_factory, "dfl")
    request.addfinalizer(lambda: kill_leftover_qemu(data_dir))
    server = Hearth(data_dir).start()
    request.addfinalizer(server.stop)
    server.use_account(create_account(server.info, "defaults-tenant"))
    return server


@pytest.fixture(scope="module")
def image(hearth):
    """Built with the required fields only, plus hooks without any timeout."""
    s3 = s3_client(hearth, hearth.account)
    s3.create_bucket(Bucket="defaults")
    s3.put_object(Bucket="defaults", Key="app.zip", Body=zip_bytes({"Dockerfile": DOCKERFILE, "app.py": APP}))
    out = hearth.client.create_microvm_image(
        name="defaults", baseImageArn=BASE_ARN, buildRoleArn=ROLE,
        codeArtifact={"uri": "s3://defaults/app.zip"},
        hooks={"port": 9000, "microvmImageHooks": {"ready": "ENABLED"}, "microvmHooks": {"run": "ENABLED"}},
    )
    assert out["state"] == "CREATING", out
    image = wait_image(hearth.client, "defaults", ("CREATED", "CREATE_FAILED"))
    assert image["state"] == "CREATED", build_of(hearth.client, "defaults", "1.0")
    return "defaults"


def test_the_default_size_is_2048_mib_and_the_guest_has_it(hearth, image):
    version = hearth.client.get_microvm_image_version(imageIdentifier=image, imageVersion="1.0")
    assert version["resources"] == [{"minimumMemoryInMiB": DEFAULT_MEMORY_MIB}]
    # A ready hook without readyTimeoutInSeconds waited (503 for 3 s) under the
    # 30 s default rather than failing the build.
    build = build_of(hearth.client, image, "1.0")
    assert build["buildState"] == "SUCCESSFUL", build

    out = hearth.client.run_microvm(imageIdentifier=image)
    vm, _ = wait_for_state(hearth.client, out["microvmId"], ("RUNNING", "TERMINATED"), timeout=120)
    try:
        assert vm["state"] == "RUNNING", vm
        # Defaults of RunMicrovm: the newest version, the reference's lifetime
        # cap, and HTTP_INGRESS as the ingress connector.
        assert vm["imageVersion"] == "1.0", vm
        assert vm["maximumDurationInSeconds"] == DEFAULT_LIFETIME_SECS, vm
        assert any(c.endswith(":HTTP_INGRESS") for c in vm["ingressNetworkConnectors"]), vm
        # Through the endpoint with no X-aws-proxy-port: the default upstream, 8080.
        token = app_token(hearth, vm["microvmId"], 8080)
        response = ep_request(hearth, vm["endpoint"], token=token)
        assert response.status_code == 200, response.text
        seen = json.loads(response.text)
        size_kib = DEFAULT_PEAK_MIB * 1024
        assert size_kib * 90 // 100 <= seen["memTotalKiB"] <= size_kib, seen
        assert seen["cpus"] == DEFAULT_VCPUS, seen
    finally:
        terminate_quietly(hearth, vm["microvmId"])


def test_runtime_hooks_default_to_one_second(hearth, image):
    fast = hearth.client.run_microvm(imageIdentifier=image, runHookPayload="fast")
    slow = hearth.client.run_microvm(imageIdentifier=image, runHookPayload="slow")
    try:
        vm, _ = wait_for_state(hearth.client, fast["microvmId"], ("RUNNING", "TERMINATED"), timeout=120)
        assert vm["state"] == "RUNNING", vm
        # /run answering after 3 s is past the 1 s default: the VM is ended.
        vm, _ = wait_for_state(hearth.client, slow["microvmId"], ("TERMINATED",), timeout=120)
        assert "run" in vm.get("stateReason", "").lower(), vm
    finally:
        terminate_quietly(hearth, fast["microvmId"])
        terminate_quietly(hearth, slow["microvmId"])
