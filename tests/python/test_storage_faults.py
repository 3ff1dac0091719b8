"""Storage faults under a real `hearth serve` with real guests.

Power cut: the data directory is an ext4 loop device whose backing file lives
on an XFS loop device; while an image is imported and microVMs run, suspend
and terminate, reflink copies of the backing file are taken at random moments
(`cp --reflink=always`: FICLONE flushes the file and shares its extents at one
instant, so each copy is what the "disk" held at that moment: every write the
ext4 above had fsynced, and only what writeback happened to send of the
rest). The kernel here has no device-mapper (no dm-flakey / dm-log-writes),
and a plain copy of a file being written is torn across moments, which no
power cut produces. Each copy is then mounted at the same path and a server
started on it: it must start, settle every microVM and keep every image and
suspended microVM usable.

Full disk: the data directory is a small ext4 loop device filled up. New work
fails cleanly with an AWS-shaped answer, a running guest whose disk writes hit
ENOSPC is paused by QEMU and continued by the server once space is back, and
everything works again afterwards.

Both need root (mount, losetup); they are skipped without it.
"""
import os
import pathlib
import random
import shutil
import subprocess
import threading
import time
import uuid

import botocore.exceptions
import pytest

from conftest import (FAST_RATES, IDLE_CMD, ROOT, client_for, create_account, exec_request, import_image, kill_qemu_under,
                      qemu_vm_dirs, start_server, stop_server, vm_dir_name, wait_for_state)

SETTLED = {"RUNNING", "SUSPENDED", "TERMINATED"}


def run(*argv, check=True):
    return subprocess.run([str(a) for a in argv], check=check, capture_output=True, text=True, timeout=300)


def can_mount():
    return os.geteuid() == 0 and shutil.which("mkfs.xfs") and shutil.which("losetup")


pytestmark = pytest.mark.skipif(not can_mount(), reason="needs root, losetup and mkfs.xfs (scripts/setup-host)")


def mount_image(image, mountpoint):
    mountpoint.mkdir(parents=True, exist_ok=True)
    run("mount", "-o", "loop", image, mountpoint)


def umount(mountpoint):
    for _ in range(20):
        if run("umount", mountpoint, check=False).returncode == 0:
            return
        time.sleep(0.5)
    run("umount", "-l", mountpoint, check=False)


def fresh_ram_dir():
    """A new RAM directory: after a power cut /dev/shm is empty."""
    ram = pathlib.Path(f"/dev/shm/hearth-pc-{uuid.uuid4().hex[:8]}")
    os.environ["HEARTH_RAM_DIR"] = str(ram)
    return ram


def states(client):
    pages = client.get_paginator("list_microvms").paginate(PaginationConfig={"PageSize": 50})
    return {item["microvmId"]: item["state"] for page in pages for item in page["items"]}


def wait_settled(client, timeout):
    deadline = time.monotonic() + timeout
    while True:
        now = states(client)
        if all(state in SETTLED for state in now.values()):
            return now
        if time.monotonic() > deadline:
            raise AssertionError(f"not settled after {timeout}s: {now}")
        time.sleep(0.5)


@pytest.fixture
def scratch(request):
    """A short directory under /tmp (QEMU's socket paths must stay short)."""
    base = pathlib.Path(f"/tmp/hsf-{uuid.uuid4().hex[:6]}")
    base.mkdir()
    mounts = []
    old_ram = os.environ.get("HEARTH_RAM_DIR")
    rams = []

    def cleanup():
        # The servers' logs outlive the loop devices (for a failure's story).
        keep = ROOT / "target" / "storage-fault-logs"
        keep.mkdir(parents=True, exist_ok=True)
        for log in base.glob("*/serve-*.log"):
            shutil.copy(log, keep / f"{request.node.name}-{log.name}")
        kill_qemu_under(f"{base}/")
        for ram in rams:
            kill_qemu_under(f"{ram}/")
            shutil.rmtree(ram, ignore_errors=True)
        for mountpoint in reversed(mounts):
            umount(mountpoint)
        shutil.rmtree(base, ignore_errors=True)
        if old_ram is None:
            os.environ.pop("HEARTH_RAM_DIR", None)
        else:
            os.environ["HEARTH_RAM_DIR"] = old_ram

    request.addfinalizer(cleanup)
    return {"base": base, "mounts": mounts, "rams": rams}


