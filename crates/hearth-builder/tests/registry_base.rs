//! FROM an image of a real OCI registry (Debian's `docker-registry` on
//! loopback): the image is pulled, made a base disk, built upon in a VM, and
//! its config (Env, WorkingDir, Cmd) carries into the result. The image has
//! no shell at all, so COPY goes through the agent's file writes.
//! Needs `scripts/setup-host`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

mod common;

use common::Lines;
use hearth_api::BuildFailure;
use hearth_builder::oci::BaseError;
use hearth_builder::run::{Base, BaseResolver, BuildLog, BuildRequest, Builder};
use hearth_oci::RegistryConfig;
use hearth_vm::{Driver, MachineShape};

// The registry and image pusher of hearth-oci's tests (it allows its own dead code).
#[path = "../../hearth-oci/tests/support/mod.rs"]
mod support;

struct RegistryBases {
    config: RegistryConfig,
    cache: PathBuf,
}

impl BaseResolver for RegistryBases {
    async fn resolve(&self, image: &str, log: &dyn BuildLog) -> Result<Base, BaseError> {
        hearth_builder::oci::registry_base(&self.config, image, &self.cache, log).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_a_registry_image() {
    let registry = support::LocalRegistry::start();
    let layer = support::LayerBuilder::new()
        .dir("etc")
        .file(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/srv:/bin/sh\n",
        )
        .file("etc/group", b"root:x:0:\napp:x:1000:\n")
        .dir("srv")
        .file_with("srv/owned.txt", b"from the image\n", 0o640, (1000, 1000))
        .tar();
    support::push_image(
        &registry,
        "tiny",
        "1",
        support::OCI_MANIFEST,
        &[(
            "application/vnd.oci.image.layer.v1.tar+gzip",
            layer.clone(),
            support::gzip(&layer),
        )],
        serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["FROM_IMAGE=yes"], "WorkingDir": "/srv", "Cmd": ["/srv/app"]},
        }),
    );

    let (state, _assets, driver) = common::driver("hbo");
    let builder = Builder::new(
        std::sync::Arc::new(driver.clone()),
        &state.path().join("cache"),
    )
    .expect("builder");
    let ctx = state.path().join("ctx");
    std::fs::create_dir_all(&ctx).expect("mkdir");
    let dockerfile = format!(
        "FROM {}/tiny:1\nCOPY --chown=app hello.txt ./\nENV MORE=1\n",
        registry.addr
    );
    std::fs::write(ctx.join("Dockerfile"), &dockerfile).expect("write");
    std::fs::write(ctx.join("hello.txt"), "hello\n").expect("write");
    let bases = RegistryBases {
        config: RegistryConfig {
            registry: registry.addr.clone(),
            insecure_http: true,
            username: None,
            password: None,
        },
        cache: state.path().join("cache"),
    };
    let request = BuildRequest {
        context: ctx.clone(),
        dockerfile,
        build_args: HashMap::new(),
        vm_prefix: "bo".into(),
        shape: MachineShape::default(),
        network: false,
        cache_scope: "111122223333".into(),
        step_timeout: Duration::from_secs(300),
        build_timeout: Duration::from_secs(600),
    };
    let log = Lines::default();
    let built = builder
        .build(&request, &bases, &log)
        .await
        .unwrap_or_else(|e| panic!("build failed: {}\n{}", BuildFailure::from(&e), log.text()));
    assert_eq!(built.steps_run, 1, "{}", log.text());
    assert_eq!(built.config.env_value("FROM_IMAGE"), Some("yes"));
    assert_eq!(built.config.env_value("MORE"), Some("1"));
    assert_eq!(built.config.cwd(), "/srv");
    assert_eq!(built.config.command(), ["/srv/app"]);

    let (vm, agent) = common::boot_built(&driver, &built.disk).await;
    let mut hello = Vec::new();
    agent
        .read_file("/srv/hello.txt", &mut hello)
        .await
        .expect("read");
    assert_eq!(hello, b"hello\n");
    let mut owned = Vec::new();
    let (_, mode) = agent
        .read_file("/srv/owned.txt", &mut owned)
        .await
        .expect("read");
    assert_eq!(owned, b"from the image\n");
    assert_eq!(mode & 0o777, 0o640);
    drop(agent);
    driver.remove(&vm).await.expect("remove");

    // Again: the layers come from the blob cache and the step from the step cache.
    let log2 = Lines::default();
    let again = builder
        .build(&request, &bases, &log2)
        .await
        .expect("rebuild");
    assert_eq!(
        (again.steps_run, again.steps_cached),
        (0, 1),
        "{}",
        log2.text()
    );
    assert!(!log2.text().contains("downloading"), "{}", log2.text());

    // An image the registry does not have fails the build, naming it.
    let missing = BuildRequest {
        dockerfile: format!("FROM {}/nothing:here\n", registry.addr),
        ..request.clone()
    };
    let err = builder
        .build(&missing, &bases, &Lines::default())
        .await
        .expect_err("must fail");
    let reason = BuildFailure::from(&err).to_string();
    assert!(reason.contains("nothing"), "{reason}");
}
