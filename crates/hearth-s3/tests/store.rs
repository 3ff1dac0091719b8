//! The store and the builder's fetch, without HTTP.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use hearth_api::{BuildErrorCode, BuildFailure};
use hearth_s3::store::{ListQuery, PutOptions};
use hearth_s3::{ArtifactSource, ArtifactStore, Store, StoreConfig, StoreError};
use s3s::crypto::{Checksum as _, Md5};

type Body = futures::stream::Iter<std::vec::IntoIter<Result<Bytes, std::io::Error>>>;

fn body(chunks: &[&[u8]]) -> Body {
    futures::stream::iter(
        chunks
            .iter()
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect::<Vec<_>>(),
    )
}

fn open(root: &Path, config: StoreConfig) -> Store {
    Store::open(root, config).expect("store opens")
}

async fn put(
    store: &Store,
    account: &str,
    bucket: &str,
    key: &str,
    data: &[u8],
) -> Result<String, StoreError> {
    store
        .put_object(account, bucket, key, PutOptions::default(), body(&[data]))
        .await
        .map(|m| m.etag)
}

async fn get(store: &Store, account: &str, bucket: &str, key: &str) -> Result<Vec<u8>, StoreError> {
    let (meta, file) = store.open_object(account, bucket, key).await?;
    let mut data = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(file, meta.size), &mut data)
        .expect("reads");
    Ok(data)
}

fn md5_hex(data: &[u8]) -> String {
    hex::encode(Md5::checksum(data))
}

/// Every file under `dir`, relative.
fn files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("readdir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(
                    path.strip_prefix(dir)
                        .expect("inside")
                        .display()
                        .to_string(),
                );
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn hostile_keys_stay_inside_the_bucket() {
    let parent = tempfile::tempdir().expect("tempdir");
    let root = parent.path().join("s3");
    let store = open(&root, StoreConfig::default());
    store.create_bucket("A", "bucket").await.expect("bucket");
    let long = "k".repeat(1024);
    let keys = [
        "../x",
        "../../../../etc/passwd",
        "/abs",
        "a",
        "a/b",
        "a/b/",
        "./.",
        "ключ/🙂 with spaces",
        "nul\u{0}byte",
        long.as_str(),
    ];
    for key in keys {
        put(&store, "A", "bucket", key, key.as_bytes())
            .await
            .expect(key);
    }
    for key in keys {
        assert_eq!(
            get(&store, "A", "bucket", key).await.expect(key),
            key.as_bytes()
        );
    }
    // Nothing outside the root; inside it only bucket.json and hashed object names.
    assert_eq!(
        std::fs::read_dir(parent.path()).expect("readdir").count(),
        1,
        "only the root in its parent"
    );
    for file in files(&root) {
        let name = file.rsplit('/').next().unwrap_or_default();
        assert!(
            file == "buckets/bucket/bucket.json"
                || (file.starts_with("buckets/bucket/objects/")
                    && name.len() == 64
                    && name.bytes().all(|b| b.is_ascii_hexdigit())),
            "unexpected file {file}"
        );
    }
    let too_long = "k".repeat(1025);
    assert!(matches!(
        put(&store, "A", "bucket", &too_long, b"x").await,
        Err(StoreError::InvalidKey(_))
    ));
    assert!(matches!(
        put(&store, "A", "bucket", "", b"x").await,
        Err(StoreError::InvalidKey(_))
    ));
    // Bucket names never name paths.
    for bad in ["..", "../buckets", "a/b", "UPPER"] {
        assert!(matches!(
            store.create_bucket("A", bad).await,
            Err(StoreError::InvalidBucketName(_))
        ));
        assert!(matches!(
            store.check_bucket("A", bad).await,
            Err(StoreError::NoSuchBucket)
        ));
    }
    let listing = store
        .list_objects(
            "A",
            "bucket",
            &ListQuery {
                max_keys: 1000,
                ..Default::default()
            },
        )
        .await
        .expect("lists");
    let mut want: Vec<&str> = keys.to_vec();
    want.sort();
    let got: Vec<&str> = listing.objects.iter().map(|m| m.key.as_str()).collect();
    assert_eq!(got, want);
}

