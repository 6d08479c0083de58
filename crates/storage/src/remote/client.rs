//! The requests: ranged GETs with retries, body bytes streamed into the caller's buffers.

use super::{Object, Permit, Remote, RemoteOptions, Validator};
use crate::error::{Error, Result};
use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use instant_xml::FromXml;
use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use ureq::http::{Response, StatusCode};

/// Why one attempt failed.
pub(super) enum Failure {
    /// Worth another attempt (timeouts, dropped connections, short bodies, 429, 5xx).
    Retry {
        error: io::Error,
        /// The server's `Retry-After`.
        after: Option<Duration>,
        /// Part of the body arrived: the next attempt asks only for the rest.
        progressed: bool,
    },
    /// Retrying cannot help (404, 403, a changed object, a malformed answer).
    Fatal(io::Error),
}

impl Failure {
    fn retry(error: io::Error) -> Failure {
        Failure::Retry {
            error,
            after: None,
            progressed: false,
        }
    }
}

/// Longest body accepted for a listing page.
const MAX_LISTING: u64 = 16 << 20;

/// Most redirects followed for one request.
const MAX_REDIRECTS: usize = 10;

/// `scheme://host:port` of a URL (the port made explicit), or `None` when it cannot be
/// parsed.
fn origin(url: &str) -> Option<String> {
    let u = url::Url::parse(url).ok()?;
    Some(format!(
        "{}://{}:{}",
        u.scheme(),
        u.host_str()?,
        u.port_or_known_default()?
    ))
}

impl Remote {
    /// Runs `attempt` until it succeeds, fails for good, or runs out of retries.
    pub(super) fn retrying<T>(
        &self,
        url: &str,
        mut attempt: impl FnMut() -> Result<T, Failure>,
    ) -> io::Result<T> {
        let options = &self.inner.options;
        let mut failures = 0u32;
        let mut pending = delays(options);
        loop {
            let (error, after, progressed) = match attempt() {
                Ok(value) => return Ok(value),
                Err(Failure::Fatal(error)) => return Err(error),
                Err(Failure::Retry {
                    error,
                    after,
                    progressed,
                }) => (error, after, progressed),
            };
            // A retry that made progress starts the count (and the backoff) afresh.
            if progressed {
                failures = 0;
                pending = delays(options);
            }
            failures += 1;
            let Some(delay) = pending.next() else {
                return Err(io::Error::new(
                    error.kind(),
                    format!("giving up after {failures} failed attempts: {error}"),
                ));
            };
            self.inner.retries.fetch_add(1, Ordering::Relaxed);
            let delay = after.unwrap_or(delay).min(options.max_backoff);
            log::debug!("{url}: {error}; retry {failures} in {delay:?}");
            std::thread::sleep(delay);
        }
    }

