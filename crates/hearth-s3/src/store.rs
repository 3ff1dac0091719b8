//! The built-in store's files: buckets with their owner account, objects
//! named by a hash of their key, multipart uploads.
//!
//! ```text
//! ROOT/buckets/<bucket>/bucket.json          {"owner": ACCOUNT, "createdMs": ...}
//! ROOT/buckets/<bucket>/objects/<hh>/<hash>  hash = hex(SHA-256(key)), hh its first 2 digits
//! ROOT/uploads/<upload id>/upload.json       bucket, key, owner, content type, metadata
//! ROOT/uploads/<upload id>/part-<NNNNN>      one uploaded part
//! ROOT/tmp/                                  files being written (emptied at open)
//! ```
//!
//! A key never becomes a path: objects are named by a hash of the key, so
//! `../x`, `/abs`, 1024-byte keys or any unicode stay inside the bucket and
//! `a` and `a/b` can both exist. Bucket names are checked against S3's rules
//! (lower-case letters, digits, `-`, `.`; no `..`) before they name a
//! directory, and upload ids are 32 hex digits.
//!
//! An object file is its data followed by a trailer: the object's metadata as
//! JSON (real key, size, ETag, content type, last-modified), the JSON's length
//! (u32 LE) and an 8-byte magic. Data and metadata are thus one file, written
//! to `tmp/`, fsynced and renamed over the old object in one step: a reader
//! that opened the old file keeps reading it whole, a crash leaves the old or
//! the new object, never a mix. Bodies stream to disk; nothing holds a whole
//! object in memory.
//!
//! Listing reads every object's trailer in the bucket (O(objects) per page): fine
//! for an artifact store, not for millions of objects.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use rand::RngCore;
use s3s::crypto::{Checksum as _, Md5};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::RwLock;

const MAGIC: &[u8; 8] = b"HS3OBJ01";
/// Largest trailer accepted when reading (keys are at most 1 KiB, user
/// metadata at most 2 KiB in S3).
const MAX_TRAILER: u32 = 64 * 1024;
/// S3's limit on a key's length in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Largest user metadata (names and values) accepted, as in S3.
const MAX_USER_METADATA: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the bucket does not exist")]
    NoSuchBucket,
    #[error("access denied")]
    AccessDenied,
    #[error("the bucket name is taken")]
    BucketAlreadyExists,
    #[error("you already own this bucket")]
    BucketAlreadyOwnedByYou,
    #[error("the bucket is not empty")]
    BucketNotEmpty,
    #[error("the key does not exist")]
    NoSuchKey,
    #[error("the upload does not exist")]
    NoSuchUpload,
    #[error("invalid bucket name {0:?}")]
    InvalidBucketName(String),
    #[error("invalid key: {0}")]
    InvalidKey(&'static str),
    #[error("the object is larger than the {0}-byte limit")]
    EntityTooLarge(u64),
    #[error("a part other than the last is smaller than {0} bytes")]
    EntityTooSmall(u64),
    #[error("invalid part: {0}")]
    InvalidPart(String),
    #[error("parts must be listed in ascending order")]
    InvalidPartOrder,
    #[error("part numbers go from 1 to {0}")]
    InvalidPartNumber(u32),
    #[error("the body is shorter than its Content-Length")]
    IncompleteBody,
    #[error("the Content-MD5 does not match the body")]
    BadDigest,
    #[error("user metadata is larger than {MAX_USER_METADATA} bytes")]
    MetadataTooLarge,
    #[error("reading the request body failed")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("{path}: damaged store file: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("a store task failed")]
    Join(#[source] tokio::task::JoinError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Limits of the store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Largest object (and part), default 5 GiB.
    pub max_object_bytes: u64,
    /// Most parts in one multipart upload, default 10,000 (S3's).
    pub max_parts: u32,
    /// Smallest part but the last, default 5 MiB (S3's).
    pub min_part_bytes: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            max_object_bytes: 5 * 1024 * 1024 * 1024,
            max_parts: 10_000,
            min_part_bytes: 5 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BucketInfo {
    #[serde(skip)]
    pub name: String,
    pub owner: String,
    pub created_ms: u64,
}

/// What the trailer of an object (or part) file says.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    pub key: String,
    pub size: u64,
    /// Hex MD5 of the data, or `hex(MD5(part MD5s))-N` for a multipart object.
    pub etag: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    pub last_modified_ms: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

impl ObjectMeta {
    pub fn last_modified(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.last_modified_ms)
    }
}

/// What a new object carries besides its data.
#[derive(Debug, Clone, Default)]
pub struct PutOptions {
    pub content_type: Option<String>,
    pub metadata: BTreeMap<String, String>,
    /// The request's Content-Length: the body must be exactly this long.
    pub content_length: Option<u64>,
    /// The request's Content-MD5, decoded.
    pub content_md5: Option<[u8; 16]>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct UploadInfo {
    bucket: String,
    key: String,
    owner: String,
    #[serde(default)]
    content_type: Option<String>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    initiated_ms: u64,
}

/// One stored part of a multipart upload.
#[derive(Debug, Clone)]
pub struct PartInfo {
    pub number: u32,
    pub size: u64,
    pub etag: String,
    pub last_modified_ms: u64,
}

/// A page of ListObjectsV2.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    pub objects: Vec<ObjectMeta>,
    pub common_prefixes: Vec<String>,
    /// The last key or common prefix returned, when there is more.
    pub next_marker: Option<String>,
}

/// What to list.
#[derive(Debug, Clone, Default)]
pub struct ListQuery<'a> {
    pub prefix: &'a str,
    pub delimiter: Option<&'a str>,
    /// List keys (and common prefixes) after this one.
    pub after: Option<&'a str>,
    pub max_keys: usize,
}