#[tokio::test]
async fn buckets_belong_to_accounts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), StoreConfig::default());
    store
        .create_bucket("A", "shared-name")
        .await
        .expect("creates");
    assert!(matches!(
        store.create_bucket("A", "shared-name").await,
        Err(StoreError::BucketAlreadyOwnedByYou)
    ));
    assert!(matches!(
        store.create_bucket("B", "shared-name").await,
        Err(StoreError::BucketAlreadyExists)
    ));
    put(&store, "A", "shared-name", "k", b"data")
        .await
        .expect("owner puts");
    fn denied<T>(r: Result<T, StoreError>) -> bool {
        matches!(r, Err(StoreError::AccessDenied))
    }
    assert!(denied(put(&store, "B", "shared-name", "k2", b"x").await));
    assert!(denied(get(&store, "B", "shared-name", "k").await));
    assert!(denied(
        store
            .head_object("B", "shared-name", "missing")
            .await
            .map(|_| ())
    ));
    assert!(denied(store.delete_object("B", "shared-name", "k").await));
    assert!(denied(
        store
            .list_objects("B", "shared-name", &ListQuery::default())
            .await
            .map(|_| ())
    ));
    assert!(denied(
        store
            .create_upload("B", "shared-name", "k", None, BTreeMap::new())
            .await
            .map(|_| ())
    ));
    assert!(denied(store.delete_bucket("B", "shared-name").await));
    assert!(store.list_buckets("B").await.expect("lists").is_empty());
    let mine = store.list_buckets("A").await.expect("lists");
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0].name, "shared-name");

    assert!(matches!(
        get(&store, "A", "no-such-bucket", "k").await,
        Err(StoreError::NoSuchBucket)
    ));
    assert!(matches!(
        get(&store, "A", "shared-name", "nope").await,
        Err(StoreError::NoSuchKey)
    ));
    assert!(matches!(
        store.delete_bucket("A", "shared-name").await,
        Err(StoreError::BucketNotEmpty)
    ));
    store
        .delete_object("A", "shared-name", "k")
        .await
        .expect("deletes");
    store
        .delete_object("A", "shared-name", "k")
        .await
        .expect("deleting again is fine");
    store
        .delete_bucket("A", "shared-name")
        .await
        .expect("deletes the empty bucket");
    assert!(matches!(
        store.delete_bucket("A", "shared-name").await,
        Err(StoreError::NoSuchBucket)
    ));
    // The name is free again, for anyone; it survives reopening.
    store
        .create_bucket("B", "shared-name")
        .await
        .expect("B takes it");
    drop(store);
    let store = open(dir.path(), StoreConfig::default());
    assert_eq!(
        store
            .bucket("shared-name")
            .await
            .expect("reads")
            .expect("exists")
            .owner,
        "B"
    );
}

#[tokio::test]
async fn overwrite_replaces_and_readers_keep_their_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), StoreConfig::default());
    store.create_bucket("A", "bucket").await.expect("bucket");
    let etag = put(&store, "A", "bucket", "k", b"first version")
        .await
        .expect("puts");
    assert_eq!(etag, md5_hex(b"first version"));
    let (meta, file) = store.open_object("A", "bucket", "k").await.expect("opens");
    put(&store, "A", "bucket", "k", b"second")
        .await
        .expect("overwrites");
    let mut old = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(file, meta.size), &mut old).expect("reads");
    assert_eq!(old, b"first version");
    assert_eq!(
        get(&store, "A", "bucket", "k").await.expect("gets"),
        b"second"
    );
}

