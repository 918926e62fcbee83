//! Copies of templates between hosts: `GET /templates/{name}/export` streams one
//! template's files; `PUT /templates/{name}/import` builds a template from such a
//! stream (the control plane relays one into the other). Both stream: no file is
//! ever held in memory, holes of sparse files are not sent.
//!
//! The stream (version 1): the magic `HEARTHT1`, then per file a `u16` name length,
//! the name (one of [`FILES`], each at most once), its `u64` size, its data extents
//! (`u64` offset, `u64` length, the bytes) in increasing order within the size, an
//! end marker (offset `u64::MAX`, length 0) and the SHA-256 of everything after the
//! name and size; then a name length of 0. Integers are little-endian.
//!
//! Import writes into a private build directory and publishes it with one rename
//! ([`crate::templates::Store`]): a short, corrupt or hostile stream (bad magic,
//! unknown or repeated file, an extent out of order or past the size, a size over
//! [`MAX_FILE_BYTES`], a checksum that does not match, a missing `rootfs.ext4` or
//! `template.json`) is refused and leaves nothing behind.

use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;

use bytes::Bytes;
use hearth_types::TemplateName;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;

use crate::templates::{self, Store, TemplateEntry, TemplateError};

pub const MAGIC: &[u8; 8] = b"HEARTHT1";
/// The files a template may carry, in the order they are sent.
pub const FILES: [&str; 5] = [
    templates::META,
    templates::WARM_META,
    templates::VMSTATE,
    templates::MEMORY,
    templates::ROOTFS,
];
/// Largest file (apparent size) an import accepts: 64 GiB.
pub const MAX_FILE_BYTES: u64 = 64 << 30;
/// Bytes per chunk read from disk or from the stream.
const CHUNK: usize = 1 << 20;
const END: u64 = u64::MAX;

/// Why an import was refused (the template is not there, nothing is left behind).
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("template {0} already exists on this host")]
    Exists(TemplateName),
    #[error("not a template stream: {0}")]
    Malformed(String),
    #[error("the stream ended early")]
    Short,
    #[error("checksum of {file} does not match")]
    Checksum { file: String },
    #[error("importing the template failed")]
    Store(#[source] TemplateError),
    #[error("writing {file} failed")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
}

fn malformed(m: impl Into<String>) -> ImportError {
    ImportError::Malformed(m.into())
}

/// Stream template `name`'s files (see the module docs). `None` when the host
/// has no such template. The files are read in a blocking task; a consumer that
/// goes away stops it.
pub fn export(
    store: &Store,
    name: &TemplateName,
) -> Option<mpsc::Receiver<Result<Bytes, std::io::Error>>> {
    if !store.exists(name) {
        return None;
    }
    let dir = store.dir(name);
    let (tx, rx) = mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        if let Err(e) = write_stream(&dir, &tx) {
            // The consumer learns of it as a broken body.
            let _ = tx.blocking_send(Err(e));
        }
    });
    Some(rx)
}

type Tx = mpsc::Sender<Result<Bytes, std::io::Error>>;

fn send(tx: &Tx, b: Vec<u8>) -> std::io::Result<()> {
    tx.blocking_send(Ok(Bytes::from(b)))
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "export consumer gone"))
}

fn write_stream(dir: &Path, tx: &Tx) -> std::io::Result<()> {
    send(tx, MAGIC.to_vec())?;
    for f in FILES {
        let path = dir.join(f);
        let Ok(mut file) = std::fs::File::open(&path) else {
            continue;
        };
        let size = file.metadata()?.len();
        let mut head = Vec::with_capacity(2 + f.len() + 8);
        head.extend_from_slice(&(f.len() as u16).to_le_bytes());
        head.extend_from_slice(f.as_bytes());
        head.extend_from_slice(&size.to_le_bytes());
        send(tx, head)?;
        let mut hash = Sha256::new();
        for (start, end) in data_extents(&file, size)? {
            let mut ext = Vec::with_capacity(16);
            ext.extend_from_slice(&start.to_le_bytes());
            ext.extend_from_slice(&(end - start).to_le_bytes());
            hash.update(&ext);
            send(tx, ext)?;
            file.seek(SeekFrom::Start(start))?;
            let mut left = end - start;
            while left > 0 {
                let n = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
                let mut buf = vec![0u8; n];
                file.read_exact(&mut buf)?;
                hash.update(&buf);
                send(tx, buf)?;
                left -= n as u64;
            }
        }
        let mut tail = Vec::with_capacity(48);
        tail.extend_from_slice(&END.to_le_bytes());
        tail.extend_from_slice(&0u64.to_le_bytes());
        hash.update(&tail);
        tail.extend_from_slice(&hash.finalize());
        send(tx, tail)?;
    }
    send(tx, 0u16.to_le_bytes().to_vec())
}

