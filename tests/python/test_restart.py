"""A hearth server killed with SIGKILL in the middle of microVM operations, then
started again on the same data directory: running VMs are adopted (same QEMU
process), suspended ones stay suspended, interrupted operations are finished
or undone, and every RUNNING microVM has exactly one QEMU process."""
import json
import time

import pytest

from conftest import (FAST_RATES, IDLE_CMD, client_for, create_account, exec_request, import_image, kill_qemu_under,
                      qemu_processes, qemu_vm_dirs, short_data_dir, start_server, stop_server, vm_dir_name,
                      wait_for_state)

FLEET = 20
SETTLED = {"RUNNING", "SUSPENDED", "TERMINATED"}


def states(client):
    pages = client.get_paginator("list_microvms").paginate(PaginationConfig={"PageSize": 50})
    return {item["microvmId"]: item["state"] for page in pages for item in page["items"]}


def wait_all(client, ids, wanted, timeout):
    deadline = time.monotonic() + timeout
    while True:
        now = states(client)
        if all(now[i] in wanted for i in ids):
            return now
        if time.monotonic() > deadline:
            raise AssertionError(f"not all {wanted} after {timeout}s: {sorted(now.values())}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def fleet(model_path, tmp_path_factory, app_rootfs):
    """A data directory with an account and an imported image "fleet"; each
    test runs its own servers on it. Its QEMU processes are killed at the end."""
    data = short_data_dir(tmp_path_factory, "restart")
    proc, url = start_server(data, *FAST_RATES)
    try:
        server = {"url": url, "data_dir": data}
        account = create_account(server, "restart")
        import_image(data, account["accountId"], "fleet", app_rootfs, IDLE_CMD, memory=256,
                     client=client_for(server, account))
    finally:
        stop_server(proc)
    yield {"data_dir": data, "account": account}
    kill_qemu_under(f"{data}/")


def test_restart_adopts_vms_and_settles_interrupted_operations(fleet):
    """20 running and 3 suspended microVMs, a burst of run/suspend/resume/terminate
    calls, kill -9 of the server, restart: everything settles within a minute
    into a consistent state, with one QEMU per RUNNING microVM and none after
    terminating all."""
    data, account = fleet["data_dir"], fleet["account"]
    proc, url = start_server(data, *FAST_RATES)
    try:
        server = {"url": url, "data_dir": data}
        client = client_for(server, account)
        ids = [client.run_microvm(imageIdentifier="fleet")["microvmId"] for _ in range(FLEET)]
        wait_all(client, ids, {"RUNNING"}, timeout=240)
        suspended, untouched = ids[:3], ids[7:]
        for microvm_id in suspended:
            client.suspend_microvm(microvmIdentifier=microvm_id)
        wait_all(client, suspended, {"SUSPENDED"}, timeout=60)
        pids_before = {name: pid for pid, name in qemu_vm_dirs(data).items()}
        assert set(pids_before) == {vm_dir_name(i) for i in ids[3:]}

        # In flight when the server dies.
        started = [client.run_microvm(imageIdentifier="fleet")["microvmId"] for _ in range(3)]
        client.suspend_microvm(microvmIdentifier=ids[3])
        client.suspend_microvm(microvmIdentifier=ids[4])
        client.terminate_microvm(microvmIdentifier=ids[5])
        client.terminate_microvm(microvmIdentifier=ids[6])
        client.resume_microvm(microvmIdentifier=suspended[0])
        client.terminate_microvm(microvmIdentifier=suspended[1])
        proc.kill()
        proc.wait()

        proc, url = start_server(data, *FAST_RATES)
        server["url"] = url
        client = client_for(server, account)
        everything = ids + started
        after = wait_all(client, everything, SETTLED, timeout=60)

        running = {i for i in everything if after[i] == "RUNNING"}
        # Accepted terminations were finished; untouched VMs were adopted as
        # they were, in the same QEMU process; an untouched suspended VM stays so.
        for microvm_id in (ids[5], ids[6], suspended[1]):
            got = client.get_microvm(microvmIdentifier=microvm_id)
            assert (got["state"], got.get("stateReason")) == ("TERMINATED", "Success."), got
        assert all(after[i] == "RUNNING" for i in untouched), {i: after[i] for i in untouched}
        assert after[suspended[2]] == "SUSPENDED"
        # An interrupted resume still has its suspend.state: undone or finished, not lost.
        assert after[suspended[0]] in ("SUSPENDED", "RUNNING")
        for microvm_id in everything:
            if after[microvm_id] == "TERMINATED":
                got = client.get_microvm(microvmIdentifier=microvm_id)
                assert got.get("stateReason") and got.get("terminatedAt"), got

        # One QEMU process per RUNNING microVM, none for the others.
        vm_dirs = qemu_vm_dirs(data)
        assert sorted(vm_dirs.values()) == sorted(vm_dir_name(i) for i in running), vm_dirs
        pids_after = {name: pid for pid, name in vm_dirs.items()}
        for microvm_id in untouched:
            assert pids_after[vm_dir_name(microvm_id)] == pids_before[vm_dir_name(microvm_id)]
        for microvm_id in sorted(running):
            response = exec_request(server, account, microvm_id, ["echo", "ok"], timeout=30)
            assert response.status_code == 200, (microvm_id, response.text)
            assert response.json()["stdout"] == "b2sK"  # base64 of "ok\n"

        # The suspended one resumes into a working guest.
        client.resume_microvm(microvmIdentifier=suspended[2])
        wait_for_state(client, suspended[2], "RUNNING", timeout=60)
        assert exec_request(server, account, suspended[2], ["echo", "ok"]).json()["stdout"] == "b2sK"

        for microvm_id in everything:
            client.terminate_microvm(microvmIdentifier=microvm_id)
        final = wait_all(client, everything, {"TERMINATED"}, timeout=120)
        assert set(final.values()) == {"TERMINATED"}
        assert qemu_vm_dirs(data) == {}
    finally:
        stop_server(proc)
        kill_qemu_under(f"{data}/")


def test_interrupted_suspend_keeps_the_microvm(fleet):
    """A suspend cut short by kill -9 of the server leaves a live, paused QEMU
    writing suspend.state; the restarted server should finish the suspend
    (SUSPENDED) or undo it (RUNNING), not throw the microVM away."""
    data, account = fleet["data_dir"], fleet["account"]
    proc, url = start_server(data, *FAST_RATES)
    try:
        server = {"url": url, "data_dir": data}
        client = client_for(server, account)
        microvm_id = client.run_microvm(imageIdentifier="fleet")["microvmId"]
        wait_for_state(client, microvm_id, "RUNNING")
        vm_dir = data / "engine/vms" / vm_dir_name(microvm_id)
        client.suspend_microvm(microvmIdentifier=microvm_id)
        time.sleep(0.03)
        proc.kill()
        proc.wait()
        # The premise: the suspend was under way (record SUSPENDING, QEMU alive).
        if json.loads((vm_dir / "vm.json").read_text())["state"] != "running" or not qemu_processes(f"{vm_dir}/"):
            pytest.skip("the suspend finished before the server was killed")

        proc, url = start_server(data, *FAST_RATES)
        server["url"] = url
        client = client_for(server, account)
        got, _ = wait_for_state(client, microvm_id, {"RUNNING", "SUSPENDED", "TERMINATED"}, timeout=60)
        client.terminate_microvm(microvmIdentifier=microvm_id)
        assert got["state"] in ("RUNNING", "SUSPENDED"), got
    finally:
        stop_server(proc)
        kill_qemu_under(f"{data}/")