/// The filesystem-backed store. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    config: StoreConfig,
    /// Held for reading while an object is put in a bucket, for writing while
    /// a bucket is created or deleted: a bucket found empty stays empty until
    /// it is gone.
    buckets: RwLock<()>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn random_hex() -> String {
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// S3's bucket naming rules (3-63 characters of `a-z0-9.-`, starting and
/// ending with a letter or digit, no `..`, not an IP address).
pub fn valid_bucket_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    (3..=63).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'.' || *b == b'-')
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
        && !name.contains("..")
        && name.parse::<std::net::Ipv4Addr>().is_err()
}

fn check_key(key: &str) -> Result<(), StoreError> {
    if key.is_empty() {
        return Err(StoreError::InvalidKey("a key cannot be empty"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(StoreError::InvalidKey("a key is at most 1024 bytes"));
    }
    Ok(())
}

fn check_metadata(metadata: &BTreeMap<String, String>) -> Result<(), StoreError> {
    let size: usize = metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > MAX_USER_METADATA {
        return Err(StoreError::MetadataTooLarge);
    }
    Ok(())
}

fn key_hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Writes `bytes` to `path` through a temporary file in `tmp`, fsynced and renamed.
fn write_atomic(tmp: &Path, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp_path = tmp.join(random_hex());
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp_path)
            .map_err(io_err(&tmp_path))?;
        file.write_all(bytes).map_err(io_err(&tmp_path))?;
        file.sync_all().map_err(io_err(&tmp_path))?;
        fs::rename(&tmp_path, path).map_err(io_err(path))?;
        if let Some(parent) = path.parent() {
            sync_dir(parent)?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp_path);
    }
    result
}

/// Reads the trailer of an object or part file; returns the metadata.
fn read_trailer(file: &mut File, path: &Path) -> Result<ObjectMeta, StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt {
        path: path.to_path_buf(),
        what: what.to_string(),
    };
    let len = file.metadata().map_err(io_err(path))?.len();
    if len < 12 {
        return Err(corrupt("too short"));
    }
    let mut tail = [0u8; 12];
    file.seek(SeekFrom::Start(len - 12)).map_err(io_err(path))?;
    file.read_exact(&mut tail).map_err(io_err(path))?;
    if &tail[4..] != MAGIC {
        return Err(corrupt("no trailer"));
    }
    let json_len = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
    if json_len > MAX_TRAILER || u64::from(json_len) > len - 12 {
        return Err(corrupt("bad trailer length"));
    }
    let data_len = len - 12 - u64::from(json_len);
    let mut json = vec![0u8; json_len as usize];
    file.seek(SeekFrom::Start(data_len)).map_err(io_err(path))?;
    file.read_exact(&mut json).map_err(io_err(path))?;
    let meta: ObjectMeta = serde_json::from_slice(&json).map_err(|e| corrupt(&e.to_string()))?;
    if meta.size != data_len {
        return Err(corrupt("size does not match the trailer"));
    }
    file.seek(SeekFrom::Start(0)).map_err(io_err(path))?;
    Ok(meta)
}