/// The data regions of `file` (holes left out), as `[start, end)` pairs.
fn data_extents(file: &std::fs::File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: u64 = 0;
    while pos < size {
        let off = i64::try_from(pos).map_err(std::io::Error::other)?;
        // SAFETY: lseek on a descriptor we own; no memory is passed.
        let data = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole is left
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (start, end) = (data as u64, (hole as u64).min(size));
        if end <= start {
            break;
        }
        out.push((start, end));
        pos = end;
    }
    Ok(out)
}

async fn read_u64<R: AsyncRead + Unpin>(r: &mut R) -> Result<u64, ImportError> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b).await.map_err(|_| ImportError::Short)?;
    Ok(u64::from_le_bytes(b))
}

/// Build template `name` from `body` (see the module docs) and publish it.
pub async fn import<R: AsyncRead + Unpin>(
    store: &Store,
    name: &TemplateName,
    body: R,
) -> Result<TemplateEntry, ImportError> {
    if store.exists(name) {
        return Err(ImportError::Exists(name.clone()));
    }
    let tmp = store.begin(name).map_err(|e| match e {
        TemplateError::Exists(n) => ImportError::Exists(n),
        other => ImportError::Store(other),
    })?;
    let result = async {
        read_files(&tmp, body).await?;
        store.commit(&tmp, name).map_err(|e| match e {
            TemplateError::Exists(n) => ImportError::Exists(n),
            other => ImportError::Store(other),
        })
    }
    .await;
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    Ok(store.entry(name.clone()))
}

async fn read_files<R: AsyncRead + Unpin>(tmp: &Path, mut body: R) -> Result<(), ImportError> {
    let mut magic = [0u8; 8];
    body.read_exact(&mut magic)
        .await
        .map_err(|_| ImportError::Short)?;
    if &magic != MAGIC {
        return Err(malformed("bad magic"));
    }
    let mut seen: Vec<&str> = Vec::new();
    loop {
        let mut len = [0u8; 2];
        body.read_exact(&mut len)
            .await
            .map_err(|_| ImportError::Short)?;
        let len = usize::from(u16::from_le_bytes(len));
        if len == 0 {
            break;
        }
        if len > 64 {
            return Err(malformed("file name too long"));
        }
        let mut raw = vec![0u8; len];
        body.read_exact(&mut raw)
            .await
            .map_err(|_| ImportError::Short)?;
        let file = FILES
            .iter()
            .copied()
            .find(|f| f.as_bytes() == raw.as_slice())
            .ok_or_else(|| malformed("unknown file in the stream"))?;
        if seen.contains(&file) {
            return Err(malformed(format!("{file} sent twice")));
        }
        seen.push(file);
        let size = read_u64(&mut body).await?;
        if size > MAX_FILE_BYTES {
            return Err(malformed(format!(
                "{file} is {size} bytes, over the {MAX_FILE_BYTES} a copy may have"
            )));
        }
        read_file(tmp, file, size, &mut body).await?;
    }
    for needed in [templates::ROOTFS, templates::META] {
        if !seen.contains(&needed) {
            return Err(malformed(format!("{needed} missing")));
        }
    }
    // Nothing may follow the end.
    let mut extra = [0u8; 1];
    match body.read(&mut extra).await {
        Ok(0) => Ok(()),
        Ok(_) => Err(malformed("data after the end of the stream")),
        Err(_) => Err(ImportError::Short),
    }
}

