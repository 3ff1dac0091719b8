"""A hearth server killed with SIGKILL in the middle of microVM operations, then
started again on the same data directory: running VMs are adopted (same QEMU
process), suspended ones stay suspended, every accepted change is carried out
(a launch answered PENDING ends RUNNING, an accepted suspend SUSPENDED, a
resume RUNNING, a terminate TERMINATED), and every RUNNING microVM has exactly
one QEMU process."""
import json
import time

import pytest

from conftest import (FAST_RATES, IDLE_CMD, client_for, create_account, exec_request, import_image, kill_qemu_under,
                      qemu_processes, qemu_vm_dirs, short_data_dir, start_server, stop_server, vm_dir_name,
                      wait_for_state)

# Host admission keeps room for every running VM's peak (a 256 MiB import
# bursts to 1 GiB, plus QEMU's overhead), so the fleet is sized for a 24 GiB
# CI host with the in-flight launches on top: 12 (20 were refused there).
FLEET = 12
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
    """12 microVMs running, 3 of them then suspended, a burst of run/suspend/resume/terminate
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
        # Launches may start over from the snapshot: give them a launch's time.
        after = wait_all(client, everything, SETTLED, timeout=240)

        running = {i for i in everything if after[i] == "RUNNING"}
        # Accepted terminations were finished; untouched VMs were adopted as
        # they were, in the same QEMU process; an untouched suspended VM stays so.
        for microvm_id in (ids[5], ids[6], suspended[1]):
            got = client.get_microvm(microvmIdentifier=microvm_id)
            assert (got["state"], got.get("stateReason")) == ("TERMINATED", "Success."), got
        assert all(after[i] == "RUNNING" for i in untouched), {i: after[i] for i in untouched}
        assert after[suspended[2]] == "SUSPENDED"
        # What was accepted before the kill is carried out: the launches run,
        # the suspends happened, the resume too.
        assert all(after[i] == "RUNNING" for i in started), {i: after[i] for i in started}
        assert (after[ids[3]], after[ids[4]]) == ("SUSPENDED", "SUSPENDED")
        assert after[suspended[0]] == "RUNNING"
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


@pytest.mark.parametrize("delay", [0.03, 0.5])
def test_interrupted_suspend_is_carried_out(fleet, delay):
    """A suspend cut short by kill -9 of the server leaves a live, paused QEMU
    writing suspend.state (at 0.03 s), or a clone's state half converted to
    the lean format (at 0.5 s: a second QEMU loading it, the first one's
    sockets set aside); the restarted server suspends it (the partial files
    are never taken for a saved state) and it resumes into a working guest."""
    data, account = fleet["data_dir"], fleet["account"]
    proc, url = start_server(data, *FAST_RATES)
    try:
        server = {"url": url, "data_dir": data}
        client = client_for(server, account)
        microvm_id = client.run_microvm(imageIdentifier="fleet")["microvmId"]
        wait_for_state(client, microvm_id, "RUNNING")
        vm_dir = data / "engine/vms" / vm_dir_name(microvm_id)
        client.suspend_microvm(microvmIdentifier=microvm_id)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        # The premise: the suspend was under way (record SUSPENDING, QEMU alive).
        if json.loads((vm_dir / "vm.json").read_text())["state"] != "running" or not qemu_processes(f"{vm_dir}/"):
            pytest.skip("the suspend finished before the server was killed")

        proc, url = start_server(data, *FAST_RATES)
        server["url"] = url
        client = client_for(server, account)
        got, _ = wait_for_state(client, microvm_id, {"SUSPENDED", "TERMINATED"}, timeout=120)
        assert got["state"] == "SUSPENDED", got
        assert not qemu_processes(f"{vm_dir}/")
        client.resume_microvm(microvmIdentifier=microvm_id)
        wait_for_state(client, microvm_id, "RUNNING", timeout=120)
        assert exec_request(server, account, microvm_id, ["echo", "ok"]).json()["stdout"] == "b2sK"
        client.terminate_microvm(microvmIdentifier=microvm_id)
    finally:
        stop_server(proc)
        kill_qemu_under(f"{data}/")


@pytest.mark.parametrize("delay", [0.05, 0.4, 1.5])
def test_kill9_mid_launch_mid_resume_mid_terminate_carries_each_out(fleet, delay):
    """kill -9 at a few moments after RunMicrovm, ResumeMicrovm and
    TerminateMicrovm were answered: after the restart the launch is RUNNING,
    the resume RUNNING, the terminate TERMINATED (reason Success.), with one
    QEMU per RUNNING microVM and none for the others."""
    data, account = fleet["data_dir"], fleet["account"]
    proc, url = start_server(data, *FAST_RATES)
    try:
        server = {"url": url, "data_dir": data}
        client = client_for(server, account)
        to_resume = client.run_microvm(imageIdentifier="fleet")["microvmId"]
        to_terminate = client.run_microvm(imageIdentifier="fleet")["microvmId"]
        wait_all(client, [to_resume, to_terminate], {"RUNNING"}, timeout=240)
        client.suspend_microvm(microvmIdentifier=to_resume)
        wait_for_state(client, to_resume, "SUSPENDED", timeout=120)

        launched = client.run_microvm(imageIdentifier="fleet", clientToken=f"crash-{delay}")["microvmId"]
        client.resume_microvm(microvmIdentifier=to_resume)
        client.terminate_microvm(microvmIdentifier=to_terminate)
        time.sleep(delay)
        proc.kill()
        proc.wait()

        proc, url = start_server(data, *FAST_RATES)
        server["url"] = url
        client = client_for(server, account)
        after = wait_all(client, [launched, to_resume, to_terminate], SETTLED, timeout=240)
        assert (after[launched], after[to_resume], after[to_terminate]) == ("RUNNING", "RUNNING", "TERMINATED"), after
        assert client.get_microvm(microvmIdentifier=to_terminate).get("stateReason") == "Success."
        # The same clientToken names the same microVM: no second one was made.
        again = client.run_microvm(imageIdentifier="fleet", clientToken=f"crash-{delay}")["microvmId"]
        assert again == launched
        vm_dirs = sorted(qemu_vm_dirs(data).values())
        assert vm_dirs == sorted([vm_dir_name(launched), vm_dir_name(to_resume)]), vm_dirs
        for microvm_id in (launched, to_resume):
            assert exec_request(server, account, microvm_id, ["echo", "ok"]).json()["stdout"] == "b2sK"
            client.terminate_microvm(microvmIdentifier=microvm_id)
        wait_all(client, [launched, to_resume], {"TERMINATED"}, timeout=120)
        assert qemu_vm_dirs(data) == {}
    finally:
        stop_server(proc)
        kill_qemu_under(f"{data}/")


def test_a_process_named_like_hearths_qemu_is_left_alone_by_a_restart(fleet, tmp_path):
    """Any local user can start a process whose command line reads like one of
    hearth's QEMUs, pointing its RAM file at something worth deleting. A
    restarted server (which kills stray QEMUs and deletes their RAM files as
    root) must neither kill such a process nor delete that file: only
    processes of the jail's uids are hearth's."""
    import os
    import pathlib
    import signal
    import subprocess

    data, account = fleet["data_dir"], fleet["account"]
    ram_dir = pathlib.Path(os.environ["HEARTH_RAM_DIR"])
    ram_dir.mkdir(parents=True, exist_ok=True)
    vm_dir = pathlib.Path(data) / "engine" / "vms" / "impostor"
    vm_dir.mkdir(parents=True, exist_ok=True)
    # The two files a claim would delete: the RAM file at the exact name a
    # claimed instance's would have, and an outside file behind a hostile path.
    ram_victim = ram_dir / "0badc0de0badc0de.ram"
    ram_victim.write_text("precious")
    outside = tmp_path / "shadow"
    outside.write_text("precious")
    crafted = []
    escape = str(ram_dir) + "/.." * (len(ram_dir.parts) - 1) + str(outside)
    for mem_path in (ram_victim, escape):
        # sh runs the sleep (and stays, for the trailing `:`); argv[0] and the
        # rest are what /proc shows.
        argv = ["qemu-system-x86_64", "-c", "sleep 600; :",
                "-name", "hearth-0badc0de0badc0de",
                "-object", f"memory-backend-file,id=mem,size=256M,mem-path={mem_path},share=on",
                "-serial", f"file:{vm_dir}/console.log"]
        crafted.append(subprocess.Popen(argv, executable="/bin/sh", user=65534, group=65534,
                                        start_new_session=True, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        time.sleep(0.5)
        assert all(p.poll() is None for p in crafted), "the crafted processes did not start"
        cmdline = pathlib.Path(f"/proc/{crafted[0].pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[0] == b"qemu-system-x86_64" and b"-name" in cmdline, cmdline
        proc, url = start_server(data, *FAST_RATES)
        try:
            client = client_for({"url": url, "data_dir": data}, account)
            # Reconcile has run once the API answers; give it a moment more.
            vm = client.run_microvm(imageIdentifier="fleet")["microvmId"]
            wait_for_state(client, vm, "RUNNING", timeout=180)
            client.terminate_microvm(microvmIdentifier=vm)
            wait_for_state(client, vm, "TERMINATED", timeout=120)
        finally:
            stop_server(proc)
        assert all(p.poll() is None for p in crafted), "a restart killed a process it does not own"
        assert ram_victim.read_text() == "precious"
        assert outside.read_text() == "precious"
    finally:
        for p in crafted:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
        ram_victim.unlink(missing_ok=True)