fn trailer_bytes(meta: &ObjectMeta) -> Result<Vec<u8>, StoreError> {
    let mut bytes = serde_json::to_vec(meta).map_err(|e| StoreError::Corrupt {
        path: PathBuf::new(),
        what: e.to_string(),
    })?;
    let len = u32::try_from(bytes.len())
        .ok()
        .filter(|l| *l <= MAX_TRAILER)
        .ok_or(StoreError::MetadataTooLarge)?;
    bytes.extend_from_slice(&len.to_le_bytes());
    bytes.extend_from_slice(MAGIC);
    Ok(bytes)
}

/// A file being written in `tmp/`; removed unless committed.
struct TempFile {
    path: PathBuf,
    file: Option<tokio::io::BufWriter<tokio::fs::File>>,
    md5: Md5,
    written: u64,
}

impl TempFile {
    async fn create(tmp: &Path) -> Result<Self, StoreError> {
        let path = tmp.join(random_hex());
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .await
            .map_err(io_err(&path))?;
        Ok(Self {
            file: Some(tokio::io::BufWriter::with_capacity(256 * 1024, file)),
            path,
            md5: Md5::new(),
            written: 0,
        })
    }

    fn writer(&mut self) -> Result<&mut tokio::io::BufWriter<tokio::fs::File>, StoreError> {
        let path = &self.path;
        self.file.as_mut().ok_or_else(|| StoreError::Io {
            path: path.clone(),
            source: io::Error::other("file already closed"),
        })
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        self.md5.update(bytes);
        self.written += bytes.len() as u64;
        let path = self.path.clone();
        self.writer()?.write_all(bytes).await.map_err(io_err(&path))
    }

    /// Streams `body` in, at most `limit` bytes.
    async fn write_body<S, E>(&mut self, body: S, limit: u64) -> Result<(), StoreError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut body = body;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| StoreError::Body(e.into()))?;
            if self.written + chunk.len() as u64 > limit {
                return Err(StoreError::EntityTooLarge(limit));
            }
            self.write(&chunk).await?;
        }
        Ok(())
    }

    /// Appends the trailer, syncs, closes; returns the path to rename.
    async fn finish(&mut self, meta: &ObjectMeta) -> Result<(), StoreError> {
        let trailer = trailer_bytes(meta)?;
        let path = self.path.clone();
        let writer = self.writer()?;
        writer.write_all(&trailer).await.map_err(io_err(&path))?;
        writer.flush().await.map_err(io_err(&path))?;
        writer.get_ref().sync_all().await.map_err(io_err(&path))?;
        self.file = None;
        Ok(())
    }

    fn md5(&mut self) -> [u8; 16] {
        std::mem::replace(&mut self.md5, Md5::new()).finalize()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        // Committed files were renamed away; this only removes leftovers.
        let _ = fs::remove_file(&self.path);
    }
}

