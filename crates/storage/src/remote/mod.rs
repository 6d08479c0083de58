//! Remote byte sources: objects behind `http://`/`https://` URLs, read with HTTP range
//! requests, and `s3://bucket/key` objects, read with SigV4-presigned range requests.
//!
//! One [`Remote`] client serves every object of a checkpoint: it holds the connection pool,
//! the retry policy, a gate that bounds the requests in flight, and request counters.
//! Reads stream from the socket straight into the caller's buffers, so the bytes in flight
//! are at most `max_in_flight` requests and nothing is buffered whole.
//!
//! Each object's validator (ETag, else Last-Modified) is recorded by the first request and
//! checked on every later response (and sent as `If-Match`): an object replaced during a
//! load is an error, never a mix of old and new bytes.

mod client;
mod s3;
mod store;

pub use crate::RemoteStats;
pub use s3::S3Config;
pub use store::RemoteStore;

use crate::error::{Error, Result, S3ConfigError};
use crate::location::has_scheme;
use crate::{BackendKind, ByteSource};
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

/// How remote objects are read: [`RemoteOptions::default`] and the setters (one per field).
#[derive(Clone)]
#[non_exhaustive]
pub struct RemoteOptions {
    /// Most requests in flight at once, over all objects of the client (default 16).
    pub max_in_flight: usize,
    /// Retries of one request after a timeout, a dropped connection, a short body, 429 or
    /// 5xx, before the read fails (default 8). A retry that made progress (received part of
    /// the body) does not count against this.
    pub max_retries: u32,
    /// First retry delay, doubled per retry with jitter (default 100 ms). A server's
    /// `Retry-After` takes precedence.
    pub backoff: Duration,
    /// Longest delay between retries (default 10 s).
    pub max_backoff: Duration,
    /// Connection timeout (default 10 s).
    pub connect_timeout: Duration,
    /// Longest wait for a response or for the next bytes of a body (default 60 s).
    pub read_timeout: Duration,
    /// Where and as whom to reach S3; `None` reads the usual AWS environment variables and
    /// profile files on first use (see [`S3Config::from_env`]).
    pub s3: Option<S3Config>,
    /// Sent as `Authorization: Bearer ...` with `http(s)://` requests (a model hub's token
    /// for gated repositories), to the URL's own origin (scheme, host and port) only: never
    /// to S3, never to the host a redirect leads to (a hub's CDN), never over plain http
    /// after https.
    pub bearer_token: Option<String>,
    /// A PEM file of CA certificates to trust for https (a private object store or hub)
    /// instead of the built-in Mozilla roots. `None`: the file named by `SSL_CERT_FILE` or
    /// `AWS_CA_BUNDLE` when set, else the Mozilla roots.
    pub ca_certs: Option<std::path::PathBuf>,
}

impl fmt::Debug for RemoteOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteOptions")
            .field("max_in_flight", &self.max_in_flight)
            .field("max_retries", &self.max_retries)
            .field("backoff", &self.backoff)
            .field("max_backoff", &self.max_backoff)
            .field("connect_timeout", &self.connect_timeout)
            .field("read_timeout", &self.read_timeout)
            .field("s3", &self.s3)
            // Secrets stay out of logs.
            .field("bearer_token", &self.bearer_token.as_ref().map(|_| "<set>"))
            .field("ca_certs", &self.ca_certs)
            .finish()
    }
}

impl RemoteOptions {
    /// Most requests in flight at once (see the field).
    pub fn max_in_flight(mut self, max_in_flight: usize) -> RemoteOptions {
        self.max_in_flight = max_in_flight;
        self
    }

    /// Retries of one request before a read fails (see the field).
    pub fn max_retries(mut self, max_retries: u32) -> RemoteOptions {
        self.max_retries = max_retries;
        self
    }

    /// First retry delay (see the field).
    pub fn backoff(mut self, backoff: Duration) -> RemoteOptions {
        self.backoff = backoff;
        self
    }

    /// Longest delay between retries.
    pub fn max_backoff(mut self, max_backoff: Duration) -> RemoteOptions {
        self.max_backoff = max_backoff;
        self
    }

    /// Connection timeout.
    pub fn connect_timeout(mut self, connect_timeout: Duration) -> RemoteOptions {
        self.connect_timeout = connect_timeout;
        self
    }

    /// Longest wait for a response or for the next bytes of a body.
    pub fn read_timeout(mut self, read_timeout: Duration) -> RemoteOptions {
        self.read_timeout = read_timeout;
        self
    }

    /// Where and as whom to reach S3 (see the field).
    pub fn s3(mut self, s3: Option<S3Config>) -> RemoteOptions {
        self.s3 = s3;
        self
    }