#[tokio::test]
async fn size_cap_and_body_checks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(
        dir.path(),
        StoreConfig {
            max_object_bytes: 10,
            min_part_bytes: 4,
            ..Default::default()
        },
    );
    store.create_bucket("A", "bucket").await.expect("bucket");
    put(&store, "A", "bucket", "ok", b"0123456789")
        .await
        .expect("10 bytes fit");
    assert!(matches!(
        store
            .put_object(
                "A",
                "bucket",
                "big",
                PutOptions::default(),
                body(&[b"012345", b"67890"])
            )
            .await,
        Err(StoreError::EntityTooLarge(10))
    ));
    let declared = PutOptions {
        content_length: Some(11),
        ..Default::default()
    };
    assert!(matches!(
        store
            .put_object("A", "bucket", "big", declared, body(&[b"x"]))
            .await,
        Err(StoreError::EntityTooLarge(10))
    ));
    let short = PutOptions {
        content_length: Some(5),
        ..Default::default()
    };
    assert!(matches!(
        store
            .put_object("A", "bucket", "short", short, body(&[b"abc"]))
            .await,
        Err(StoreError::IncompleteBody)
    ));
    let bad_md5 = PutOptions {
        content_md5: Some([0; 16]),
        ..Default::default()
    };
    assert!(matches!(
        store
            .put_object("A", "bucket", "md5", bad_md5, body(&[b"abc"]))
            .await,
        Err(StoreError::BadDigest)
    ));
    let broken: futures::stream::Iter<std::vec::IntoIter<Result<Bytes, std::io::Error>>> =
        futures::stream::iter(vec![
            Ok(Bytes::from_static(b"abc")),
            Err(std::io::Error::other("connection reset")),
        ]);
    assert!(matches!(
        store
            .put_object("A", "bucket", "broken", PutOptions::default(), broken)
            .await,
        Err(StoreError::Body(_))
    ));
    for key in ["big", "short", "md5", "broken"] {
        assert!(
            matches!(
                store.head_object("A", "bucket", key).await,
                Err(StoreError::NoSuchKey)
            ),
            "{key}"
        );
    }
    assert!(
        files(&dir.path().join("tmp")).is_empty(),
        "failed writes leave nothing behind"
    );

    // Multipart: the total is capped too.
    let id = store
        .create_upload("A", "bucket", "mp", None, BTreeMap::new())
        .await
        .expect("upload");
    let e1 = store
        .upload_part(
            "A",
            "bucket",
            "mp",
            &id,
            1,
            PutOptions::default(),
            body(&[b"012345"]),
        )
        .await
        .expect("part 1");
    let e2 = store
        .upload_part(
            "A",
            "bucket",
            "mp",
            &id,
            2,
            PutOptions::default(),
            body(&[b"67890"]),
        )
        .await
        .expect("part 2");
    assert!(matches!(
        store
            .complete_upload("A", "bucket", "mp", &id, &[(1, e1), (2, e2)])
            .await,
        Err(StoreError::EntityTooLarge(10))
    ));
}

