//! Pulls from a real registry (Debian's `docker-registry`) on loopback: an
//! image pushed through the distribution API by the test, pulled, pulled again
//! from the cache, through an index, by digest, and with a tampered blob.

mod support;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Mutex;

use hearth_oci::{
    parse_reference, pull, BlobError, Limits, OciError, PulledImage, RegistryConfig, RegistryError,
};
use support::*;

const NAME: &str = "hearth/test-app";

fn config_for(registry: &LocalRegistry) -> RegistryConfig {
    RegistryConfig {
        registry: registry.addr.clone(),
        insecure_http: true,
        username: None,
        password: None,
    }
}

/// Pulls `reference` into a fresh directory under `work`; returns the
/// result and the progress lines.
async fn pull_into(
    registry: &LocalRegistry,
    reference: &str,
    cache: &Path,
    dest: &Path,
) -> (Result<PulledImage, OciError>, Vec<String>) {
    fs::create_dir_all(dest).expect("dest");
    let lines = Mutex::new(Vec::new());
    let progress = |line: &str| lines.lock().expect("lines").push(line.to_owned());
    let reference = parse_reference(reference).expect("reference");
    let result = pull(
        &config_for(registry),
        &reference,
        cache,
        dest,
        &Limits::default(),
        &progress,
    )
    .await;
    (result, lines.into_inner().expect("lines"))
}

fn downloads(lines: &[String]) -> usize {
    lines
        .iter()
        .filter(|l| l.starts_with("downloading "))
        .count()
}

/// Pushes the two-layer test image as `v1` (OCI) and an index `multi`
/// (arm64 + amd64) pointing at it; returns (manifest digest, index digest).
fn push_test_image(registry: &LocalRegistry) -> (String, String) {
    let lower = LayerBuilder::new()
        .dir("etc/")
        .file("etc/os-release", b"NAME=hearth-test-1\n")
        .dir("app/")
        .file("app/old.txt", b"old")
        .file("app/keep.txt", b"keep")
        .file_with("app/run.sh", b"#!/bin/sh\necho hi\n", 0o755, (0, 0))
        .dir("usr/")
        .dir("usr/bin/")
        .file_with("usr/bin/tool", b"tool", 0o4755, (0, 0))
        .symlink("bin", "usr/bin")
        .file_with("home/user/notes", b"mine", 0o600, (1000, 1000))
        .tar();
    let upper = LayerBuilder::new()
        .dir("app/")
        .file("app/.wh.old.txt", b"")
        .file("app/new.txt", b"new")
        .file("etc/os-release", b"NAME=hearth-test-2\n")
        .tar();
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=hello"],
            "Cmd": ["/app/run.sh"],
            "WorkingDir": "/app",
            "ExposedPorts": {"8080/tcp": {}},
            "Labels": {"org.example.test": "yes"},
        },
    });
    let (manifest_digest, manifest_bytes) = push_image(
        registry,
        NAME,
        "v1",
        OCI_MANIFEST,
        &[
            (
                "application/vnd.oci.image.layer.v1.tar+gzip",
                lower.clone(),
                gzip(&lower),
            ),
            (
                "application/vnd.oci.image.layer.v1.tar+zstd",
                upper.clone(),
                zstd(&upper),
            ),
        ],
        config,
    );

    // An arm64 image for the index (one Docker-typed layer), then the index.
    let arm_layer = LayerBuilder::new().file("arm", b"arm").tar();
    let (arm_digest, arm_bytes) = push_image(
        registry,
        NAME,
        "arm",
        DOCKER_MANIFEST,
        &[(
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
            arm_layer.clone(),
            gzip(&arm_layer),
        )],
        serde_json::json!({"architecture": "arm64", "os": "linux", "config": {}}),
    );
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": DOCKER_MANIFEST, "digest": arm_digest, "size": arm_bytes.len(),
             "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}},
            {"mediaType": OCI_MANIFEST, "digest": manifest_digest, "size": manifest_bytes.len(),
             "platform": {"architecture": "amd64", "os": "linux"}},
        ],
    });
    let index_bytes = serde_json::to_vec(&index).expect("index");
    let index_digest = registry.push_manifest(NAME, "multi", OCI_INDEX, &index_bytes);
    (manifest_digest, index_digest)
}

