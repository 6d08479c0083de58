//! The [`Store`] of a URL prefix: an HTTP(S) "directory" (index fetched, never listed) or an
//! S3 prefix (listed with `ListObjectsV2`).

use super::{Object, Remote};
use crate::error::{Error, Result};
use crate::location::Location;
use crate::store::{Opened, RemoteStats, Store};
use crate::{BackendKind, ByteSource};
use std::sync::Arc;

/// The files under an `http(s)://` or `s3://` prefix, read through one [`Remote`] client.
#[derive(Debug, Clone)]
pub struct RemoteStore {
    remote: Remote,
    base: Location,
}

impl RemoteStore {
    /// The store at the URL `base` (a prefix without the trailing slash), read by `remote`.
    pub fn new(remote: Remote, base: Location) -> Result<RemoteStore> {
        let Location::Url(url) = &base else {
            return Err(Error::InvalidLocation {
                reason: "a remote store needs a URL".into(),
            });
        };
        Object::parse(url)?;
        Ok(RemoteStore { remote, base })
    }

    /// The client.
    pub fn remote(&self) -> &Remote {
        &self.remote
    }

    fn url(&self, name: &str) -> String {
        self.base.join(name).to_string()
    }
}

impl Store for RemoteStore {
    fn location(&self) -> &Location {
        &self.base
    }

    fn list(&self, suffix: &str) -> Result<Vec<String>> {
        self.remote.list(&self.base.to_string(), suffix)
    }

    fn fetch(&self, name: &str, max_len: u64) -> Result<Option<Vec<u8>>> {
        self.remote.fetch(&self.url(name), max_len)
    }

    fn open(&self, name: &str, probe: u64) -> Result<Opened> {
        let (source, head) = self.remote.open(&self.url(name), probe)?;
        let reason = match source.kind() {
            BackendKind::S3 => "s3:// URL: SigV4-presigned range requests",
            _ => "URL: HTTP range requests",
        };
        let source: Arc<dyn ByteSource> = Arc::new(source);
        Ok(Opened {
            source,
            reason: reason.to_string(),
            head,
        })
    }

    fn preferred_threads(&self) -> Option<usize> {
        Some(self.remote.options().max_in_flight.max(1))
    }

    fn remote_stats(&self) -> Option<RemoteStats> {
        Some(self.remote.stats())
    }
}