#[tokio::test]
async fn multipart_assembles_parts_with_s3_etag() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(
        dir.path(),
        StoreConfig {
            min_part_bytes: 5,
            max_parts: 100,
            ..Default::default()
        },
    );
    store.create_bucket("A", "bucket").await.expect("bucket");
    let id = store
        .create_upload(
            "A",
            "bucket",
            "dir/big.zip",
            Some("application/zip".into()),
            BTreeMap::new(),
        )
        .await
        .expect("upload");
    let parts: [&[u8]; 3] = [b"hello", b" world", b"!"];
    // Uploaded out of order, part 2 twice (the last one counts).
    let mut etags = BTreeMap::new();
    for (n, data) in [
        (3u32, parts[2]),
        (2, b"junk!!" as &[u8]),
        (1, parts[0]),
        (2, parts[1]),
    ] {
        let etag = store
            .upload_part(
                "A",
                "bucket",
                "dir/big.zip",
                &id,
                n,
                PutOptions::default(),
                body(&[data]),
            )
            .await
            .expect("part");
        assert_eq!(etag, md5_hex(data));
        etags.insert(n, etag);
    }
    let listed: Vec<(u32, String)> = etags
        .iter()
        .map(|(n, e)| (*n, format!("\"{e}\"")))
        .collect();
    let stored = store
        .list_parts("A", "bucket", "dir/big.zip", &id)
        .await
        .expect("parts");
    assert_eq!(
        stored.iter().map(|p| p.number).collect::<Vec<_>>(),
        [1, 2, 3]
    );

    // Bad completions change nothing.
    let mut reversed = listed.clone();
    reversed.reverse();
    assert!(matches!(
        store
            .complete_upload("A", "bucket", "dir/big.zip", &id, &reversed)
            .await,
        Err(StoreError::InvalidPartOrder)
    ));
    let mut wrong = listed.clone();
    wrong[1].1 = md5_hex(b"junk!!");
    assert!(matches!(
        store
            .complete_upload("A", "bucket", "dir/big.zip", &id, &wrong)
            .await,
        Err(StoreError::InvalidPart(_))
    ));
    assert!(matches!(
        store
            .complete_upload(
                "A",
                "bucket",
                "dir/big.zip",
                &id,
                &[(1, etags[&1].clone()), (4, "x".into())]
            )
            .await,
        Err(StoreError::InvalidPart(_))
    ));
    assert!(matches!(
        store
            .complete_upload(
                "A",
                "bucket",
                "dir/big.zip",
                &id,
                &[(3, etags[&3].clone()), (4, "x".into())]
            )
            .await,
        Err(StoreError::InvalidPart(_)) | Err(StoreError::EntityTooSmall(_))
    ));
    assert!(matches!(
        store
            .complete_upload("B", "bucket", "dir/big.zip", &id, &listed)
            .await,
        Err(StoreError::AccessDenied)
    ));
    assert!(matches!(
        store
            .complete_upload("A", "bucket", "other-key", &id, &listed)
            .await,
        Err(StoreError::NoSuchUpload)
    ));
    for bad_number in [0, 101] {
        assert!(matches!(
            store
                .upload_part(
                    "A",
                    "bucket",
                    "dir/big.zip",
                    &id,
                    bad_number,
                    PutOptions::default(),
                    body(&[b"x"])
                )
                .await,
            Err(StoreError::InvalidPartNumber(100))
        ));
    }
    for bad_id in ["../../buckets", "zz", &"g".repeat(32)] {
        assert!(matches!(
            store.list_parts("A", "bucket", "dir/big.zip", bad_id).await,
            Err(StoreError::NoSuchUpload)
        ));
    }

    let meta = store
        .complete_upload("A", "bucket", "dir/big.zip", &id, &listed)
        .await
        .expect("completes");
    let mut md5s = Vec::new();
    for data in parts {
        md5s.extend_from_slice(&Md5::checksum(data));
    }
    assert_eq!(meta.etag, format!("{}-3", md5_hex(&md5s)));
    assert_eq!(meta.content_type.as_deref(), Some("application/zip"));
    assert_eq!(
        get(&store, "A", "bucket", "dir/big.zip")
            .await
            .expect("gets"),
        b"hello world!"
    );
    assert!(matches!(
        store.list_parts("A", "bucket", "dir/big.zip", &id).await,
        Err(StoreError::NoSuchUpload)
    ));

    // A part smaller than the minimum, not last.
    let id = store
        .create_upload("A", "bucket", "small", None, BTreeMap::new())
        .await
        .expect("upload");
    let e1 = store
        .upload_part(
            "A",
            "bucket",
            "small",
            &id,
            1,
            PutOptions::default(),
            body(&[b"abc"]),
        )
        .await
        .expect("part");
    let e2 = store
        .upload_part(
            "A",
            "bucket",
            "small",
            &id,
            2,
            PutOptions::default(),
            body(&[b"defgh"]),
        )
        .await
        .expect("part");
    assert!(matches!(
        store
            .complete_upload("A", "bucket", "small", &id, &[(1, e1), (2, e2)])
            .await,
        Err(StoreError::EntityTooSmall(5))
    ));
    store
        .abort_upload("A", "bucket", "small", &id)
        .await
        .expect("aborts");
    assert!(matches!(
        store.abort_upload("A", "bucket", "small", &id).await,
        Err(StoreError::NoSuchUpload)
    ));
    assert!(files(&dir.path().join("uploads")).is_empty());
}