    /// Sends one GET for `object` (optionally a byte range, inclusive), within the gate on
    /// requests in flight, following redirects, and sorts out the answers every caller
    /// retries the same way. The permit comes back with the response: hold it until the
    /// body is read. The bearer token goes only to the first URL's origin (scheme, host and
    /// port): a hub's redirect to its CDN, or down to plain http, goes without it. Also
    /// says whether a redirect was followed.
    fn get(
        &self,
        object: &Object,
        range: Option<(u64, u64)>,
        if_match: Option<&str>,
    ) -> std::result::Result<(Permit<'_>, Response<ureq::Body>, bool), Failure> {
        let permit = self.inner.gate.acquire();
        let (mut target, token) = match object {
            Object::Http(u) => (u.clone(), self.inner.options.bearer_token.as_deref()),
            Object::Presigned(u) => (u.clone(), None),
            Object::S3 { bucket, key } => {
                let url = self
                    .s3_config()
                    .and_then(|c| Ok(c.presign_get(bucket, key)?))
                    .map_err(|e| Failure::Fatal(io::Error::new(e.kind(), e.to_string())))?;
                (url.to_string(), None)
            }
        };
        let home = origin(&target);
        for hop in 0..=MAX_REDIRECTS {
            let mut request = self.inner.agent.get(&target);
            if let Some(token) = token.filter(|_| home.is_some() && origin(&target) == home) {
                request = request.header("Authorization", format!("Bearer {token}"));
            }
            if let Some((first, last)) = range {
                request = request.header("Range", format!("bytes={first}-{last}"));
            }
            if let Some(etag) = if_match {
                request = request.header("If-Match", etag);
            }
            self.inner.requests.fetch_add(1, Ordering::Relaxed);
            let response = request.call().map_err(transport_failure)?;
            let status = response.status();
            if status.is_redirection()
                && let Some(next) = header(&response, "location")
            {
                target = url::Url::parse(&target)
                    .and_then(|base| base.join(next))
                    .map_err(|e| malformed_owned(format!("a redirect to {next:?} ({e})")))?
                    .to_string();
                continue;
            }
            if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
                return Err(Failure::Retry {
                    error: io::Error::other(format!("HTTP {status}")),
                    after: retry_after(&response),
                    progressed: false,
                });
            }
            return Ok((permit, response, hop > 0));
        }
        Err(malformed_owned(format!(
            "more than {MAX_REDIRECTS} redirects"
        )))
    }

    /// First request to an object: its first `probe` bytes, its length and validator.
    pub(super) fn probe(
        &self,
        object: &Object,
        url: &str,
        probe: u64,
    ) -> Result<(u64, Validator, Vec<u8>, bool)> {
        Ok(self.retrying(url, || {
            let (_permit, mut response, redirected) =
                self.get(object, Some((0, probe - 1)), None)?;
            let validator = validator(&response);
            let (len, body_len) = match response.status().as_u16() {
                206 => {
                    let (first, last, total) = content_range(&response)
                        .ok_or_else(|| malformed("a 206 answer without a valid Content-Range"))?;
                    if first != 0 || last >= probe {
                        return Err(malformed("a Content-Range other than the one asked for"));
                    }
                    (total, last + 1)
                }
                200 => {
                    let total = response
                        .body()
                        .content_length()
                        .ok_or_else(|| malformed("no length (neither Range nor Content-Length)"))?;
                    (total, total.min(probe))
                }
                416 => {
                    let total = unsatisfied_range_len(&response).unwrap_or(0);
                    (total, 0)
                }
                _ => return Err(Failure::Fatal(status_error(&mut response))),
            };
            let mut head = vec![0u8; body_len as usize];
            let mut reader = response.into_body().into_reader();
            read_body(&mut reader, &mut head).map_err(|(error, _)| Failure::retry(error))?;
            self.inner.bytes.fetch_add(body_len, Ordering::Relaxed);
            Ok((len, validator.clone(), head, redirected))
        })?)
    }

    /// A whole small object; `None` for 404.
    pub(super) fn fetch_object(
        &self,
        object: &Object,
        url: &str,
        max_len: u64,
    ) -> Result<Option<Vec<u8>>> {
        let mut too_large = None;
        let fetched = self.retrying(url, || {
            let (_permit, mut response, _) = self.get(object, None, None)?;
            match response.status().as_u16() {
                200 => {}
                404 => return Ok(None),
                _ => return Err(Failure::Fatal(status_error(&mut response))),
            }
            read_small(response, max_len, &mut too_large).map(Some)
        });
        match (fetched, too_large) {
            (Err(_), Some(len)) => Err(Error::TooLarge { len, max: max_len }),
            (result, _) => Ok(result?),
        }
    }

    /// Fills `bufs` with the object's bytes from `offset`, re-requesting only what is
    /// missing after a short body. An object found shorter than before has its new length
    /// stored in `seen_len`.
    pub(super) fn read_range(
        &self,
        object: &Object,
        url: &str,
        offset: u64,
        bufs: &mut [&mut [u8]],
        (expected, redirected): (&Validator, bool),
        seen_len: &AtomicU64,
    ) -> io::Result<()> {
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        if total == 0 {
            return Ok(());
        }
        let last = offset + total - 1;
        // A weak ETag cannot be matched with If-Match (strong comparison), and a redirecting
        // server would judge it against its own validator: either way it is still compared
        // below.
        let if_match = expected
            .etag
            .as_deref()
            .filter(|e| !e.starts_with("W/") && !redirected);
        let mut done = 0u64;
        self.retrying(url, || {
            let first = offset + done;
            let (_permit, mut response, _) = self.get(object, Some((first, last)), if_match)?;
            match response.status().as_u16() {
                206 => {
                    let (from, to, len) = content_range(&response)
                        .ok_or_else(|| malformed("a 206 answer without a valid Content-Range"))?;
                    if len <= last {
                        seen_len.store(len, Ordering::Relaxed);
                        return Err(Failure::Fatal(shrunk(first, last, len)));
                    }
                    if from != first || to != last {
                        return Err(malformed("a Content-Range other than the one asked for"));
                    }
                }
                // A server that ignores Range sends the whole object: usable from byte 0.
                200 if first == 0 => {}
                200 => return Err(malformed("the server ignores Range requests")),
                412 => {
                    return Err(Failure::Fatal(changed(expected, &Validator::default())));
                }
                416 => {
                    let len = unsatisfied_range_len(&response).unwrap_or(0);
                    seen_len.store(len, Ordering::Relaxed);
                    return Err(Failure::Fatal(shrunk(first, last, len)));
                }
                _ => return Err(Failure::Fatal(status_error(&mut response))),
            }
            let got = validator(&response);
            if !same_version(expected, &got) {
                return Err(Failure::Fatal(changed(expected, &got)));
            }
            let mut reader = response.into_body().into_reader();
            let before = done;
            let result = fill_from(&mut reader, bufs, &mut done);
            self.inner.bytes.fetch_add(done - before, Ordering::Relaxed);
            result.map_err(|error| Failure::Retry {
                error,
                after: None,
                progressed: done > before,
            })
        })
    }

    /// Lists an S3 prefix, page by page.
    pub(super) fn list_s3(
        &self,
        url: &str,
        bucket: &str,
        prefix: &str,
        suffix: &str,
    ) -> Result<Vec<String>> {
        let prefix = if prefix.is_empty() || prefix.ends_with('/') {
            prefix.to_string()
        } else {
            format!("{prefix}/")
        };
        let config = self.s3_config()?;
        let mut names = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let signed = config.presign_list(bucket, &prefix, token.as_deref())?;
            let body = self.retrying(url, || {
                let object = Object::Presigned(signed.to_string());
                let (_permit, mut response, _) = self.get(&object, None, None)?;
                if response.status() != StatusCode::OK {
                    return Err(Failure::Fatal(status_error(&mut response)));
                }
                read_small(response, MAX_LISTING, &mut None)
            })?;
            let text = String::from_utf8_lossy(&body);
            let page = rusty_s3::actions::ListObjectsV2::parse_response(&text).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unreadable S3 listing: {e}"),
                )
            })?;
            for object in page.contents {
                if let Some(name) = object.key.strip_prefix(&prefix)
                    && name.ends_with(suffix)
                    && !name.contains('/')
                {
                    names.push(name.to_string());
                }
            }
            match page.next_continuation_token {
                Some(next) => token = Some(next),
                None => break,
            }
        }
        names.sort();
        Ok(names)
    }
}

