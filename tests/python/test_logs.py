"""App logs: what the image's app prints to stdout and stderr, captured by the
guest agent, stored per microVM by the server and read through
`GET /hearth/2025-09-09/microvms/{id}/logs` (SigV4) and `hearth logs`.

The test app prints two lines while the image is built (they belong to the
build, never to a microVM), then prints whatever a file dropped into
/tmp/say asks for: `STREAM DELAY TEXT` prints TEXT on stdout or stderr after
DELAY seconds, so a line can be printed while the server is down."""
import json
import os
import pathlib
import re
import subprocess
import threading
import time

import botocore.auth
import botocore.awsrequest
import botocore.credentials
import pytest
import requests

from conftest import (FAST_RATES, HEARTH, REGION, client_for, create_account, import_image, kill_qemu_under,
                      run_in, short_data_dir, start_server, stop_server, wait_for_state)

APP = r'''
import os, sys, threading, time
print("build-time stdout line", flush=True)
print("build-time stderr line", file=sys.stderr, flush=True)
os.makedirs("/tmp/say", exist_ok=True)

def say(stream, delay, text):
    time.sleep(delay)
    print(text, file=sys.stderr if stream == "stderr" else sys.stdout, flush=True)

while True:
    for name in sorted(os.listdir("/tmp/say")):
        if name.startswith("."):
            continue
        path = os.path.join("/tmp/say", name)
        with open(path) as f:
            stream, delay, text = f.read().rstrip("\n").split(" ", 2)
        os.remove(path)
        threading.Thread(target=say, args=(stream, float(delay), text)).start()
    time.sleep(0.05)
'''
IMAGE = "logs"
SAID = 0


@pytest.fixture(scope="module")
def logs_env(model_path, guest_cleanup, tmp_path_factory, app_rootfs):
    """A server of its own (the restart test kills it), two accounts and the
    image; yields a dict whose "server" is replaced after a restart."""
    data = short_data_dir(tmp_path_factory, "logs")
    proc, url = start_server(data, *FAST_RATES)
    env = {"data_dir": data, "proc": proc, "server": {"url": url, "data_dir": data}}
    try:
        env["account"] = create_account(env["server"], "logs-a")
        env["other"] = create_account(env["server"], "logs-b")
        imported = import_image(data, env["account"]["accountId"], IMAGE, app_rootfs, ["python3", "-c", APP],
                                memory=256, check=False)
        assert imported.returncode == 0, imported.stderr
        # The build heard the app's build-time lines (so their absence from
        # the microVMs' logs below means something).
        assert "app stdout: build-time stdout line" in imported.stderr, imported.stderr
        assert "app stderr: build-time stderr line" in imported.stderr, imported.stderr
        yield env
    finally:
        stop_server(env["proc"])
        kill_qemu_under(f"{data}/")


def client_of(env):
    return client_for(env["server"], env["account"])


def run_vm(env):
    client = client_of(env)
    microvm_id = client.run_microvm(imageIdentifier=IMAGE)["microvmId"]
    wait_for_state(client, microvm_id, "RUNNING", timeout=120)
    return microvm_id


def say(env, microvm_id, stream, text, delay=0):
    """Makes the app print text on stream (after delay seconds)."""
    global SAID
    SAID += 1
    run_in(env["server"], env["account"], microvm_id,
           f"printf '%s' '{stream} {delay} {text}' > /tmp/say/.{SAID} && mv /tmp/say/.{SAID} /tmp/say/{SAID:05}")


def signed_get(env, account, path, stream=False, timeout=60):
    url = f"{env['server']['url']}{path}"
    request = botocore.awsrequest.AWSRequest(method="GET", url=url)
    credentials = botocore.credentials.Credentials(account["accessKeyId"], account["secretAccessKey"])
    botocore.auth.SigV4Auth(credentials, "lambda", REGION).add_auth(request)
    return requests.get(url, headers=dict(request.headers.items()), stream=stream, timeout=timeout)


def logs_path(microvm_id, query=""):
    return f"/hearth/2025-09-09/microvms/{microvm_id}/logs" + (f"?{query}" if query else "")


def read_all(env, microvm_id, query=""):
    """Every stored event, page after page."""
    events, offset = [], None
    while True:
        parts = [query] if query else []
        if offset is not None:
            parts.append(f"offset={offset}")
        response = signed_get(env, env["account"], logs_path(microvm_id, "&".join(parts)))
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
        page = response.json()
        assert isinstance(page["nextOffset"], str)
        events += page["events"]
        if not page["events"]:
            return events
        offset = page["nextOffset"]