#[tokio::test]
async fn listing_pages_through_prefixes_and_delimiters() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), StoreConfig::default());
    store.create_bucket("A", "bucket").await.expect("bucket");
    let mut keys = Vec::new();
    for i in 0..25 {
        keys.push(format!("logs/{i:02}.txt"));
    }
    keys.extend(
        [
            "photos/2024/a.jpg",
            "photos/2024/b.jpg",
            "photos/2025/c.jpg",
            "readme",
            "z/deep/x",
        ]
        .map(String::from),
    );
    for key in &keys {
        put(&store, "A", "bucket", key, b"x").await.expect("puts");
    }
    keys.sort();

    // No delimiter, pages of 10.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store
            .list_objects(
                "A",
                "bucket",
                &ListQuery {
                    after: after.as_deref(),
                    max_keys: 10,
                    ..Default::default()
                },
            )
            .await
            .expect("lists");
        assert!(page.objects.len() <= 10);
        seen.extend(page.objects.into_iter().map(|m| m.key));
        match page.next_marker {
            Some(marker) => after = Some(marker),
            None => break,
        }
    }
    assert_eq!(seen, keys);

    // Delimiter at the top: common prefixes, then readme.
    let top = store
        .list_objects(
            "A",
            "bucket",
            &ListQuery {
                delimiter: Some("/"),
                max_keys: 1000,
                ..Default::default()
            },
        )
        .await
        .expect("lists");
    assert_eq!(top.common_prefixes, ["logs/", "photos/", "z/"]);
    assert_eq!(
        top.objects
            .iter()
            .map(|m| m.key.as_str())
            .collect::<Vec<_>>(),
        ["readme"]
    );
    assert_eq!(top.next_marker, None);

    // Prefix + delimiter, one entry per page: a common prefix is never repeated.
    let mut entries = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store
            .list_objects(
                "A",
                "bucket",
                &ListQuery {
                    prefix: "photos/",
                    delimiter: Some("/"),
                    after: after.as_deref(),
                    max_keys: 1,
                },
            )
            .await
            .expect("lists");
        entries.extend(page.common_prefixes);
        entries.extend(page.objects.into_iter().map(|m| m.key));
        match page.next_marker {
            Some(marker) => after = Some(marker),
            None => break,
        }
    }
    assert_eq!(entries, ["photos/2024/", "photos/2025/"]);
}

fn source(store: Arc<Store>, allow_file_uris: bool) -> ArtifactSource {
    ArtifactSource {
        store: ArtifactStore::Builtin(store),
        allow_file_uris,
    }
}