/// The delays before each retry: exponential from `backoff` (doubling, capped at
/// `max_backoff`), each stretched by a random part of itself so that many workers do not
/// retry in lockstep; `max_retries` of them.
fn delays(options: &RemoteOptions) -> ExponentialBackoff {
    ExponentialBuilder::new()
        .with_min_delay(options.backoff)
        .with_max_delay(options.max_backoff)
        .with_factor(2.0)
        .with_jitter()
        .with_max_times(options.max_retries as usize)
        .build()
}

fn transport_failure(error: ureq::Error) -> Failure {
    let io_error = |kind| io::Error::new(kind, error.to_string());
    match error {
        ureq::Error::Io(_) | ureq::Error::ConnectionFailed | ureq::Error::Protocol(_) => {
            Failure::retry(io_error(io::ErrorKind::ConnectionAborted))
        }
        ureq::Error::Timeout(_) => Failure::retry(io_error(io::ErrorKind::TimedOut)),
        _ => Failure::Fatal(io_error(io::ErrorKind::Other)),
    }
}

fn malformed_owned(what: String) -> Failure {
    malformed(&what)
}

fn malformed(what: &str) -> Failure {
    Failure::Fatal(io::Error::new(
        io::ErrorKind::InvalidData,
        format!("the server sent {what}"),
    ))
}

fn shrunk(first: u64, last: u64, len: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!(
            "the object now has {len} bytes, ending before bytes {first}..{} (was it truncated or replaced?)",
            last + 1
        ),
    )
}

fn changed(expected: &Validator, got: &Validator) -> io::Error {
    let show = |v: &Validator| {
        v.etag
            .clone()
            .or_else(|| v.last_modified.clone())
            .unwrap_or_else(|| "another version".into())
    };
    io::Error::other(format!(
        "the object changed during the load (was {}, now {}); not mixing bytes of two versions",
        show(expected),
        show(got)
    ))
}