fn check_tree(root: &Path) {
    let read = |p: &str| fs::read(root.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    assert_eq!(
        read("etc/os-release"),
        b"NAME=hearth-test-2\n",
        "the upper layer overwrites"
    );
    assert!(
        !root.join("app/old.txt").exists(),
        "the whiteout removes old.txt"
    );
    assert_eq!(read("app/keep.txt"), b"keep");
    assert_eq!(read("app/new.txt"), b"new");
    let run = fs::metadata(root.join("app/run.sh")).expect("run.sh");
    assert_eq!(run.permissions().mode() & 0o7777, 0o755);
    assert_eq!(run.mtime(), 1_700_000_000);
    assert_eq!(
        fs::metadata(root.join("usr/bin/tool"))
            .expect("tool")
            .mode()
            & 0o7777,
        0o4755
    );
    assert_eq!(
        fs::read_link(root.join("bin")).expect("bin"),
        Path::new("usr/bin")
    );
    assert_eq!(read("home/user/notes"), b"mine");
}

fn check_image(image: &PulledImage, manifest_digest: &str) {
    assert_eq!(image.manifest_digest, manifest_digest);
    let config = &image.config;
    assert_eq!(
        config.env,
        ["PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=hello"]
    );
    assert_eq!(config.cmd.as_deref(), Some(&["/app/run.sh".to_owned()][..]));
    assert_eq!(config.entrypoint, None);
    assert_eq!(config.working_dir.as_deref(), Some("/app"));
    assert_eq!(config.exposed_ports, ["8080/tcp"]);
    assert_eq!(
        config.labels.get("org.example.test").map(String::as_str),
        Some("yes")
    );
    assert_eq!(image.owners.len(), 1, "{:?}", image.owners);
    let owner = &image.owners[0];
    assert_eq!(owner.path, Path::new("home/user/notes"));
    assert_eq!((owner.uid, owner.gid, owner.mode), (1000, 1000, 0o600));
    assert_eq!(image.stats.layers, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_from_a_real_registry() {
    let registry = LocalRegistry::start();
    let (manifest_digest, index_digest) = push_test_image(&registry);
    let work = tempfile::tempdir().expect("work");
    let cache = work.path().join("cache");

    // First pull: config and both layers are downloaded.
    let (result, lines) = pull_into(
        &registry,
        &format!("{NAME}:v1"),
        &cache,
        &work.path().join("one"),
    )
    .await;
    let image = result.unwrap_or_else(|e| panic!("pull: {e:?}\n{}", registry.log()));
    check_tree(&work.path().join("one"));
    check_image(&image, &manifest_digest);
    assert_eq!(image.digest, manifest_digest);
    assert_eq!(image.stats.blobs_downloaded, 3, "{lines:?}");
    assert_eq!(downloads(&lines), 3, "{lines:?}");
    assert!(
        lines.iter().any(|l| l.starts_with("unpacking layer 2/2")),
        "{lines:?}"
    );
    let manifest_hex = manifest_digest.trim_start_matches("sha256:");
    assert!(
        cache.join("blobs/sha256").join(manifest_hex).exists(),
        "manifest cached"
    );

    // Second pull, same cache: nothing downloaded, same tree.
    let (result, lines) = pull_into(
        &registry,
        &format!("{NAME}:v1"),
        &cache,
        &work.path().join("two"),
    )
    .await;
    let image = result.expect("second pull");
    assert_eq!(downloads(&lines), 0, "{lines:?}");
    assert_eq!(image.stats.blobs_downloaded, 0);
    assert_eq!(image.stats.blobs_cached, 3);
    check_tree(&work.path().join("two"));

    // Through the index: linux/amd64 is picked; the reported digest is the
    // index's. Still nothing to download.
    let (result, lines) = pull_into(
        &registry,
        &format!("{NAME}:multi"),
        &cache,
        &work.path().join("three"),
    )
    .await;
    let image = result.expect("index pull");
    assert_eq!(image.digest, index_digest);
    check_image(&image, &manifest_digest);
    assert_eq!(downloads(&lines), 0, "{lines:?}");
    check_tree(&work.path().join("three"));

    // By digest (with a registry-qualified name), into a fresh cache.
    let reference = format!("{}/{NAME}@{manifest_digest}", registry.addr);
    let (result, lines) = pull_into(
        &registry,
        &reference,
        &work.path().join("cache2"),
        &work.path().join("four"),
    )
    .await;
    let image = result.expect("digest pull");
    assert_eq!(image.digest, manifest_digest);
    assert_eq!(downloads(&lines), 3, "{lines:?}");
    check_tree(&work.path().join("four"));

    // A corrupt cached blob is detected and downloaded again.
    let layer_digest = image_layer_digests(&registry, "v1")[1].clone();
    let cached_layer = cache
        .join("blobs/sha256")
        .join(layer_digest.trim_start_matches("sha256:"));
    let mut bytes = fs::read(&cached_layer).expect("cached layer");
    bytes[0] ^= 0xff;
    fs::write(&cached_layer, &bytes).expect("corrupt cache");
    let (result, lines) = pull_into(
        &registry,
        &format!("{NAME}:v1"),
        &cache,
        &work.path().join("five"),
    )
    .await;
    result.expect("pull after cache corruption");
    assert_eq!(downloads(&lines), 1, "{lines:?}");
    check_tree(&work.path().join("five"));

    // Unknown tags and repositories are errors naming what is missing.
    let (result, _) = pull_into(
        &registry,
        &format!("{NAME}:nope"),
        &cache,
        &work.path().join("six"),
    )
    .await;
    let err = result.expect_err("unknown tag");
    assert!(
        matches!(err, OciError::Registry(RegistryError::NotFound(_))),
        "{err:?}"
    );
    assert!(
        std::error::Error::source(&err).is_some_and(|s| s.to_string().contains("nope")),
        "{err}"
    );

    // The arm64-only image is refused.
    let (result, _) = pull_into(
        &registry,
        &format!("{NAME}:arm"),
        &cache,
        &work.path().join("seven"),
    )
    .await;
    assert!(matches!(result, Err(OciError::Manifest(_))), "{result:?}");

    // A blob the registry serves with the wrong content is refused and not
    // cached (the registry's own storage is tampered with, same size).
    let stored = registry.blob_data_path(&layer_digest);
    let mut bytes = fs::read(&stored).expect("stored blob");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    fs::write(&stored, &bytes).expect("tamper");
    let fresh_cache = work.path().join("cache3");
    let (result, _) = pull_into(
        &registry,
        &format!("{NAME}:v1"),
        &fresh_cache,
        &work.path().join("eight"),
    )
    .await;
    let err = result.expect_err("tampered blob");
    assert!(
        matches!(&err, OciError::Blob(BlobError::DigestMismatch { digest }) if *digest == layer_digest),
        "{err:?}"
    );
    assert!(!fresh_cache
        .join("blobs/sha256")
        .join(layer_digest.trim_start_matches("sha256:"))
        .exists());
    let leftovers: Vec<_> = fs::read_dir(fresh_cache.join("blobs/sha256"))
        .expect("cache dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "partial downloads left behind");
}

/// The layer digests of a pushed tag, read back through the API.
fn image_layer_digests(registry: &LocalRegistry, tag: &str) -> Vec<String> {
    let response = registry
        .request(
            "GET",
            &format!("/v2/{NAME}/manifests/{tag}"),
            &[("Accept", OCI_MANIFEST)],
            &[],
        )
        .expect("manifest");
    assert_eq!(response.status, 200);
    let manifest: serde_json::Value = serde_json::from_slice(&response.body).expect("json");
    manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["digest"].as_str().expect("digest").to_owned())
        .collect()
}