#[tokio::test]
async fn fetch_maps_each_failure_to_its_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(open(&dir.path().join("s3"), StoreConfig::default()));
    store.create_bucket("A", "artifacts").await.expect("bucket");
    put(&store, "A", "artifacts", "app.zip", b"PK\x03\x04 zip bytes")
        .await
        .expect("puts");
    let artifacts = source(store.clone(), false);
    let out = dir.path().join("out");
    std::fs::create_dir(&out).expect("mkdir");

    let dest = out.join("ok.zip");
    let size = artifacts
        .fetch("A", "s3://artifacts/app.zip", &dest, 1 << 20)
        .await
        .expect("fetches");
    assert_eq!(size, 14);
    assert_eq!(
        std::fs::read(&dest).expect("reads"),
        b"PK\x03\x04 zip bytes"
    );

    let cases = [
        ("B", "s3://artifacts/app.zip", 1 << 20, "S3_ACCESS_DENIED"),
        (
            "A",
            "s3://missing-bucket/app.zip",
            1 << 20,
            "S3_NO_SUCH_BUCKET",
        ),
        ("A", "s3://artifacts/missing.zip", 1 << 20, "S3_NO_SUCH_KEY"),
        ("A", "s3://artifacts/app.zip", 13, "S3_INVALID_OBJECT"),
        ("A", "s3://artifacts/dir/", 1 << 20, "S3_INVALID_OBJECT"),
        ("A", "s3://artifacts", 1 << 20, "S3_INVALID_OBJECT"),
        ("A", "s3://Bad_Bucket/k", 1 << 20, "S3_INVALID_OBJECT"),
        (
            "A",
            "https://example.com/app.zip",
            1 << 20,
            "S3_INVALID_OBJECT",
        ),
        ("A", "file:///etc/hostname", 1 << 20, "S3_INVALID_OBJECT"),
    ];
    for (i, (account, uri, max, code)) in cases.iter().enumerate() {
        let dest = out.join(format!("case-{i}"));
        let err = artifacts
            .fetch(account, uri, &dest, *max)
            .await
            .expect_err(uri);
        let reason = BuildFailure::from(&err).to_string();
        assert_eq!(err.code().as_str(), *code, "{uri}: {reason}");
        assert!(reason.starts_with(code), "{reason}");
        assert!(!dest.exists(), "{uri}: a failed fetch leaves no file");
    }
    let err = artifacts
        .fetch("A", "file:///etc/hostname", &out.join("f"), 1 << 20)
        .await
        .expect_err("disabled");
    assert!(
        err.to_string().contains(
            "file:// artifacts are disabled; start the server with --allow-file-artifacts"
        ),
        "{err}"
    );
    let missing = artifacts
        .fetch("A", "s3://artifacts/missing.zip", &out.join("m"), 1 << 20)
        .await
        .expect_err("missing");
    assert_eq!(
        BuildFailure::from(&missing).to_string(),
        "S3_NO_SUCH_KEY: s3://artifacts/missing.zip does not exist"
    );

    // An existing destination is an internal error and is left alone.
    std::fs::write(out.join("taken"), b"keep").expect("writes");
    let err = artifacts
        .fetch("A", "s3://artifacts/app.zip", &out.join("taken"), 1 << 20)
        .await
        .expect_err("exists");
    assert_eq!(err.code(), BuildErrorCode::InternalPlatformError);
    assert_eq!(std::fs::read(out.join("taken")).expect("reads"), b"keep");
}

#[tokio::test]
async fn file_uris_when_enabled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(open(&dir.path().join("s3"), StoreConfig::default()));
    let artifacts = source(store, true);
    let src = dir.path().join("with space.zip");
    std::fs::write(&src, b"zip!").expect("writes");
    let uri = format!("file://{}", src.display()).replace(' ', "%20");
    let dest = dir.path().join("copy");
    assert_eq!(
        artifacts
            .fetch("A", &uri, &dest, 100)
            .await
            .expect("copies"),
        4
    );
    assert_eq!(std::fs::read(&dest).expect("reads"), b"zip!");
    let code = |uri: String, max: u64| {
        let artifacts = artifacts.clone();
        let dest = dir.path().join(format!("d-{}", uri.len()));
        async move {
            artifacts
                .fetch("A", &uri, &dest, max)
                .await
                .expect_err("fails")
                .code()
                .as_str()
        }
    };
    assert_eq!(code(uri.clone(), 3).await, "S3_INVALID_OBJECT");
    assert_eq!(
        code(format!("file://{}/nope.zip", dir.path().display()), 100).await,
        "S3_NO_SUCH_KEY"
    );
    assert_eq!(
        code(format!("file://{}", dir.path().display()), 100).await,
        "S3_INVALID_OBJECT"
    );
    assert_eq!(
        code("file://relative/path".into(), 100).await,
        "S3_INVALID_OBJECT"
    );
}
