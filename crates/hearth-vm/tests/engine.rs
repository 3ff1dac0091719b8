//! Library-level end-to-end tests: real guests under QEMU, driven through the
//! `Driver` API and the warm pool. Needs `scripts/setup-host` and
//! the agent built into hearth-vm (as `scripts/test` does).

mod common;

use std::time::Duration;

use common::sh;
use hearth_vm::pool::{LaunchPath, PoolMode, WarmPool};
use hearth_vm::{Assets, BootRequest, Driver, MachineShape, QemuDriver, VmError};

fn driver(state: &std::path::Path) -> QemuDriver {
    let assets = Assets {
        state_dir: state.to_path_buf(),
        ..Assets::from_env()
    };
    QemuDriver::new(assets).expect("driver")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_launches_and_failures() {
    let state = tempfile::Builder::new()
        .prefix("hvm")
        .tempdir_in("/tmp")
        .expect("state dir");
    let driver = driver(state.path());
    let source = driver
        .boot(&BootRequest {
            name: "src".into(),
            image: "debian-12".into(),
            shape: MachineShape::default(),
        })
        .await
        .expect("boot");
    let agent = driver.agent(&source).await.expect("agent");
    sh(&agent, "echo from-source > /root/origin").await;
    drop(agent);
    let snapshot = driver
        .snapshot(&source, &state.path().join("snap"))
        .await
        .expect("snapshot");

    for mode in [PoolMode::Prewarmed, PoolMode::Deferred] {
        let pool = WarmPool::new(driver.clone(), snapshot.clone(), mode, 1);
        assert!(
            pool.wait_full(Duration::from_secs(60)).await,
            "{mode:?} pool never filled"
        );
        let tag = format!("{mode:?}").to_lowercase();
        let (a, agent_a, path_a) = pool.launch(&format!("{tag}-a")).await.expect("launch a");
        assert_eq!(path_a, LaunchPath::Warm);
        assert!(
            pool.wait_full(Duration::from_secs(60)).await,
            "{mode:?} pool did not refill"
        );
        // The name is taken: refused, and the warm slot stays in the pool.
        let err = pool
            .launch(&format!("{tag}-a"))
            .await
            .expect_err("duplicate name");
        assert!(matches!(err, VmError::Exists(_)), "{err}");
        assert_eq!(pool.ready(), 1);
        let (b, agent_b, _) = pool.launch(&format!("{tag}-b")).await.expect("launch b");

        assert_eq!(sh(&agent_a, "cat /root/origin").await, "from-source");
        assert_eq!(sh(&agent_b, "cat /root/origin").await, "from-source");
        // `restored` reseeded each clone's RNG: identical snapshots, different bytes.
        let rand_a = sh(&agent_a, "head -c 16 /dev/urandom | od -An -tx1").await;
        let rand_b = sh(&agent_b, "head -c 16 /dev/urandom | od -An -tx1").await;
        assert_ne!(rand_a, rand_b, "clones share RNG output");
        // And set the clock to the host's.
        let guest: u64 = sh(&agent_a, "date +%s").await.parse().expect("date");
        let host = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        assert!(
            guest.abs_diff(host) <= 2,
            "guest clock {guest}, host {host}"
        );

        // Listed by name, and removed without a trace (symlink and directory).
        let names: Vec<String> = driver
            .list()
            .expect("list")
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert!(
            names.contains(&a.name) && names.contains(&b.name),
            "{names:?}"
        );
        pool.shutdown().await;
        for vm in [&a, &b] {
            driver.remove(vm).await.expect("remove");
            assert!(!vm.dir.exists());
            assert!(!state.path().join("vms").join(&vm.name).exists());
        }
    }

    // A TCP stream to a port inside a guest, over the agent channel (no guest NIC).
    let (web, web_agent) = driver
        .launch_with_agent(&snapshot, "web")
        .await
        .expect("launch web");
    sh(
        &web_agent,
        "cd /root && nohup python3 -m http.server 8080 --bind 127.0.0.1 >/dev/null 2>&1 &",
    )
    .await;
    let mut stream = None;
    for _ in 0..200 {
        match web_agent.connect_tcp(8080).await {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(err) => {
                assert_eq!(
                    err.remote_kind(),
                    Some(hearth_proto::ErrorKind::ConnectionRefused),
                    "{err}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let mut stream = stream.expect("http server never listened");
    let sender = stream.sender();
    sender
        .send_data(bytes::Bytes::from_static(b"GET /origin HTTP/1.0\r\n\r\n"))
        .await
        .expect("send");
    sender.send_eof().await.expect("eof");
    let mut response = Vec::new();
    loop {
        let frame = stream.recv().await.expect("response");
        match frame.kind {
            hearth_proto::FrameKind::Data => response.extend_from_slice(&frame.payload),
            hearth_proto::FrameKind::Eof => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.0 200"), "{response}");
    assert!(response.ends_with("from-source\n"), "{response}");
    drop(stream);
    driver.remove(&web).await.expect("remove web");

    // A clone's suspend. Its RAM is a private mapping of the snapshot, so the
    // suspend streams it out and turns the stream into the lean format: the
    // RAM kept as a sparse file that the resume maps, a state without RAM.
    // When the conversion fails (here its state file's name is taken by a
    // directory, so its second QEMU fails to save), the suspend keeps the
    // stream format of every suspend before the lean one, which resume still
    // reads. The mark lives in guest RAM (a tmpfs), so only a restored RAM
    // has it.
    use std::os::unix::fs::MetadataExt;
    for (name, converts) in [("lean", true), ("stream", false)] {
        let (mut vm, agent) = driver
            .launch_with_agent(&snapshot, name)
            .await
            .expect("launch");
        sh(
            &agent,
            "mkdir -p /mnt/ram && mount -t tmpfs ram /mnt/ram && echo in-ram > /mnt/ram/mark",
        )
        .await;
        drop(agent);
        let blocker = vm.dir.join("suspend.lean");
        if !converts {
            std::fs::create_dir(&blocker).expect("blocker");
        }
        let before = driver.processes().len();
        driver.suspend(&mut vm).await.expect("suspend");
        let state_len = std::fs::metadata(vm.suspend_state()).expect("state").len();
        if converts {
            assert_eq!(vm.suspended_memory, Some(vm.memory_file()));
            assert!(state_len < 4 << 20, "state without RAM: {state_len} bytes");
            let memory = std::fs::metadata(vm.memory_file()).expect("memory file");
            assert_eq!(memory.len(), u64::from(vm.shape.memory_mib) << 20);
            let allocated = memory.blocks() * 512;
            assert!(
                allocated < memory.len() / 2,
                "sparse: {allocated} of {} bytes",
                memory.len()
            );
            assert!(!blocker.exists());
        } else {
            assert_eq!(vm.suspended_memory, None);
            assert!(state_len > 16 << 20, "RAM in the stream: {state_len} bytes");
            assert!(!vm.memory_file().exists());
            std::fs::remove_dir(&blocker).expect("blocker");
        }
        // The suspended QEMU and the converting one are gone, and the
        // sockets set aside during the conversion too.
        assert_eq!(driver.processes().len(), before - 1);
        for aside in ["qmp.sock.suspending", "agent.sock.suspending"] {
            assert!(!vm.dir.join(aside).exists(), "{aside} left");
        }
        driver.resume(&mut vm).await.expect("resume");
        let agent = driver.agent(&vm).await.expect("agent");
        assert_eq!(sh(&agent, "cat /mnt/ram/mark").await, "in-ram");
        drop(agent);
        driver.remove(&vm).await.expect("remove");
    }
    // A server killed while a suspend converted its clone's state leaves the
    // QEMU's sockets under the names they are set aside to; recovery (the
    // restarted server's, for a VM whose agent does not answer) gives them
    // back.
    let (aside, agent) = driver
        .launch_with_agent(&snapshot, "aside")
        .await
        .expect("launch");
    drop(agent);
    for socket in ["qmp.sock", "agent.sock"] {
        std::fs::rename(
            aside.dir.join(socket),
            aside.dir.join(format!("{socket}.suspending")),
        )
        .expect("set aside");
    }
    assert!(!aside.agent_socket().exists() && !aside.qmp_socket().exists());
    driver.recover(&aside).await.expect("recover");
    let agent = driver.agent(&aside).await.expect("agent");
    assert_eq!(sh(&agent, "echo back").await, "back");
    drop(agent);
    driver.remove(&aside).await.expect("remove aside");

    // A QEMU that dies is a clear error for that VM only.
    let (victim, _agent) = driver
        .launch_with_agent(&snapshot, "victim")
        .await
        .expect("launch victim");
    let (bystander, bystander_agent) = driver
        .launch_with_agent(&snapshot, "bystander")
        .await
        .expect("launch bystander");
    let pid = victim.pid.expect("pid");
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!driver.is_alive(&victim));
    let mut victim = driver.load("victim").expect("load victim");
    let err = driver
        .suspend(&mut victim)
        .await
        .expect_err("suspend of a dead VM");
    assert!(matches!(err, VmError::BadState { .. }), "{err}");
    assert_eq!(sh(&bystander_agent, "echo still-here").await, "still-here");
    driver.remove(&victim).await.expect("remove victim");
    driver.remove(&bystander).await.expect("remove bystander");
    driver.remove(&source).await.expect("remove source");
    let left: Vec<_> = std::fs::read_dir(state.path().join("vms"))
        .expect("vms")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