    /// The bearer token for `http(s)://` requests (see the field).
    pub fn bearer_token(mut self, bearer_token: Option<String>) -> RemoteOptions {
        self.bearer_token = bearer_token;
        self
    }

    /// A PEM file of CA certificates to trust for https (see the field).
    pub fn ca_certs(mut self, ca_certs: Option<std::path::PathBuf>) -> RemoteOptions {
        self.ca_certs = ca_certs;
        self
    }
}

impl Default for RemoteOptions {
    fn default() -> RemoteOptions {
        RemoteOptions {
            max_in_flight: 16,
            max_retries: 8,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(60),
            s3: None,
            bearer_token: None,
            ca_certs: None,
        }
    }
}

/// A client for remote objects; cheap to clone (clones share the pool, gate and counters).
#[derive(Clone)]
pub struct Remote {
    inner: Arc<Inner>,
}

struct Inner {
    agent: ureq::Agent,
    options: RemoteOptions,
    gate: Gate,
    s3: OnceLock<Result<S3Config, S3ConfigError>>,
    requests: AtomicU64,
    retries: AtomicU64,
    bytes: AtomicU64,
}

impl fmt::Debug for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Remote")
            .field("options", &self.inner.options)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Remote {
    /// A client with `options`; fails only when `ca_certs` cannot be read.
    pub fn new(options: RemoteOptions) -> Result<Remote> {
        let max_in_flight = options.max_in_flight.max(1);
        let mut tls = ureq::tls::TlsConfig::builder();
        let ca_certs = options.ca_certs.clone().or_else(|| {
            ["SSL_CERT_FILE", "AWS_CA_BUNDLE"]
                .iter()
                .find_map(|var| std::env::var_os(var).filter(|v| !v.is_empty()))
                .map(std::path::PathBuf::from)
        });
        if let Some(path) = &ca_certs {
            tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&read_pem_certs(path)?));
        }
        let config = ureq::Agent::config_builder()
            .tls_config(tls.build())
            // Status codes are interpreted here (retry 5xx/429, EOF on 416, ...).
            .http_status_as_error(false)
            .timeout_connect(Some(options.connect_timeout))
            .timeout_recv_response(Some(options.read_timeout))
            .timeout_per_read(Some(options.read_timeout))
            .max_idle_connections(max_in_flight.max(10))
            .max_idle_connections_per_host(max_in_flight)
            .user_agent(concat!("weightlift/", env!("CARGO_PKG_VERSION")))
            // Redirects are followed in `get`, which decides per hop whether the token goes.
            .max_redirects(0)
            .build();
        let s3 = OnceLock::new();
        if let Some(config) = &options.s3 {
            let _ = s3.set(Ok(config.clone()));
        }
        Ok(Remote {
            inner: Arc::new(Inner {
                agent: config.new_agent(),
                gate: Gate::new(max_in_flight),
                options,
                s3,
                requests: AtomicU64::new(0),
                retries: AtomicU64::new(0),
                bytes: AtomicU64::new(0),
            }),
        })
    }

    /// The options the client was built with.
    pub fn options(&self) -> &RemoteOptions {
        &self.inner.options
    }

    /// Requests, retries and bytes so far.
    pub fn stats(&self) -> RemoteStats {
        RemoteStats {
            requests: self.inner.requests.load(Ordering::Relaxed),
            retries: self.inner.retries.load(Ordering::Relaxed),
            bytes: self.inner.bytes.load(Ordering::Relaxed),
        }
    }

    /// Opens the object at `url` with one ranged request for its first `probe` bytes, which
    /// also tells its length and validator. Returns the source and the bytes received (fewer
    /// than `probe` only when the object is shorter).
    pub fn open(&self, url: &str, probe: u64) -> Result<(RemoteSource, Vec<u8>)> {
        let object = Object::parse(url)?;
        let (len, validator, head, redirected) = self.probe(&object, url, probe.max(1))?;
        let source = RemoteSource {
            remote: self.clone(),
            object,
            url: url.to_string(),
            len,
            seen_len: AtomicU64::new(len),
            validator,
            redirected,
        };
        Ok((source, head))
    }

    /// The whole object at `url`, or `None` when there is no such object. Objects longer
    /// than `max_len` are an error (this is for small files such as an index).
    pub fn fetch(&self, url: &str, max_len: u64) -> Result<Option<Vec<u8>>> {
        let object = Object::parse(url)?;
        self.fetch_object(&object, url, max_len)
    }

    /// Names of the objects directly under the S3 prefix `url` whose names end with
    /// `suffix`, relative to the prefix and sorted. Plain HTTP has no listing: that is an
    /// [`Error::Unsupported`].
    pub fn list(&self, url: &str, suffix: &str) -> Result<Vec<String>> {
        match Object::parse(url)? {
            Object::Http(_) | Object::Presigned(_) => {
                Err(Error::Unsupported("HTTP servers cannot be listed"))
            }
            Object::S3 { bucket, key } => self.list_s3(url, &bucket, &key, suffix),
        }
    }

    fn s3_config(&self) -> Result<&S3Config> {
        self.inner
            .s3
            .get_or_init(S3Config::from_env)
            .as_ref()
            .map_err(|e| Error::S3Config(e.clone()))
    }
}

