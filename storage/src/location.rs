//! A URL or local path → a store and a prefix in it.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use object_store::path::Path as StorePath;
use object_store::{
    ClientOptions, GetOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    RetryConfig,
};

use crate::error::{credential_hint, StorageError};
use crate::{block_on, Result};

/// Whether `text` is a URL (`s3://…`, `gs://…`, `file:///…`) rather than a local path: the
/// rule `datasets.toml` and every CLI use (`llava_formats::config`).
pub use llava_formats::config::is_url_str as is_url;

/// Size and ETag of an object, as listed or first read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub size: u64,
    pub e_tag: Option<String>,
}

/// A folder of objects: a store (S3, GCS, Azure, HTTP or the local filesystem) and a prefix.
#[derive(Clone)]
pub struct Location {
    store: Arc<dyn ObjectStore>,
    prefix: StorePath,
    /// The location as given, without a trailing `/`: error messages name `{url}/{key}`.
    url: String,
    scheme: String,
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

/// Retries on timeouts, 5xx and throttling: object_store's backoff, for up to `LLAVA_STORAGE_RETRY_SECS`
/// (default 180 s) per request, so that a restarted server or a throttled bucket is waited for.
fn retry_config() -> RetryConfig {
    let secs = std::env::var("LLAVA_STORAGE_RETRY_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(180);
    RetryConfig {
        max_retries: 100,
        retry_timeout: Duration::from_secs(secs),
        ..RetryConfig::default()
    }
}

fn client_options() -> ClientOptions {
    ClientOptions::new()
        .with_connect_timeout(Duration::from_secs(10))
        .with_timeout(Duration::from_secs(120))
}

/// Without any AWS credential variable object_store falls back to the EC2 instance metadata
/// service, and off EC2 that means minutes of retries before a vague error. So: when no variable
/// is set (and `AWS_SKIP_SIGNATURE` does not ask for anonymous reads), the metadata endpoint
/// (`AWS_METADATA_ENDPOINT`, default 169.254.169.254:80) must accept a TCP connection within a
/// second, else we stop at once naming the variables. `AWS_EC2_METADATA_DISABLED=true` skips
/// the probe and the service.
fn no_s3_credentials() -> Option<String> {
    let set = |v: &str| std::env::var_os(v).is_some_and(|x| !x.is_empty());
    let truthy = |v: &str| {
        std::env::var(v).is_ok_and(|x| matches!(x.to_ascii_lowercase().as_str(), "1" | "true"))
    };
    let sources = [
        "AWS_ACCESS_KEY_ID",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ];
    if sources.iter().any(|v| set(v)) || truthy("AWS_SKIP_SIGNATURE") {
        return None;
    }
    let missing = "no S3 credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not set \
                   (nor AWS_WEB_IDENTITY_TOKEN_FILE or AWS_CONTAINER_CREDENTIALS_RELATIVE_URI)";
    if truthy("AWS_EC2_METADATA_DISABLED") {
        return Some(format!(
            "{missing}, and AWS_EC2_METADATA_DISABLED rules out the instance metadata service; \
             set AWS_SKIP_SIGNATURE=true for a public bucket"
        ));
    }
    let endpoint = std::env::var("AWS_METADATA_ENDPOINT")
        .unwrap_or_else(|_| "http://169.254.169.254".to_string());
    let reachable = url::Url::parse(&endpoint)
        .ok()
        .and_then(|u| u.socket_addrs(|| Some(80)).ok())
        .into_iter()
        .flatten()
        .any(|addr| std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok());
    (!reachable).then(|| {
        format!(
            "{missing}, and no EC2 instance metadata service answers at {endpoint} \
             (AWS_METADATA_ENDPOINT); set AWS_SKIP_SIGNATURE=true for a public bucket"
        )
    })
}

/// rustls needs a process-wide crypto provider (ring: no C toolchain beyond cc).
fn install_tls() {
    // Deprecated only for lacking post-quantum key exchange (aws-lc-rs has it, at the cost of
    // a long C build); plain TLS 1.2/1.3 to the clouds is what we need.
    #[allow(deprecated)]
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl Location {
    /// Opens `target`: `s3://bucket/prefix` (also S3-compatible servers through
    /// `AWS_ENDPOINT_URL`), `gs://bucket/prefix`, `az://container/prefix`, `https://host/prefix`,
    /// `file:///abs/path` or a plain local path.
    pub fn parse(target: &str) -> Result<Self> {
        let target = target.trim_end_matches('/');
        let err = |message: String| StorageError::Location {
            url: target.to_string(),
            message,
        };
        if !is_url(target) {
            let path = std::path::absolute(target).map_err(|e| err(e.to_string()))?;
            return Self::local(target, &path);
        }
        let url = url::Url::parse(target).map_err(|e| err(e.to_string()))?;
        let scheme = url.scheme().to_ascii_lowercase();
        let prefix = StorePath::parse(url.path().trim_start_matches('/'))
            .map_err(|e| err(format!("path: {e}")))?;
        let store: Arc<dyn ObjectStore> = match scheme.as_str() {
            "file" => {
                let path = url
                    .to_file_path()
                    .map_err(|()| err("not a local absolute path".into()))?;
                return Self::local(target, &path);
            }
            "s3" | "s3a" => {
                install_tls();
                // Half a key pair is a mistake to name now, not a request to refuse later.
                let set = |v: &str| std::env::var_os(v).is_some_and(|x| !x.is_empty());
                match (set("AWS_ACCESS_KEY_ID"), set("AWS_SECRET_ACCESS_KEY")) {
                    (true, false) => {
                        return Err(err(
                            "AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not".into(),
                        ))
                    }
                    (false, true) => {
                        return Err(err(
                            "AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not".into(),
                        ))
                    }
                    _ => {}
                }
                if let Some(missing) = no_s3_credentials() {
                    return Err(err(missing));
                }
                let mut builder = object_store::aws::AmazonS3Builder::from_env()
                    .with_url(target)
                    .with_retry(retry_config())
                    .with_client_options(client_options());
                // An S3-compatible endpoint on plain http (a local server, MinIO) needs no
                // separate AWS_ALLOW_HTTP: the endpoint's scheme says it.
                let endpoint = std::env::var("AWS_ENDPOINT_URL_S3")
                    .or_else(|_| std::env::var("AWS_ENDPOINT_URL"))
                    .or_else(|_| std::env::var("AWS_ENDPOINT"));
                if endpoint.is_ok_and(|e| e.starts_with("http://")) {
                    builder = builder.with_allow_http(true);
                }
                Arc::new(builder.build().map_err(|e| err(e.to_string()))?)
            }
            "gs" => {
                install_tls();
                Arc::new(
                    object_store::gcp::GoogleCloudStorageBuilder::from_env()
                        .with_url(target)
                        .with_retry(retry_config())
                        .with_client_options(client_options())
                        .build()
                        .map_err(|e| err(format!("{e} ({})", credential_hint("gs"))))?,
                )
            }
            "az" | "azure" | "abfs" | "abfss" | "adl" => {
                install_tls();
                Arc::new(
                    object_store::azure::MicrosoftAzureBuilder::from_env()
                        .with_url(target)
                        .with_retry(retry_config())
                        .with_client_options(client_options())
                        .build()
                        .map_err(|e| err(format!("{e} ({})", credential_hint("az"))))?,
                )
            }
            "http" | "https" => {
                install_tls();
                let origin = url.origin().ascii_serialization();
                Arc::new(
                    object_store::http::HttpBuilder::new()
                        .with_url(origin)
                        .with_retry(retry_config())
                        .with_client_options(client_options().with_allow_http(true))
                        .build()
                        .map_err(|e| err(e.to_string()))?,
                )
            }
            other => {
                return Err(err(format!(
                    "unknown scheme {other:?}: expected s3://, gs://, az://, https://, file:// \
                     or a local path"
                )))
            }
        };
        Ok(Location {
            store,
            prefix,
            url: target.to_string(),
            scheme,
        })
    }

    fn local(target: &str, path: &std::path::Path) -> Result<Self> {
        let err = |message: String| StorageError::Location {
            url: target.to_string(),
            message,
        };
        let store = object_store::local::LocalFileSystem::new();
        let prefix = StorePath::from_filesystem_path(path).map_err(|e| err(e.to_string()))?;
        Ok(Location {
            store: Arc::new(store),
            prefix,
            url: target.to_string(),
            scheme: "file".into(),
        })
    }

    /// Whether this is an object store (not the local filesystem).
    pub fn is_remote(&self) -> bool {
        self.scheme != "file"
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The location of `key` (a `/`-separated path below this one) as a sub-location.
    pub fn join(&self, key: &str) -> Location {
        Location {
            store: self.store.clone(),
            prefix: self.path(key),
            url: format!("{}/{}", self.url, key.trim_matches('/')),
            scheme: self.scheme.clone(),
        }
    }

    fn path(&self, key: &str) -> StorePath {
        key.split('/')
            .filter(|p| !p.is_empty())
            .fold(self.prefix.clone(), |p, part| p.join(part))
    }

    /// `{url}/{key}`: how errors name objects.
    pub fn object_url(&self, key: &str) -> String {
        format!("{}/{}", self.url, key)
    }

    fn error(&self, key: &str, e: object_store::Error) -> StorageError {
        StorageError::from_store(self.object_url(key), &self.scheme, e)
    }

    /// Size and ETag of `key`, or `None` when it does not exist.
    pub fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        match block_on(self.store.head(&self.path(key))) {
            Ok(meta) => Ok(Some(ObjectInfo {
                size: meta.size,
                e_tag: meta.e_tag,
            })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error(key, e)),
        }
    }

    /// The object `key` when its size is `expected` (the manifest's): a missing or different
    /// object stops here, named.
    pub fn check(&self, key: &str, expected: u64) -> Result<ObjectInfo> {
        let info = self.head(key)?.ok_or_else(|| StorageError::Missing {
            object: self.object_url(key),
        })?;
        if info.size != expected {
            return Err(StorageError::Changed {
                object: self.object_url(key),
                detail: format!("{} bytes, the manifest says {expected}", info.size),
            });
        }
        Ok(info)
    }

    /// The whole object `key`.
    pub fn read(&self, key: &str) -> Result<Bytes> {
        let size = self
            .head(key)?
            .ok_or_else(|| StorageError::Missing {
                object: self.object_url(key),
            })?
            .size;
        self.read_range(key, 0..size, None)
    }

    /// Bytes `range` of `key`. With `expect`, the object must still have that size and ETag
    /// (a replaced object stops the read, named). A connection cut mid-range resumes from the
    /// last byte received (up to `RESUMES` times); object_store retries each request itself.
    pub fn read_range(
        &self,
        key: &str,
        range: Range<u64>,
        expect: Option<&ObjectInfo>,
    ) -> Result<Bytes> {
        const RESUMES: usize = 10;
        let path = self.path(key);
        let want = (range.end - range.start) as usize;
        if want == 0 {
            return Ok(Bytes::new());
        }
        block_on(async {
            let mut out = BytesMut::with_capacity(want);
            let mut resumes = 0;
            loop {
                let start = range.start + out.len() as u64;
                let options = GetOptions {
                    range: Some((start..range.end).into()),
                    if_match: expect.and_then(|e| e.e_tag.clone()),
                    ..GetOptions::default()
                };
                let result = self
                    .store
                    .get_opts(&path, options)
                    .await
                    .map_err(|e| self.error(key, e))?;
                if let Some(e) = expect {
                    if result.meta.size != e.size {
                        return Err(StorageError::Changed {
                            object: self.object_url(key),
                            detail: format!("{} bytes, expected {}", result.meta.size, e.size),
                        });
                    }
                }
                let mut stream = result.into_stream();
                let mut cut = None;
                while let Some(chunk) = stream.next().await {
                    match chunk {
                        Ok(chunk) => out.extend_from_slice(&chunk),
                        Err(e) => {
                            cut = Some(e);
                            break;
                        }
                    }
                }
                match cut {
                    None if out.len() >= want => {
                        out.truncate(want);
                        return Ok(out.freeze());
                    }
                    None => {
                        return Err(StorageError::Changed {
                            object: self.object_url(key),
                            detail: format!(
                                "bytes {}..{} asked, the object ended at {}",
                                range.start,
                                range.end,
                                range.start + out.len() as u64
                            ),
                        })
                    }
                    Some(e) if resumes < RESUMES => {
                        resumes += 1;
                        tracing::warn!(
                            "{}: read cut at byte {} of {}..{} ({e}); resuming",
                            self.object_url(key),
                            range.start + out.len() as u64,
                            range.start,
                            range.end
                        );
                    }
                    Some(e) => return Err(self.error(key, e)),
                }
            }
        })
    }

    /// Copies object `key` to the local file `dest` in 64 MiB ranges (memory stays bounded);
    /// returns its size.
    pub fn download(&self, key: &str, dest: &std::path::Path) -> Result<u64> {
        use std::io::Write;
        let io = |source| StorageError::Io {
            path: dest.display().to_string(),
            source,
        };
        let info = self.head(key)?.ok_or_else(|| StorageError::Missing {
            object: self.object_url(key),
        })?;
        let mut out = std::io::BufWriter::new(std::fs::File::create(dest).map_err(io)?);
        let step = 64u64 << 20;
        let mut at = 0;
        while at < info.size {
            let end = (at + step).min(info.size);
            out.write_all(&self.read_range(key, at..end, Some(&info))?)
                .map_err(io)?;
            at = end;
        }
        out.flush().map_err(io)?;
        Ok(info.size)
    }

    /// Every object below `key` (recursively): keys relative to this location, and sizes.
    pub fn list(&self, key: &str) -> Result<Vec<(String, ObjectInfo)>> {
        let below = self.path(key);
        let prefix_parts = self.prefix.parts().count();
        block_on(async {
            let mut stream = self.store.list(Some(&below));
            let mut out = Vec::new();
            while let Some(meta) = stream.next().await {
                let meta = meta.map_err(|e| self.error(key, e))?;
                let rel: Vec<String> = meta
                    .location
                    .parts()
                    .skip(prefix_parts)
                    .map(|p| p.as_ref().to_string())
                    .collect();
                out.push((
                    rel.join("/"),
                    ObjectInfo {
                        size: meta.size,
                        e_tag: meta.e_tag,
                    },
                ));
            }
            out.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(out)
        })
    }

    /// Writes `bytes` to `key` in one request (small objects: records, the manifest).
    pub fn put(&self, key: &str, bytes: Bytes) -> Result<()> {
        block_on(self.store.put(&self.path(key), PutPayload::from(bytes)))
            .map(|_| ())
            .map_err(|e| self.error(key, e))
    }

    /// Writes `bytes` to `key` unless it exists. An existing object with the same bytes is
    /// success (a rerun of a finished build); different bytes are [`StorageError::Exists`].
    /// Stores without conditional puts (some S3-compatible servers) get a plain put after the
    /// existence check.
    pub fn put_if_absent(&self, key: &str, bytes: Bytes) -> Result<()> {
        let exists = |this: &Self| -> Result<()> {
            if this.read(key)? == bytes {
                Ok(())
            } else {
                Err(StorageError::Exists {
                    object: this.object_url(key),
                })
            }
        };
        if self.head(key)?.is_some() {
            return exists(self);
        }
        let options = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        let payload = PutPayload::from(bytes.clone());
        match block_on(self.store.put_opts(&self.path(key), payload, options)) {
            Ok(_) => Ok(()),
            Err(object_store::Error::AlreadyExists { .. }) => exists(self),
            Err(
                object_store::Error::NotImplemented { .. }
                | object_store::Error::NotSupported { .. },
            ) => self.put(key, bytes),
            Err(e) => Err(self.error(key, e)),
        }
    }

    /// Removes `key` (missing is fine).
    pub fn delete(&self, key: &str) -> Result<()> {
        match block_on(self.store.delete(&self.path(key))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error(key, e)),
        }
    }

    /// A multipart upload to `key`, written as a `std::io::Write`; the object appears only when
    /// [`crate::Upload::finish`] completes (dropped unfinished, it is aborted).
    pub fn upload(&self, key: &str) -> Result<crate::Upload> {
        let upload =
            block_on(self.store.put_multipart(&self.path(key))).map_err(|e| self.error(key, e))?;
        Ok(crate::Upload::new(
            upload,
            self.object_url(key),
            &self.scheme,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_paths() {
        assert!(is_url("s3://b/p") && is_url("gs://b") && is_url("file:///x"));
        assert!(!is_url("/data/s3:/x") && !is_url("out") && !is_url("://x"));
    }

    #[test]
    fn local_roundtrip_ranges_list_upload() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let loc = Location::parse(dir.path().to_str().unwrap()).unwrap();
        assert!(!loc.is_remote());
        loc.put("a/b.json", Bytes::from_static(b"hello world"))
            .unwrap();
        assert_eq!(loc.read("a/b.json").unwrap(), "hello world");
        let info = loc.check("a/b.json", 11).unwrap();
        assert_eq!(
            loc.read_range("a/b.json", 6..11, Some(&info)).unwrap(),
            "world"
        );
        assert!(matches!(
            loc.check("a/b.json", 12),
            Err(StorageError::Changed { .. })
        ));
        assert!(matches!(
            loc.check("a/missing", 1),
            Err(StorageError::Missing { .. })
        ));
        let mut up = loc.upload("big.bin").unwrap();
        let data: Vec<u8> = (0..(12u32 << 20)).map(|i| i as u8).collect();
        for chunk in data.chunks(1 << 20) {
            up.write_all(chunk).unwrap();
        }
        up.finish().unwrap();
        assert_eq!(loc.read("big.bin").unwrap().as_ref(), &data[..]);
        let listed: Vec<String> = loc.list("").unwrap().into_iter().map(|e| e.0).collect();
        assert_eq!(listed, ["a/b.json", "big.bin"]);
        loc.put_if_absent("m.json", Bytes::from_static(b"1"))
            .unwrap();
        loc.put_if_absent("m.json", Bytes::from_static(b"1"))
            .unwrap();
        assert!(matches!(
            loc.put_if_absent("m.json", Bytes::from_static(b"2")),
            Err(StorageError::Exists { .. })
        ));
    }
}