impl Store {
    /// Opens (creating) a store under `root` and empties its `tmp/`.
    pub fn open(root: &Path, config: StoreConfig) -> Result<Self, StoreError> {
        for dir in ["buckets", "uploads", "tmp"] {
            let path = root.join(dir);
            fs::create_dir_all(&path).map_err(io_err(&path))?;
        }
        let tmp = root.join("tmp");
        for entry in fs::read_dir(&tmp).map_err(io_err(&tmp))? {
            let entry = entry.map_err(io_err(&tmp))?;
            let path = entry.path();
            let removed = if entry.file_type().map_err(io_err(&path))?.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            removed.map_err(io_err(&path))?;
        }
        Ok(Self {
            root: root.to_path_buf(),
            config,
            buckets: RwLock::new(()),
        })
    }

    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// Streams a request body into a temporary file within the object size
    /// limit, checking the declared length and Content-MD5; returns the file
    /// and the body's MD5.
    async fn receive<S, E>(
        &self,
        body: S,
        options: &PutOptions,
    ) -> Result<(TempFile, [u8; 16]), StoreError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let limit = self.config.max_object_bytes;
        if options.content_length.is_some_and(|l| l > limit) {
            return Err(StoreError::EntityTooLarge(limit));
        }
        let mut temp = TempFile::create(&self.tmp()).await?;
        temp.write_body(body, limit).await?;
        if options.content_length.is_some_and(|l| l != temp.written) {
            return Err(StoreError::IncompleteBody);
        }
        let md5 = temp.md5();
        if options.content_md5.is_some_and(|expected| expected != md5) {
            return Err(StoreError::BadDigest);
        }
        Ok((temp, md5))
    }

    fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn bucket_dir(&self, bucket: &str) -> Result<PathBuf, StoreError> {
        if !valid_bucket_name(bucket) {
            return Err(StoreError::InvalidBucketName(bucket.to_string()));
        }
        Ok(self.root.join("buckets").join(bucket))
    }

    fn object_path(&self, bucket: &str, key: &str) -> Result<PathBuf, StoreError> {
        check_key(key)?;
        let hash = key_hash(key);
        Ok(self
            .bucket_dir(bucket)?
            .join("objects")
            .join(&hash[..2])
            .join(hash))
    }

    fn upload_dir(&self, upload_id: &str) -> Result<PathBuf, StoreError> {
        if upload_id.len() != 32 || !upload_id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(StoreError::NoSuchUpload);
        }
        Ok(self.root.join("uploads").join(upload_id))
    }

    async fn blocking<T, F>(f: F) -> Result<T, StoreError>
    where
        F: FnOnce() -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(StoreError::Join)?
    }

    fn read_bucket(dir: &Path, name: &str) -> Result<Option<BucketInfo>, StoreError> {
        let path = dir.join("bucket.json");
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let mut info: BucketInfo =
            serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                path: path.clone(),
                what: e.to_string(),
            })?;
        info.name = name.to_string();
        Ok(Some(info))
    }

    /// The bucket's owner and creation time, whoever asks.
    pub async fn bucket(&self, bucket: &str) -> Result<Option<BucketInfo>, StoreError> {
        let dir = self.bucket_dir(bucket)?;
        let name = bucket.to_string();
        Self::blocking(move || Self::read_bucket(&dir, &name)).await
    }

    /// The bucket, when `account` owns it: NoSuchBucket when it does not
    /// exist (or its name is not a bucket name), AccessDenied when another
    /// account owns it.
    pub async fn check_bucket(
        &self,
        account: &str,
        bucket: &str,
    ) -> Result<BucketInfo, StoreError> {
        match self.bucket(bucket).await {
            Ok(Some(info)) if info.owner == account => Ok(info),
            Ok(Some(_)) => Err(StoreError::AccessDenied),
            Ok(None) | Err(StoreError::InvalidBucketName(_)) => Err(StoreError::NoSuchBucket),
            Err(e) => Err(e),
        }
    }

    pub async fn create_bucket(&self, account: &str, bucket: &str) -> Result<(), StoreError> {
        let dir = self.bucket_dir(bucket)?;
        let _guard = self.buckets.write().await;
        let info = BucketInfo {
            name: bucket.to_string(),
            owner: account.to_string(),
            created_ms: now_ms(),
        };
        let tmp = self.tmp();
        let name = bucket.to_string();
        Self::blocking(move || {
            if let Some(existing) = Self::read_bucket(&dir, &name)? {
                return Err(if existing.owner == info.owner {
                    StoreError::BucketAlreadyOwnedByYou
                } else {
                    StoreError::BucketAlreadyExists
                });
            }
            let staging = tmp.join(random_hex());
            let result = (|| {
                fs::create_dir(&staging).map_err(io_err(&staging))?;
                let objects = staging.join("objects");
                fs::create_dir(&objects).map_err(io_err(&objects))?;
                let json = serde_json::to_vec(&info).map_err(|e| StoreError::Corrupt {
                    path: dir.clone(),
                    what: e.to_string(),
                })?;
                write_atomic(&tmp, &staging.join("bucket.json"), &json)?;
                fs::rename(&staging, &dir).map_err(io_err(&dir))?;
                if let Some(parent) = dir.parent() {
                    sync_dir(parent)?;
                }
                Ok(())
            })();
            if result.is_err() {
                let _ = fs::remove_dir_all(&staging);
            }
            result
        })
        .await
    }

    /// Deletes an empty bucket that `account` owns (pending multipart
    /// uploads into it are dropped when they complete or are aborted).
    pub async fn delete_bucket(&self, account: &str, bucket: &str) -> Result<(), StoreError> {
        self.check_bucket(account, bucket).await?;
        let dir = self.bucket_dir(bucket)?;
        let _guard = self.buckets.write().await;
        let tmp = self.tmp();
        Self::blocking(move || {
            let objects = dir.join("objects");
            for shard in fs::read_dir(&objects).map_err(io_err(&objects))? {
                let shard = shard.map_err(io_err(&objects))?.path();
                if fs::read_dir(&shard)
                    .map_err(io_err(&shard))?
                    .next()
                    .is_some()
                {
                    return Err(StoreError::BucketNotEmpty);
                }
            }
            let trash = tmp.join(random_hex());
            fs::rename(&dir, &trash).map_err(io_err(&dir))?;
            if let Some(parent) = dir.parent() {
                sync_dir(parent)?;
            }
            fs::remove_dir_all(&trash).map_err(io_err(&trash))
        })
        .await
    }

    /// The buckets `account` owns, by name.
    pub async fn list_buckets(&self, account: &str) -> Result<Vec<BucketInfo>, StoreError> {
        let dir = self.root.join("buckets");
        let account = account.to_string();
        Self::blocking(move || {
            let mut out = Vec::new();
            for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
                let entry = entry.map_err(io_err(&dir))?;
                let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                if !valid_bucket_name(&name) {
                    continue;
                }
                if let Some(info) = Self::read_bucket(&entry.path(), &name)? {
                    if info.owner == account {
                        out.push(info);
                    }
                }
            }
            out.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(out)
        })
        .await
    }

    /// Moves a finished temporary file to `dest`, if the bucket still exists.
    async fn commit(&self, temp: &TempFile, bucket: &str, dest: PathBuf) -> Result<(), StoreError> {
        let bucket_dir = self.bucket_dir(bucket)?;
        let _guard = self.buckets.read().await;
        let from = temp.path.clone();
        Self::blocking(move || {
            if !bucket_dir.join("bucket.json").exists() {
                return Err(StoreError::NoSuchBucket);
            }
            let parent = dest.parent().map(Path::to_path_buf).unwrap_or_default();
            fs::create_dir_all(&parent).map_err(io_err(&parent))?;
            fs::rename(&from, &dest).map_err(io_err(&dest))?;
            sync_dir(&parent)
        })
        .await
    }

    /// Stores an object from a body stream (at most the size limit).
    pub async fn put_object<S, E>(
        &self,
        account: &str,
        bucket: &str,
        key: &str,
        options: PutOptions,
        body: S,
    ) -> Result<ObjectMeta, StoreError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let dest = self.object_path(bucket, key)?;
        check_metadata(&options.metadata)?;
        self.check_bucket(account, bucket).await?;
        let (mut temp, md5) = self.receive(body, &options).await?;
        let meta = ObjectMeta {
            key: key.to_string(),
            size: temp.written,
            etag: hex::encode(md5),
            content_type: options.content_type,
            last_modified_ms: now_ms(),
            metadata: options.metadata,
        };
        temp.finish(&meta).await?;
        self.commit(&temp, bucket, dest).await?;
        Ok(meta)
    }

    /// Opens an object for reading: its metadata and its file, positioned at
    /// the start of the data (the data is `meta.size` bytes long).
    pub async fn open_object(
        &self,
        account: &str,
        bucket: &str,
        key: &str,
    ) -> Result<(ObjectMeta, File), StoreError> {
        let path = self.object_path(bucket, key)?;
        self.check_bucket(account, bucket).await?;
        let key = key.to_string();
        Self::blocking(move || {
            let mut file = match File::open(&path) {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StoreError::NoSuchKey),
                Err(e) => return Err(io_err(&path)(e)),
            };
            let meta = read_trailer(&mut file, &path)?;
            if meta.key != key {
                // A SHA-256 collision, or a file put there by hand.
                return Err(StoreError::Corrupt {
                    path,
                    what: "the stored key differs".into(),
                });
            }
            Ok((meta, file))
        })
        .await
    }

    pub async fn head_object(
        &self,
        account: &str,
        bucket: &str,
        key: &str,
    ) -> Result<ObjectMeta, StoreError> {
        self.open_object(account, bucket, key)
            .await
            .map(|(meta, _)| meta)
    }

    /// Deletes an object; a missing key is not an error (as in S3).
    pub async fn delete_object(
        &self,
        account: &str,
        bucket: &str,
        key: &str,
    ) -> Result<(), StoreError> {
        let path = self.object_path(bucket, key)?;
        self.check_bucket(account, bucket).await?;
        Self::blocking(move || match fs::remove_file(&path) {
            Ok(()) => path.parent().map_or(Ok(()), sync_dir),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&path)(e)),
        })
        .await
    }

    /// One page of the bucket's keys in UTF-8 byte order, with S3's prefix,
    /// delimiter and marker semantics.
    pub async fn list_objects(
        &self,
        account: &str,
        bucket: &str,
        query: &ListQuery<'_>,
    ) -> Result<Listing, StoreError> {
        self.check_bucket(account, bucket).await?;
        let objects = self.bucket_dir(bucket)?.join("objects");
        let prefix = query.prefix.to_string();
        let mut all = Self::blocking(move || {
            let mut all = Vec::new();
            for shard in fs::read_dir(&objects).map_err(io_err(&objects))? {
                let shard = shard.map_err(io_err(&objects))?.path();
                for entry in fs::read_dir(&shard).map_err(io_err(&shard))? {
                    let path = entry.map_err(io_err(&shard))?.path();
                    let mut file = match File::open(&path) {
                        Ok(file) => file,
                        // Deleted while listing.
                        Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(io_err(&path)(e)),
                    };
                    let meta = read_trailer(&mut file, &path)?;
                    if meta.key.starts_with(&prefix) {
                        all.push(meta);
                    }
                }
            }
            Ok(all)
        })
        .await?;
        all.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(page(all, query))
    }

    // ------------------------------------------------------------ multipart

    pub async fn create_upload(
        &self,
        account: &str,
        bucket: &str,
        key: &str,
        content_type: Option<String>,
        metadata: BTreeMap<String, String>,
    ) -> Result<String, StoreError> {
        check_key(key)?;
        check_metadata(&metadata)?;
        self.check_bucket(account, bucket).await?;
        let id = random_hex();
        let dir = self.upload_dir(&id)?;
        let info = UploadInfo {
            bucket: bucket.to_string(),
            key: key.to_string(),
            owner: account.to_string(),
            content_type,
            metadata,
            initiated_ms: now_ms(),
        };
        let tmp = self.tmp();
        Self::blocking(move || {
            fs::create_dir(&dir).map_err(io_err(&dir))?;
            let json = serde_json::to_vec(&info).map_err(|e| StoreError::Corrupt {
                path: dir.clone(),
                what: e.to_string(),
            })?;
            write_atomic(&tmp, &dir.join("upload.json"), &json)
        })
        .await?;
        Ok(id)
    }

    /// The upload, when it is `account`'s upload of `bucket`/`key`.
    async fn upload(
        &self,
        account: &str,
        bucket: &str,
        key: &str,
        upload_id: &str,
    ) -> Result<(PathBuf, UploadInfo), StoreError> {
        self.check_bucket(account, bucket).await?;
        let dir = self.upload_dir(upload_id)?;
        let path = dir.join("upload.json");
        let info = Self::blocking(move || {
            let bytes = match fs::read(&path) {
                Ok(bytes) => bytes,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(StoreError::NoSuchUpload)
                }
                Err(e) => return Err(io_err(&path)(e)),
            };
            serde_json::from_slice::<UploadInfo>(&bytes).map_err(|e| StoreError::Corrupt {
                path,
                what: e.to_string(),
            })
        })
        .await?;
        if info.bucket != bucket || info.key != key || info.owner != account {
            return Err(StoreError::NoSuchUpload);
        }
        Ok((dir, info))
    }

    fn part_name(number: u32) -> String {
        format!("part-{number:05}")
    }

    /// Stores one part; returns its ETag (hex MD5).
    #[allow(clippy::too_many_arguments)]
    pub async fn upload_part<S, E>(
        &self,
        account: &str,
        bucket: &str,
        key: &str,
        upload_id: &str,
        number: u32,
        options: PutOptions,
        body: S,
    ) -> Result<String, StoreError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let max_parts = self.config.max_parts;
        if number == 0 || number > max_parts {
            return Err(StoreError::InvalidPartNumber(max_parts));
        }
        let (dir, _) = self.upload(account, bucket, key, upload_id).await?;
        let (mut temp, md5) = self.receive(body, &options).await?;
        let meta = ObjectMeta {
            key: String::new(),
            size: temp.written,
            etag: hex::encode(md5),
            content_type: None,
            last_modified_ms: now_ms(),
            metadata: BTreeMap::new(),
        };
        temp.finish(&meta).await?;
        let dest = dir.join(Self::part_name(number));
        let from = temp.path.clone();
        Self::blocking(move || {
            match fs::rename(&from, &dest) {
                Ok(()) => {}
                // Aborted or completed meanwhile.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(StoreError::NoSuchUpload)
                }
                Err(e) => return Err(io_err(&dest)(e)),
            }
            sync_dir(&dir)
        })
        .await?;
        Ok(meta.etag)
    }

    /// The upload's parts, by number.
    pub async fn list_parts(
        &self,
        account: &str,
        bucket: &str,
        key: &str,
        upload_id: &str,
    ) -> Result<Vec<PartInfo>, StoreError> {
        let (dir, _) = self.upload(account, bucket, key, upload_id).await?;
        Self::blocking(move || Self::read_parts(&dir)).await
    }

    fn read_parts(dir: &Path) -> Result<Vec<PartInfo>, StoreError> {
        let mut parts = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_err(dir))? {
            let path = entry.map_err(io_err(dir))?.path();
            let Some(number) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("part-"))
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let mut file = File::open(&path).map_err(io_err(&path))?;
            let meta = read_trailer(&mut file, &path)?;
            parts.push(PartInfo {
                number,
                size: meta.size,
                etag: meta.etag,
                last_modified_ms: meta.last_modified_ms,
            });
        }
        parts.sort_by_key(|p| p.number);
        Ok(parts)
    }

    /// Assembles the listed parts (number, ETag) into the object.
    pub async fn complete_upload(
        &self,
        account: &str,
        bucket: &str,
        key: &str,
        upload_id: &str,
        listed: &[(u32, String)],
    ) -> Result<ObjectMeta, StoreError> {
        let (dir, info) = self.upload(account, bucket, key, upload_id).await?;
        if listed.is_empty() {
            return Err(StoreError::InvalidPart("no parts listed".into()));
        }
        if listed.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err(StoreError::InvalidPartOrder);
        }
        let stored = {
            let dir = dir.clone();
            Self::blocking(move || Self::read_parts(&dir)).await?
        };
        let mut chosen = Vec::with_capacity(listed.len());
        let mut total: u64 = 0;
        for (i, (number, etag)) in listed.iter().enumerate() {
            let etag = etag.trim_matches('"');
            let part = stored
                .iter()
                .find(|p| p.number == *number)
                .filter(|p| p.etag == etag)
                .ok_or_else(|| {
                    StoreError::InvalidPart(format!(
                        "part {number} was not uploaded with ETag {etag}"
                    ))
                })?;
            if i + 1 < listed.len() && part.size < self.config.min_part_bytes {
                return Err(StoreError::EntityTooSmall(self.config.min_part_bytes));
            }
            total += part.size;
            chosen.push(part.clone());
        }
        if total > self.config.max_object_bytes {
            return Err(StoreError::EntityTooLarge(self.config.max_object_bytes));
        }
        let dest = self.object_path(bucket, key)?;
        let mut temp = TempFile::create(&self.tmp()).await?;
        let mut md5s = Md5::new();
        let mut buf = vec![0u8; 256 * 1024];
        for part in &chosen {
            let bytes = hex::decode(&part.etag).map_err(|e| StoreError::Corrupt {
                path: dir.clone(),
                what: e.to_string(),
            })?;
            md5s.update(&bytes);
            let path = dir.join(Self::part_name(part.number));
            let mut file = tokio::fs::File::open(&path).await.map_err(io_err(&path))?;
            let mut left = part.size;
            while left > 0 {
                let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                let n = tokio::io::AsyncReadExt::read(&mut file, &mut buf[..want])
                    .await
                    .map_err(io_err(&path))?;
                if n == 0 {
                    return Err(StoreError::Corrupt {
                        path,
                        what: "part shorter than its trailer says".into(),
                    });
                }
                temp.write(&buf[..n]).await?;
                left -= n as u64;
            }
        }
        let meta = ObjectMeta {
            key: key.to_string(),
            size: temp.written,
            etag: format!("{}-{}", hex::encode(md5s.finalize()), chosen.len()),
            content_type: info.content_type,
            last_modified_ms: now_ms(),
            metadata: info.metadata,
        };
        temp.finish(&meta).await?;
        self.commit(&temp, bucket, dest).await?;
        self.remove_upload(dir).await?;
        Ok(meta)
    }

    pub async fn abort_upload(
        &self,
        account: &str,
        bucket: &str,
        key: &str,
        upload_id: &str,
    ) -> Result<(), StoreError> {
        let (dir, _) = self.upload(account, bucket, key, upload_id).await?;
        self.remove_upload(dir).await
    }

    async fn remove_upload(&self, dir: PathBuf) -> Result<(), StoreError> {
        let trash = self.tmp().join(random_hex());
        Self::blocking(move || {
            match fs::rename(&dir, &trash) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(StoreError::NoSuchUpload)
                }
                Err(e) => return Err(io_err(&dir)(e)),
            }
            fs::remove_dir_all(&trash).map_err(io_err(&trash))
        })
        .await
    }
}