def wait_for_lines(env, microvm_id, wanted, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        events = read_all(env, microvm_id)
        if set(wanted) <= {e["message"] for e in events}:
            return events
        if time.monotonic() > deadline:
            raise AssertionError(f"{wanted} not all in {events}")
        time.sleep(0.3)


def test_post_launch_output_with_its_streams_and_no_build_lines(logs_env):
    env = logs_env
    microvm_id = run_vm(env)
    say(env, microvm_id, "stdout", "launch-out-1")
    say(env, microvm_id, "stderr", "launch-err-1")
    events = wait_for_lines(env, microvm_id, ["launch-out-1", "launch-err-1"])
    by_message = {e["message"]: e for e in events}
    assert by_message["launch-out-1"]["stream"] == "stdout"
    assert by_message["launch-err-1"]["stream"] == "stderr"
    assert not [e for e in events if "build-time" in e["message"]], events
    now_ms = time.time() * 1000
    for event in events:
        assert set(event) == {"timestamp", "stream", "message"}
        assert isinstance(event["timestamp"], int) and abs(event["timestamp"] - now_ms) < 600_000
    # since: a time after the lines leaves them out.
    assert read_all(env, microvm_id, f"since={int(now_ms) + 60_000}") == []
    # Filed under the reference's group and stream names.
    meta = json.loads((pathlib.Path(env["data_dir"]) / "logs" / microvm_id / "meta.json").read_text())
    assert meta["logGroup"] == f"/aws/lambda-microvms/{IMAGE}"
    assert re.fullmatch(rf"\d{{4}}/\d\d/\d\d\[1\]{microvm_id}", meta["logStream"]), meta
    # A bad cursor is a validation error.
    response = signed_get(env, env["account"], logs_path(microvm_id, "offset=nope"))
    assert response.status_code == 400 and response.json()["message"], response.text
    client_of(env).terminate_microvm(microvmIdentifier=microvm_id)


def test_logging_config_names_group_and_stream(logs_env):
    env = logs_env
    client = client_of(env)
    microvm_id = client.run_microvm(
        imageIdentifier=IMAGE, logging={"cloudWatch": {"logGroup": "my-group", "logStream": "my-stream"}}
    )["microvmId"]
    wait_for_state(client, microvm_id, "RUNNING", timeout=120)
    meta_path = pathlib.Path(env["data_dir"]) / "logs" / microvm_id / "meta.json"
    deadline = time.monotonic() + 10
    while not meta_path.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    meta = json.loads(meta_path.read_text())
    assert (meta["logGroup"], meta["logStream"]) == ("my-group", "my-stream")
    client.terminate_microvm(microvmIdentifier=microvm_id)


def test_follow_streams_a_line_printed_after_the_request(logs_env):
    env = logs_env
    microvm_id = run_vm(env)
    say(env, microvm_id, "stdout", "before-follow")
    wait_for_lines(env, microvm_id, ["before-follow"])
    response = signed_get(env, env["account"], logs_path(microvm_id, "follow=true"), stream=True)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-ndjson"
    received, done = [], threading.Event()

    def reader():
        for line in response.iter_lines():
            if line:
                received.append(json.loads(line))
            if any(e["message"] == "during-follow" for e in received):
                break
        done.set()

    threading.Thread(target=reader, daemon=True).start()
    deadline = time.monotonic() + 10
    while not received and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [e["message"] for e in received] == ["before-follow"], received
    say(env, microvm_id, "stderr", "during-follow")
    assert done.wait(30), received
    assert received[-1] == {**received[-1], "message": "during-follow", "stream": "stderr"}
    response.close()

    # A follow ends by itself when the microVM is terminated.
    response = signed_get(env, env["account"], logs_path(microvm_id, "follow=true"), stream=True)
    client_of(env).terminate_microvm(microvmIdentifier=microvm_id)
    lines = [json.loads(line) for line in response.iter_lines() if line]
    assert [e["message"] for e in lines] == ["before-follow", "during-follow"]


def test_logs_are_continuous_across_suspend_resume_and_a_server_restart(logs_env):
    env = logs_env
    microvm_id = run_vm(env)
    client = client_of(env)
    say(env, microvm_id, "stdout", "before-suspend")
    # Printed while the VM is suspended: the guest's clock is stopped, so
    # the line comes after the resume, from the guest's own buffer.
    say(env, microvm_id, "stderr", "across-suspend", delay=2)
    client.suspend_microvm(microvmIdentifier=microvm_id)
    wait_for_state(client, microvm_id, "SUSPENDED", timeout=120)
    client.resume_microvm(microvmIdentifier=microvm_id)
    wait_for_state(client, microvm_id, "RUNNING", timeout=120)
    wait_for_lines(env, microvm_id, ["before-suspend", "across-suspend"])
    say(env, microvm_id, "stdout", "after-resume")
    wait_for_lines(env, microvm_id, ["before-suspend", "across-suspend", "after-resume"])

    # Printed while the server is down (killed, no goodbye).
    say(env, microvm_id, "stdout", "while-down-1", delay=3)
    say(env, microvm_id, "stderr", "while-down-2", delay=4)
    env["proc"].kill()
    env["proc"].wait()
    time.sleep(6)
    env["proc"], env["server"]["url"] = start_server(env["data_dir"], *FAST_RATES)
    wait_for_state(client_of(env), microvm_id, "RUNNING", timeout=60)
    say(env, microvm_id, "stdout", "after-restart")
    wanted = ["before-suspend", "across-suspend", "after-resume", "while-down-1", "while-down-2", "after-restart"]
    events = wait_for_lines(env, microvm_id, wanted)
    messages = [e["message"] for e in events]
    assert messages == wanted, messages
    client_of(env).terminate_microvm(microvmIdentifier=microvm_id)


def test_another_account_gets_the_missing_microvm_answer(logs_env):
    env = logs_env
    microvm_id = run_vm(env)
    theirs = signed_get(env, env["other"], logs_path(microvm_id))
    missing_id = "microvm-" + "0" * 32
    missing = signed_get(env, env["account"], logs_path(missing_id))
    assert theirs.status_code == missing.status_code == 404
    assert theirs.headers["x-amzn-errortype"] == missing.headers["x-amzn-errortype"]
    assert "ResourceNotFoundException" in theirs.headers["x-amzn-errortype"]
    assert theirs.text == missing.text.replace(missing_id, microvm_id)
    follow = signed_get(env, env["other"], logs_path(microvm_id, "follow=true"))
    assert follow.status_code == 404 and follow.text == theirs.text
    client_of(env).terminate_microvm(microvmIdentifier=microvm_id)


def test_hearth_logs_prints_the_output(logs_env):
    env = logs_env
    microvm_id = run_vm(env)
    say(env, microvm_id, "stdout", "cli-out")
    say(env, microvm_id, "stderr", "cli-err")
    wait_for_lines(env, microvm_id, ["cli-out", "cli-err"])
    cli_env = {
        **{k: v for k, v in os.environ.items() if k != "HEARTH_CONFIG"},
        "HEARTH_ENDPOINT_URL": env["server"]["url"],
        "AWS_ACCESS_KEY_ID": env["account"]["accessKeyId"],
        "AWS_SECRET_ACCESS_KEY": env["account"]["secretAccessKey"],
        "AWS_REGION": REGION,
        "XDG_CONFIG_HOME": str(pathlib.Path(env["data_dir"]) / "no-config"),
    }
    plain = subprocess.run([str(HEARTH), "logs", microvm_id], capture_output=True, text=True, env=cli_env,
                           timeout=60)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.splitlines() == ["cli-out"]
    assert "cli-err" in plain.stderr.splitlines()
    as_json = subprocess.run([str(HEARTH), "logs", microvm_id, "--json"], capture_output=True, text=True,
                             env=cli_env, timeout=60)
    assert as_json.returncode == 0, as_json.stderr
    events = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [(e["stream"], e["message"]) for e in events] == [("stdout", "cli-out"), ("stderr", "cli-err")]
    recent = subprocess.run([str(HEARTH), "logs", microvm_id, "--since", "1h", "--json"], capture_output=True,
                            text=True, env=cli_env, timeout=60)
    assert recent.stdout == as_json.stdout
    # -f ends when the microVM is terminated.
    follower = subprocess.Popen([str(HEARTH), "logs", microvm_id, "-f"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=cli_env)
    time.sleep(1)
    client_of(env).terminate_microvm(microvmIdentifier=microvm_id)
    out, err = follower.communicate(timeout=60)
    assert follower.returncode == 0, err
    assert out.splitlines() == ["cli-out"]
    missing = subprocess.run([str(HEARTH), "logs", "microvm-" + "0" * 32], capture_output=True, text=True,
                             env=cli_env, timeout=60)
    assert missing.returncode == 1 and "ResourceNotFoundException" in missing.stderr