/// The certificates of a PEM file (at least one).
fn read_pem_certs(path: &std::path::Path) -> Result<Vec<ureq::tls::Certificate<'static>>> {
    let invalid = |reason: String| Error::CaCerts {
        path: path.to_path_buf(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| invalid(e.to_string()))?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        if let ureq::tls::PemItem::Certificate(cert) = item.map_err(|e| invalid(e.to_string()))? {
            certs.push(cert);
        }
    }
    if certs.is_empty() {
        return Err(invalid("no PEM certificate in the file".into()));
    }
    Ok(certs)
}

/// Where an object lives.
#[derive(Debug, Clone)]
enum Object {
    Http(String),
    S3 {
        bucket: String,
        key: String,
    },
    /// A URL signed already (an S3 listing page): sent as is, without the bearer token.
    Presigned(String),
}

impl Object {
    fn parse(url: &str) -> Result<Object> {
        let invalid = |why: &str| Error::InvalidLocation {
            reason: why.to_string(),
        };
        if has_scheme(url, "s3://") {
            let rest = &url[5..];
            let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.len() < 3 {
                return Err(invalid(
                    "an S3 URL is s3://BUCKET/KEY (bucket names have 3+ characters)",
                ));
            }
            return Ok(Object::S3 {
                bucket: bucket.to_string(),
                key: key.to_string(),
            });
        }
        if !(has_scheme(url, "http://") || has_scheme(url, "https://")) {
            return Err(invalid("not an http://, https:// or s3:// URL"));
        }
        url::Url::parse(url).map_err(|e| invalid(&e.to_string()))?;
        Ok(Object::Http(url.to_string()))
    }
}

/// What identifies one version of an object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Validator {
    etag: Option<String>,
    last_modified: Option<String>,
}

/// A remote object opened for positioned reads.
#[derive(Debug)]
pub struct RemoteSource {
    remote: Remote,
    object: Object,
    url: String,
    len: u64,
    /// The length as the server last reported it (less than `len` once the object shrank).
    seen_len: AtomicU64,
    validator: Validator,
    /// Whether the object is served through a redirect (a hub's CDN): then `If-Match`,
    /// which the redirecting server would judge against its own validator, is not sent,
    /// and each answer's validator is compared instead.
    redirected: bool,
}

impl RemoteSource {
    /// The object's URL.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl ByteSource for RemoteSource {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.read_scatter_at(offset, &mut [buf])
    }

    fn read_scatter_at(&self, offset: u64, bufs: &mut [&mut [u8]]) -> io::Result<()> {
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        if offset.checked_add(total).is_none_or(|end| end > self.len) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "bytes {offset}..{} are past the end of the object ({} bytes)",
                    offset.saturating_add(total),
                    self.len
                ),
            ));
        }
        self.remote.read_range(
            &self.object,
            &self.url,
            offset,
            bufs,
            (&self.validator, self.redirected),
            &self.seen_len,
        )
    }

    fn current_len(&self) -> Option<u64> {
        Some(self.seen_len.load(Ordering::Relaxed))
    }

    fn kind(&self) -> BackendKind {
        match self.object {
            Object::Http(_) | Object::Presigned(_) => BackendKind::Http,
            Object::S3 { .. } => BackendKind::S3,
        }
    }
}

/// A counting semaphore: at most `n` requests in flight.
struct Gate {
    free: Mutex<usize>,
    freed: Condvar,
}

struct Permit<'a>(&'a Gate);

impl Gate {
    fn new(n: usize) -> Gate {
        Gate {
            free: Mutex::new(n),
            freed: Condvar::new(),
        }
    }

    fn acquire(&self) -> Permit<'_> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        while *free == 0 {
            free = self.freed.wait(free).unwrap_or_else(|e| e.into_inner());
        }
        *free -= 1;
        Permit(self)
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.0.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_objects() {
        match Object::parse("s3://bucket/a/b.safetensors").unwrap() {
            Object::S3 { bucket, key } => {
                assert_eq!(bucket, "bucket");
                assert_eq!(key, "a/b.safetensors");
            }
            other => panic!("{other:?}"),
        }
        assert!(Object::parse("s3://b/x").is_err(), "bucket too short");
        assert!(Object::parse("http://[::1/x").is_err());
        assert!(Object::parse("ftp://x/y").is_err());
    }
}