/// Applies the prefix/delimiter/marker rules to `all` (sorted, all under the prefix).
fn page(all: Vec<ObjectMeta>, query: &ListQuery<'_>) -> Listing {
    let mut listing = Listing::default();
    let delimiter = query.delimiter.filter(|d| !d.is_empty());
    // A marker that is a common prefix skips every key beneath it.
    let mut last_prefix: Option<String> = query.after.map(str::to_string);
    let mut count = 0usize;
    let mut last: Option<String> = None;
    for meta in all {
        if query.after.is_some_and(|after| meta.key.as_str() <= after) {
            continue;
        }
        let rest = &meta.key[query.prefix.len()..];
        let common = delimiter.and_then(|d| {
            rest.find(d)
                .map(|i| meta.key[..query.prefix.len() + i + d.len()].to_string())
        });
        if let Some(common) = common {
            if last_prefix.as_deref() == Some(common.as_str()) {
                continue;
            }
            if count == query.max_keys {
                listing.next_marker = last;
                return listing;
            }
            last_prefix = Some(common.clone());
            last = Some(common.clone());
            listing.common_prefixes.push(common);
        } else {
            if count == query.max_keys {
                listing.next_marker = last;
                return listing;
            }
            last = Some(meta.key.clone());
            listing.objects.push(meta);
        }
        count += 1;
    }
    listing
}