def test_after_a_power_cut_at_any_point_the_server_starts_consistent(scratch, app_rootfs, model_path):
    base, mounts, rams = scratch["base"], scratch["mounts"], scratch["rams"]
    outer_img, outer = base / "outer.img", base / "x"
    run("truncate", "-s", "12G", outer_img)
    run("mkfs.xfs", "-q", "-m", "reflink=1", outer_img)
    mount_image(outer_img, outer)
    mounts.append(outer)
    disk = outer / "disk.img"
    run("truncate", "-s", "8G", disk)
    run("mkfs.ext4", "-q", "-m", "0", disk)
    data = base / "d"
    mount_image(disk, data)
    mounts.append(data)
    os.chmod(data, 0o700)

    copies = []
    stop = threading.Event()

    def snapshotter():
        # Reflink copies at random moments while the work below runs.
        while not stop.wait(random.uniform(1.0, 6.0)):
            copy = outer / f"cut-{len(copies)}.img"
            if run("cp", "--reflink=always", disk, copy, check=False).returncode == 0:
                copies.append(copy)

    rams.append(fresh_ram_dir())
    proc, url = start_server(data, *FAST_RATES)
    taker = threading.Thread(target=snapshotter, daemon=True)
    try:
        server = {"url": url, "data_dir": data}
        account = create_account(server, "power")
        client = client_for(server, account)
        taker.start()
        import_image(data, account["accountId"], "cut", app_rootfs, IDLE_CMD, memory=256, client=client)
        first = client.run_microvm(imageIdentifier="cut")["microvmId"]
        second = client.run_microvm(imageIdentifier="cut")["microvmId"]
        wait_for_state(client, first, "RUNNING", timeout=180)
        wait_for_state(client, second, "RUNNING", timeout=180)
        client.suspend_microvm(microvmIdentifier=first)
        wait_for_state(client, first, "SUSPENDED", timeout=120)
        third = client.run_microvm(imageIdentifier="cut")["microvmId"]
        client.terminate_microvm(microvmIdentifier=second)
        wait_for_state(client, third, "RUNNING", timeout=180)
        time.sleep(2)
    finally:
        stop.set()
        if taker.is_alive():
            taker.join()
        # The power goes: the server and every guest die at once.
        proc.kill()
        proc.wait()
        kill_qemu_under(f"{data}/")
        umount(data)
        mounts.remove(data)
    # The last copy: the state after all the work, as a cut at the very end.
    final = outer / "cut-final.img"
    run("cp", "--reflink=always", disk, final)
    copies.append(final)
    assert len(copies) >= 3, copies
    # A few cuts spread over the run, and the last one.
    picked = sorted(set(copies[:: max(1, len(copies) // 4)] + copies[-4:]), key=copies.index)

    for number, copy in enumerate(picked):
        mount_image(copy, data)
        mounts.append(data)
        rams.append(fresh_ram_dir())
        proc, url = start_server(data, *FAST_RATES)
        try:
            server = {"url": url, "data_dir": data}
            client = client_for(server, account)
            try:
                images = client.list_microvm_images()["items"]
            except botocore.exceptions.ClientError as err:
                raise AssertionError(f"{copy.name}: {err}") from err
            after = wait_settled(client, timeout=240)
            print(f"{copy.name}: images {[(i['name'], i['state']) for i in images]}, "
                  f"microVMs {sorted(after.values())}")
            # One QEMU per RUNNING microVM, none for the others.
            running = sorted(vm_dir_name(i) for i, s in after.items() if s == "RUNNING")
            assert sorted(qemu_vm_dirs(data).values()) == running, (copy.name, after)
            for microvm_id, state in after.items():
                if state == "TERMINATED":
                    got = client.get_microvm(microvmIdentifier=microvm_id)
                    assert got.get("stateReason"), got
            # Every image the cut kept as usable launches a working guest.
            for image in images:
                if image["state"] not in ("CREATED", "UPDATED") or copy != final and number % 2:
                    continue
                vm = client.run_microvm(imageIdentifier=image["name"])["microvmId"]
                got, _ = wait_for_state(client, vm, {"RUNNING", "TERMINATED"}, timeout=180)
                assert got["state"] == "RUNNING", (copy.name, got)
                assert exec_request(server, account, vm, ["echo", "ok"]).json()["stdout"] == "b2sK"
            # A suspended microVM the cut kept resumes into a working guest.
            for microvm_id, state in after.items():
                if state == "SUSPENDED":
                    client.resume_microvm(microvmIdentifier=microvm_id)
                    got, _ = wait_for_state(client, microvm_id, {"RUNNING", "TERMINATED"}, timeout=180)
                    assert got["state"] == "RUNNING", (copy.name, got)
        finally:
            stop_server(proc)
            kill_qemu_under(f"{data}/")
            umount(data)
            mounts.remove(data)
    # The final cut had the whole story: the suspend was durable.
    assert final in picked


def fill(path):
    """Fills the file system of path to the last block; returns the filler."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 4096):
            chunk = b"\0" * size
            try:
                while True:
                    os.write(fd, chunk)
            except OSError:
                pass
        try:
            os.fsync(fd)
        except OSError:
            pass
    finally:
        os.close(fd)
    return filler


def test_a_full_data_disk_harms_no_running_vm_and_everything_recovers(scratch, app_rootfs, model_path):
    base, mounts, rams = scratch["base"], scratch["mounts"], scratch["rams"]
    disk = base / "disk.img"
    run("truncate", "-s", "5G", disk)
    run("mkfs.ext4", "-q", "-m", "0", disk)
    data = base / "d"
    mount_image(disk, data)
    mounts.append(data)
    os.chmod(data, 0o700)
    rams.append(fresh_ram_dir())
    # The disk is small: the default 2 GiB operator reserve would refuse even
    # the first launch. With 64 MiB, filling the disk is what refuses new work.
    proc, url = start_server(data, *FAST_RATES, "--reserve-disk-mib", "64")
    try:
        server = {"url": url, "data_dir": data}
        account = create_account(server, "full")
        client = client_for(server, account)
        import_image(data, account["accountId"], "full", app_rootfs, IDLE_CMD, memory=256, client=client)
        vm = client.run_microvm(imageIdentifier="full")["microvmId"]
        wait_for_state(client, vm, "RUNNING", timeout=180)

        filler = fill(data)
        # New work fails cleanly: refused with an AWS error, or a launch that
        # ends TERMINATED with its reason; never stuck.
        try:
            refused = client.run_microvm(imageIdentifier="full")["microvmId"]
            got, _ = wait_for_state(client, refused, {"RUNNING", "TERMINATED"}, timeout=120)
            assert got["state"] == "TERMINATED" and got.get("stateReason"), got
        except botocore.exceptions.ClientError as err:
            assert err.response["ResponseMetadata"]["HTTPStatusCode"] >= 400
            # Refused by admission (disk free below the reserve) or by the
            # engine's own ENOSPC check, whichever sees the full disk first.
            message = err.response["Error"]["Message"]
            assert "storage is full" in message or "not enough disk space" in message, err.response
        # A suspend that cannot be written leaves the VM running and no state file.
        try:
            client.suspend_microvm(microvmIdentifier=vm)
        except botocore.exceptions.ClientError:
            pass
        got, _ = wait_for_state(client, vm, {"RUNNING", "SUSPENDED", "TERMINATED"}, timeout=120, interval=0.5)
        assert got["state"] == "RUNNING", got
        assert not (data / "engine/vms" / vm_dir_name(vm) / "suspend.state").exists()

        # The guest writes to its disk: QEMU pauses it on ENOSPC.
        result = {}

        def guest_write():
            result["response"] = exec_request(server, account, vm, [
                "sh", "-c", "dd if=/dev/urandom of=/var/tmp/fill bs=1M count=48 conv=fsync 2>&1 && echo done"],
                timeout=300)

        writer = threading.Thread(target=guest_write)
        writer.start()
        time.sleep(15)
        assert writer.is_alive(), result  # could not finish on a full disk
        filler.unlink()
        writer.join(timeout=240)
        assert not writer.is_alive(), "the guest stayed paused after space returned"
        response = result["response"]
        assert response.status_code == 200 and response.json()["exitCode"] == 0, response.text
        log = pathlib.Path(proc.log_path).read_text()
        assert "disk write error paused the VM; continued" in log, log[-3000:]

        # Everything works again.
        again = client.run_microvm(imageIdentifier="full")["microvmId"]
        wait_for_state(client, again, "RUNNING", timeout=180)
        client.suspend_microvm(microvmIdentifier=vm)
        wait_for_state(client, vm, "SUSPENDED", timeout=120)
        client.resume_microvm(microvmIdentifier=vm)
        wait_for_state(client, vm, "RUNNING", timeout=120)
        assert exec_request(server, account, vm, ["echo", "ok"]).json()["stdout"] == "b2sK"
    finally:
        stop_server(proc)
        kill_qemu_under(f"{data}/")