async fn read_file<R: AsyncRead + Unpin>(
    tmp: &Path,
    file: &str,
    size: u64,
    body: &mut R,
) -> Result<(), ImportError> {
    let io = |source| ImportError::Io {
        file: file.to_owned(),
        source,
    };
    let path = tmp.join(file);
    let out = std::fs::File::create(&path).map_err(io)?;
    // warm.json holds the saved guest's token: root only, as the agent writes it.
    let mode = if file == templates::WARM_META {
        0o600
    } else {
        0o644
    };
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    out.set_len(size).map_err(io)?;
    let mut hash = Sha256::new();
    let mut pos = 0u64;
    loop {
        let start = read_u64(body).await?;
        let len = read_u64(body).await?;
        hash.update(start.to_le_bytes());
        hash.update(len.to_le_bytes());
        if start == END {
            if len != 0 {
                return Err(malformed("bad end of file"));
            }
            break;
        }
        let end = start
            .checked_add(len)
            .filter(|&e| e <= size && start >= pos && len > 0)
            .ok_or_else(|| malformed(format!("extent of {file} out of order or bounds")))?;
        let mut at = start;
        while at < end {
            let n = usize::try_from((end - at).min(CHUNK as u64)).unwrap_or(CHUNK);
            let mut buf = vec![0u8; n];
            body.read_exact(&mut buf)
                .await
                .map_err(|_| ImportError::Short)?;
            hash.update(&buf);
            out.write_all_at(&buf, at).map_err(io)?;
            at += n as u64;
        }
        pos = end;
    }
    let mut sum = [0u8; 32];
    body.read_exact(&mut sum)
        .await
        .map_err(|_| ImportError::Short)?;
    if sum[..] != hash.finalize()[..] {
        return Err(ImportError::Checksum {
            file: file.to_owned(),
        });
    }
    Ok(())
}

fn error(status: http::StatusCode, code: &str, message: String) -> axum::response::Response {
    use axum::response::IntoResponse;
    let body = serde_json::json!({ "error": { "code": code, "message": message } });
    (status, axum::Json(body)).into_response()
}

/// `GET /templates/{name}/export`: the template as a stream (404 if absent).
pub(crate) async fn handle_export(
    axum::extract::State(ctx): axum::extract::State<std::sync::Arc<crate::Ctx>>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let name: TemplateName = match name.parse() {
        Ok(n) => n,
        Err(e) => {
            return error(
                http::StatusCode::BAD_REQUEST,
                "invalid_argument",
                format!("{e}"),
            )
        }
    };
    let Some(mut rx) = export(&ctx.templates, &name) else {
        return error(
            http::StatusCode::NOT_FOUND,
            "not_found",
            format!("template {name} not found"),
        );
    };
    tracing::info!(template = %name, "template export started");
    let body = axum::body::Body::from_stream(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)));
    (
        [(http::header::CONTENT_TYPE, "application/octet-stream")],
        body,
    )
        .into_response()
}