/// Reads `len` bytes of an open object from `offset`, as a stream of chunks.
pub fn object_stream(
    mut file: File,
    offset: u64,
    len: u64,
) -> io::Result<impl Stream<Item = io::Result<Bytes>> + Send + Sync + 'static> {
    use tokio::io::AsyncReadExt as _;
    file.seek(SeekFrom::Start(offset))?;
    let file = tokio::fs::File::from_std(file).take(len);
    Ok(tokio_util::io::ReaderStream::with_capacity(file, 64 * 1024))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(key: &str) -> ObjectMeta {
        ObjectMeta {
            key: key.into(),
            size: 0,
            etag: String::new(),
            content_type: None,
            last_modified_ms: 0,
            metadata: BTreeMap::new(),
        }
    }

    fn keys(listing: &Listing) -> Vec<&str> {
        listing.objects.iter().map(|m| m.key.as_str()).collect()
    }

    #[test]
    fn page_with_delimiter_and_markers() {
        let all: Vec<_> = ["a", "b/1", "b/2", "c/x/1", "d"]
            .iter()
            .map(|k| meta(k))
            .collect();
        let query = ListQuery {
            prefix: "",
            delimiter: Some("/"),
            after: None,
            max_keys: 2,
        };
        let first = page(all.clone(), &query);
        assert_eq!(keys(&first), ["a"]);
        assert_eq!(first.common_prefixes, ["b/"]);
        assert_eq!(first.next_marker.as_deref(), Some("b/"));
        let second = page(
            all.clone(),
            &ListQuery {
                after: Some("b/"),
                ..query.clone()
            },
        );
        assert_eq!(keys(&second), ["d"]);
        assert_eq!(second.common_prefixes, ["c/"]);
        assert_eq!(second.next_marker, None);
    }

    #[test]
    fn bucket_names() {
        for good in ["abc", "my-bucket.1", "a1b"] {
            assert!(valid_bucket_name(good), "{good}");
        }
        for bad in [
            "ab",
            "ABC",
            "a..b",
            "-ab",
            "ab-",
            "../x",
            "a/b",
            "192.168.1.1",
            &"a".repeat(64),
        ] {
            assert!(!valid_bucket_name(bad), "{bad}");
        }
    }
}
