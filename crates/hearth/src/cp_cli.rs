//! `hearth cp`: files into and out of a microVM through the endpoint's agent
//! API (`PUT`/`GET /.hearth/v1/files`), streamed both ways: nothing is held
//! whole in memory.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Args;
use futures::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::json;
use tokio::io::AsyncWriteExt;

use crate::connect::ConnectArgs;
use crate::guest_endpoint::{agent_access, error_message, Endpoint};

#[derive(Debug, Args)]
pub struct CpArgs {
    /// LOCAL or ID:/absolute/path.
    src: String,
    /// LOCAL or ID:/absolute/path (exactly one side is in the microVM).
    dst: String,
    /// Mode of the file written in the microVM (octal) [default: the local file's].
    #[arg(long)]
    mode: Option<String>,
    #[command(flatten)]
    pub(crate) connect: ConnectArgs,
}

/// `ID:/path` → (ID, /path); anything else is a local path (a local path
/// with a colon can be written `./a:b`).
fn remote(spec: &str) -> Option<(&str, &str)> {
    let (id, path) = spec.split_once(':')?;
    let id_like = !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    (id_like && path.starts_with('/')).then_some((id, path))
}

/// The file name of a path (`/a/b` → `b`), if it has one.
fn file_name(path: &str) -> Option<&str> {
    path.rsplit('/').next().filter(|n| !n.is_empty())
}

type UploadBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

pub(crate) async fn cp(args: CpArgs) -> Result<()> {
    let (copied, description) = match (remote(&args.src), remote(&args.dst)) {
        (None, Some((id, path))) => {
            let client = args.connect.client()?;
            let (endpoint, token) = agent_access(&client, id).await?;
            let (bytes, path) = upload(&endpoint, &token, &args.src, path, args.mode.as_deref())
                .await
                .with_context(|| format!("cannot copy {} to {id}:{path}", args.src))?;
            (
                bytes,
                json!({"source": args.src, "destination": format!("{id}:{path}")}),
            )
        }
        (Some((id, path)), None) => {
            let client = args.connect.client()?;
            let (endpoint, token) = agent_access(&client, id).await?;
            let (bytes, local) = download(&endpoint, &token, path, Path::new(&args.dst))
                .await
                .with_context(|| format!("cannot copy {id}:{path} to {}", args.dst))?;
            (
                bytes,
                json!({"source": format!("{id}:{path}"), "destination": local}),
            )
        }
        (Some(_), Some(_)) => bail!("both SRC and DST are in a microVM; copy through a local file"),
        (None, None) => bail!("neither SRC nor DST is ID:/absolute/path"),
    };
    if args.connect.json {
        let mut out = description;
        out["bytes"] = json!(copied);
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

/// Streams the local file `src` to `path` in the microVM; returns the bytes
/// written and the path written.
async fn upload(
    endpoint: &Endpoint,
    token: &str,
    src: &str,
    path: &str,
    mode: Option<&str>,
) -> Result<(u64, String)> {
    let file = tokio::fs::File::open(src)
        .await
        .with_context(|| format!("cannot open {src}"))?;
    let meta = file.metadata().await?;
    if meta.is_dir() {
        bail!(
            "{src} is a directory; cp copies files (for a tree: \
             `tar -C {src} -c . | hearth exec -i ID -- tar -x -C /dest`)"
        );
    }
    let mode = match mode {
        Some(m) => u32::from_str_radix(m, 8).context("--mode wants an octal mode, e.g. 644")?,
        None => meta.permissions().mode() & 0o7777,
    };
    let path = if path.ends_with('/') {
        let name = Path::new(src)
            .file_name()
            .and_then(|n| n.to_str())
            .context("the local file has no usable name")?;
        format!("{path}{name}")
    } else {
        path.to_string()
    };
    let query = form_urlencoded::Serializer::new(String::new())
        .append_pair("path", &path)
        .append_pair("mode", &format!("{mode:o}"))
        .finish();
    let chunks =
        tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024).map(|c| c.map(Frame::data));
    let body: UploadBody = BodyExt::boxed(StreamBody::new(chunks));
    let request = http::Request::put(format!("/.hearth/v1/files?{query}"))
        .header(http::header::HOST, endpoint.authority.as_str())
        .header(hearth_proxy::AUTH_HEADER, token)
        .header(http::header::CONTENT_LENGTH, meta.len())
        .header(http::header::CONTENT_TYPE, "application/octet-stream")
        .body(body)?;
    let mut sender = endpoint.http1::<UploadBody>().await?;
    let response = sender
        .send_request(request)
        .await
        .context("the upload failed")?;
    if !response.status().is_success() {
        bail!("{}", error_message(response).await);
    }
    let answer = http_body_util::Limited::new(response.into_body(), 64 * 1024)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!(e))
        .context("cannot read the answer")?
        .to_bytes();
    let written = serde_json::from_slice::<serde_json::Value>(&answer)
        .ok()
        .and_then(|v| v["bytes"].as_u64())
        .unwrap_or(meta.len());
    if written != meta.len() {
        bail!("{written} of {} bytes arrived", meta.len());
    }
    Ok((written, path))
}

/// Streams `path` in the microVM into `dst` (a directory receives the file
/// under its own name), through a temporary file renamed at the end.
async fn download(
    endpoint: &Endpoint,
    token: &str,
    path: &str,
    dst: &Path,
) -> Result<(u64, PathBuf)> {
    let dst = if dst.is_dir() {
        dst.join(file_name(path).context("the remote path has no file name")?)
    } else {
        dst.to_path_buf()
    };
    let query = form_urlencoded::Serializer::new(String::new())
        .append_pair("path", path)
        .finish();
    let request = http::Request::get(format!("/.hearth/v1/files?{query}"))
        .header(http::header::HOST, endpoint.authority.as_str())
        .header(hearth_proxy::AUTH_HEADER, token)
        .body(http_body_util::Empty::<Bytes>::new())?;
    let mut sender = endpoint.http1().await?;
    let response = sender
        .send_request(request)
        .await
        .context("the download failed")?;
    if !response.status().is_success() {
        bail!("{}", error_message(response).await);
    }
    let mut partial = dst.clone().into_os_string();
    partial.push(".hearth-partial");
    let partial = PathBuf::from(partial);
    let mut file = tokio::fs::File::create(&partial)
        .await
        .with_context(|| format!("cannot create {}", partial.display()))?;
    let mut body = response.into_body();
    let mut total = 0u64;
    let copied: Result<()> = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.context("the download was cut off")?;
            if let Ok(data) = frame.into_data() {
                total += data.len() as u64;
                file.write_all(&data).await?;
            }
        }
        file.flush().await?;
        file.sync_all().await?;
        Ok(())
    }
    .await;
    drop(file);
    match copied {
        Ok(()) => {
            tokio::fs::rename(&partial, &dst).await?;
            Ok((total, dst))
        }
        Err(err) => {
            let _ = tokio::fs::remove_file(&partial).await;
            Err(err)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_and_local_paths() {
        assert_eq!(remote("mvm-1a2b:/tmp/x"), Some(("mvm-1a2b", "/tmp/x")));
        assert_eq!(remote("./a:/b"), None);
        assert_eq!(remote("/tmp/a:b"), None);
        assert_eq!(remote("id:relative"), None);
        assert_eq!(remote("plain"), None);
        assert_eq!(file_name("/a/b"), Some("b"));
        assert_eq!(file_name("/a/"), None);
    }
}