/// The body of an S3 error answer (other elements are ignored).
#[derive(Debug, FromXml)]
#[xml(rename = "Error")]
struct S3ErrorBody {
    #[xml(rename = "Code")]
    code: Option<String>,
    #[xml(rename = "Message")]
    message: Option<String>,
}

/// A failure answer as an error: the status, and what an S3 error body says (`<Code>`,
/// `<Message>`) or a plain-text body; HTML error pages add nothing and are left out.
fn status_error(response: &mut Response<ureq::Body>) -> io::Error {
    let status = response.status();
    let plain = header(response, "content-type").is_some_and(|t| t.starts_with("text/plain"));
    let mut body = String::new();
    let _ = response
        .body_mut()
        .as_reader()
        .take(4096)
        .read_to_string(&mut body);
    let s3 = instant_xml::from_str::<S3ErrorBody>(body.trim()).ok();
    let field = |f: Option<String>| f.map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
    let (code, message) = match s3 {
        Some(e) => (field(e.code), field(e.message)),
        None => (None, None),
    };
    let detail = match (code, message) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code,
        _ if plain => body
            .split_whitespace()
            .take(40)
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    };
    let kind = match status.as_u16() {
        404 => io::ErrorKind::NotFound,
        401 | 403 => io::ErrorKind::PermissionDenied,
        _ => io::ErrorKind::Other,
    };
    let sep = if detail.is_empty() { "" } else { " (" };
    let end = if detail.is_empty() { "" } else { ")" };
    io::Error::new(kind, format!("HTTP {status}{sep}{detail}{end}"))
}

fn header<'a>(response: &'a Response<ureq::Body>, name: &str) -> Option<&'a str> {
    response.headers().get(name).and_then(|v| v.to_str().ok())
}

fn validator(response: &Response<ureq::Body>) -> Validator {
    Validator {
        etag: header(response, "etag").map(str::to_string),
        last_modified: header(response, "last-modified").map(str::to_string),
    }
}

/// Same object version: ETags when both sides have one, else Last-Modified, else trust.
fn same_version(expected: &Validator, got: &Validator) -> bool {
    match (&expected.etag, &got.etag) {
        (Some(a), Some(b)) => a.trim_start_matches("W/") == b.trim_start_matches("W/"),
        _ => match (&expected.last_modified, &got.last_modified) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        },
    }
}