/// `PUT /templates/{name}/import`: build the template from the body (201 with what
/// was made; 400 for a bad stream, 409 when it exists).
pub(crate) async fn handle_import(
    axum::extract::State(ctx): axum::extract::State<std::sync::Arc<crate::Ctx>>,
    axum::extract::Path(name): axum::extract::Path<String>,
    body: axum::body::Body,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    use futures::TryStreamExt;
    let name: TemplateName = match name.parse() {
        Ok(n) => n,
        Err(e) => {
            return error(
                http::StatusCode::BAD_REQUEST,
                "invalid_argument",
                format!("{e}"),
            )
        }
    };
    let reader =
        tokio_util::io::StreamReader::new(body.into_data_stream().map_err(std::io::Error::other));
    let started = std::time::Instant::now();
    match import(&ctx.templates, &name, reader).await {
        Ok(e) => {
            tracing::info!(template = %name, ms = started.elapsed().as_millis() as u64,
                allocated = e.allocated_bytes, "template imported");
            let body = serde_json::json!({
                "name": e.name.as_str(),
                "allocated_bytes": e.allocated_bytes,
                "apparent_bytes": e.apparent_bytes,
                "has_memory": e.warm.is_some(),
                "disk_size_mb": e.disk_size_mb,
            });
            (http::StatusCode::CREATED, axum::Json(body)).into_response()
        }
        Err(e) => {
            tracing::warn!(template = %name, error = %crate::error_chain(&e), "template import refused");
            let (status, code) = match &e {
                ImportError::Exists(_) => (http::StatusCode::CONFLICT, "already_exists"),
                ImportError::Malformed(_) | ImportError::Short | ImportError::Checksum { .. } => {
                    (http::StatusCode::BAD_REQUEST, "invalid_argument")
                }
                ImportError::Store(_) | ImportError::Io { .. } => {
                    (http::StatusCode::INTERNAL_SERVER_ERROR, "internal")
                }
            };
            error(status, code, e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn collect(mut rx: mpsc::Receiver<Result<Bytes, std::io::Error>>) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(b) = rx.recv().await {
            out.extend_from_slice(&b.unwrap());
        }
        out
    }

    fn template(store: &Store, name: &TemplateName) {
        let tmp = store.begin(name).unwrap();
        // Sparse: 8 MiB with data at its start and near its end.
        let f = std::fs::File::create(tmp.join(templates::ROOTFS)).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(b"superblock", 1024).unwrap();
        f.write_all_at(&[7u8; 5000], (8 << 20) - 5000).unwrap();
        std::fs::write(tmp.join(templates::META), br#"{"name":"snap-x"}"#).unwrap();
        std::fs::write(tmp.join(templates::MEMORY), vec![3u8; 100_000]).unwrap();
        store.commit(&tmp, name).unwrap();
    }

    #[tokio::test]
    async fn a_template_copies_whole_and_bad_streams_leave_nothing() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (src, dst) = (Store::new(a.path().into()), Store::new(b.path().into()));
        let name: TemplateName = "snap-copyme".parse().unwrap();
        template(&src, &name);
        assert!(export(&src, &"snap-nothing".parse().unwrap()).is_none());
        let stream = collect(export(&src, &name).unwrap()).await;
        // Holes are not sent: far less than the 8 MiB disk.
        assert!(stream.len() < 1 << 20, "{} bytes", stream.len());

        // Hostile or broken variants: refused, nothing published, no build left.
        let mut bad_sum = stream.clone();
        let last_sum = bad_sum.len() - 3;
        bad_sum[last_sum] ^= 1;
        let mut bad_magic = stream.clone();
        bad_magic[0] = b'X';
        let mut trailing = stream.clone();
        trailing.push(0);
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&(templates::ROOTFS.len() as u16).to_le_bytes());
        huge.extend_from_slice(templates::ROOTFS.as_bytes());
        huge.extend_from_slice(&(MAX_FILE_BYTES + 1).to_le_bytes());
        let mut unknown = MAGIC.to_vec();
        unknown.extend_from_slice(&5u16.to_le_bytes());
        unknown.extend_from_slice(b"../x1");
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("short", stream[..stream.len() / 2].to_vec()),
            ("checksum", bad_sum),
            ("magic", bad_magic),
            ("trailing", trailing),
            ("huge", huge),
            ("unknown file", unknown),
            ("empty", Vec::new()),
        ];
        for (what, bytes) in cases {
            let err = import(&dst, &name, bytes.as_slice()).await.unwrap_err();
            assert!(!dst.exists(&name), "{what}: published anyway ({err})");
            let left: Vec<_> = std::fs::read_dir(b.path()).unwrap().flatten().collect();
            assert!(left.is_empty(), "{what}: left {left:?}");
        }

        let entry = import(&dst, &name, stream.as_slice()).await.unwrap();
        assert_eq!(entry.name, name);
        for f in [templates::ROOTFS, templates::META, templates::MEMORY] {
            let want = std::fs::read(src.dir(&name).join(f)).unwrap();
            let got = std::fs::read(dst.dir(&name).join(f)).unwrap();
            assert!(want == got, "{f} differs");
        }
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(dst.dir(&name).join(templates::ROOTFS))
            .unwrap()
            .blocks();
        assert!(
            blocks * 512 < 1 << 20,
            "the copy is not sparse: {blocks} blocks"
        );
        // A second import of the same name is refused.
        assert!(matches!(
            import(&dst, &name, stream.as_slice()).await,
            Err(ImportError::Exists(_))
        ));
    }
}