fn retry_after(response: &Response<ureq::Body>) -> Option<Duration> {
    header(response, "retry-after")?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// `Content-Range: bytes FIRST-LAST/TOTAL`.
fn content_range(response: &Response<ureq::Body>) -> Option<(u64, u64, u64)> {
    let value = header(response, "content-range")?.trim();
    let rest = value.strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (first, last) = range.split_once('-')?;
    let (first, last, total) = (
        first.trim().parse().ok()?,
        last.trim().parse().ok()?,
        total.trim().parse().ok()?,
    );
    (first <= last && last < total).then_some((first, last, total))
}

/// `Content-Range: bytes */TOTAL` of a 416 answer.
fn unsatisfied_range_len(response: &Response<ureq::Body>) -> Option<u64> {
    header(response, "content-range")?
        .trim()
        .strip_prefix("bytes */")?
        .trim()
        .parse()
        .ok()
}

/// Reads exactly `buf.len()` bytes; on failure, the error and how many arrived.
fn read_body(reader: &mut impl Read, buf: &mut [u8]) -> Result<(), (io::Error, usize)> {
    let mut got = 0;
    while got < buf.len() {
        match reader.read(&mut buf[got..]) {
            Ok(0) => {
                return Err((
                    io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("the body ended after {got} of {} bytes", buf.len()),
                    ),
                    got,
                ));
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err((e, got)),
        }
    }
    Ok(())
}

/// Streams the body into `bufs` from position `done` (counted across all of them),
/// advancing `done` as bytes land.
fn fill_from(reader: &mut impl Read, bufs: &mut [&mut [u8]], done: &mut u64) -> io::Result<()> {
    let mut skip = *done;
    for buf in bufs.iter_mut() {
        let len = buf.len() as u64;
        if skip >= len {
            skip -= len;
            continue;
        }
        let start = skip as usize;
        skip = 0;
        let result = read_body(reader, &mut buf[start..]);
        match result {
            Ok(()) => *done += len - start as u64,
            Err((error, got)) => {
                *done += got as u64;
                return Err(error);
            }
        }
    }
    Ok(())
}

/// A small body, read whole, refusing more than `max_len` bytes (and noting the length
/// that was too large in `too_large`).
fn read_small(
    response: Response<ureq::Body>,
    max_len: u64,
    too_large: &mut Option<u64>,
) -> std::result::Result<Vec<u8>, Failure> {
    let refuse = |len: u64, too_large: &mut Option<u64>| {
        *too_large = Some(len);
        Failure::Fatal(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{len} bytes is more than the {max_len} accepted here"),
        ))
    };
    if let Some(len) = response.body().content_length()
        && len > max_len
    {
        return Err(refuse(len, too_large));
    }
    let mut body = Vec::new();
    response
        .into_body()
        .into_reader()
        .take(max_len + 1)
        .read_to_end(&mut body)
        .map_err(Failure::retry)?;
    if body.len() as u64 > max_len {
        return Err(Failure::Fatal(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("more than the {max_len} bytes accepted here"),
        )));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_with_jitter_and_run_out() {
        let options = RemoteOptions {
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
            max_retries: 6,
            ..RemoteOptions::default()
        };
        let got: Vec<Duration> = delays(&options).collect();
        assert_eq!(got.len(), 6);
        for (n, d) in got.iter().enumerate() {
            let nominal = (options.backoff * (1 << n)).min(options.max_backoff);
            assert!(*d >= nominal && *d <= nominal * 2, "{n}: {d:?}");
        }
    }

    #[test]
    fn s3_error_bodies() {
        let body = r#"<?xml version="1.0" encoding="UTF-8"?>
<Error><Code>NoSuchBucket</Code><Message>The specified bucket does not exist</Message><BucketName>x</BucketName><RequestId>1</RequestId></Error>"#;
        let e: S3ErrorBody = instant_xml::from_str(body).unwrap();
        assert_eq!(e.code.as_deref(), Some("NoSuchBucket"));
        assert_eq!(
            e.message.as_deref(),
            Some("The specified bucket does not exist")
        );
        assert!(instant_xml::from_str::<S3ErrorBody>("<html>no</html>").is_err());
    }

    #[test]
    fn origins_include_the_port_and_scheme() {
        assert_eq!(
            origin("https://hub.example/a/b").as_deref(),
            Some("https://hub.example:443")
        );
        assert_ne!(
            origin("http://127.0.0.1:80/x"),
            origin("http://127.0.0.1:81/x")
        );
        assert_ne!(origin("https://h/x"), origin("http://h/x"));
        assert_eq!(origin("http://h:80/x"), origin("http://h/y"));
        assert_eq!(origin("not a url"), None);
    }

    #[test]
    fn versions_compare_by_etag_then_date() {
        let v = |e: Option<&str>, d: Option<&str>| Validator {
            etag: e.map(Into::into),
            last_modified: d.map(Into::into),
        };
        assert!(same_version(
            &v(Some("\"a\""), None),
            &v(Some("W/\"a\""), None)
        ));
        assert!(!same_version(
            &v(Some("\"a\""), Some("d")),
            &v(Some("\"b\""), Some("d"))
        ));
        assert!(!same_version(&v(None, Some("d1")), &v(None, Some("d2"))));
        assert!(same_version(&v(None, None), &v(Some("\"b\""), None)));
    }

    #[test]
    fn fills_scattered_buffers_across_resumes() {
        let data: Vec<u8> = (0..100u8).collect();
        let (mut a, mut b, mut c) = (vec![0u8; 10], vec![0u8; 0], vec![0u8; 90]);
        let mut bufs: Vec<&mut [u8]> = vec![&mut a, &mut b, &mut c];
        let mut done = 0;
        // The first body breaks off after 42 bytes; the second brings the rest.
        let mut first = io::Read::chain(&data[..42], io::repeat(0).take(0));
        assert!(fill_from(&mut first, &mut bufs, &mut done).is_err());
        assert_eq!(done, 42);
        let mut rest = &data[42..];
        fill_from(&mut rest, &mut bufs, &mut done).unwrap();
        assert_eq!(done, 100);
        assert_eq!([&a[..], &c[..]].concat(), data);
    }
}
