//! One file of a checkpoint: opened through its store, its header read and validated, and
//! the one mapping policy ([`crate::mapping`]) asked about it.

use crate::error::{Error, Result};
use crate::mapping::{MapCache, Mapping, Use, decide};
use crate::memory::HostMemory;
use std::path::Path;
use std::sync::Arc;
use weightlift_format::{FormatError, Header, PREFIX_LEN, header_len_from_prefix};
use weightlift_storage::{BackendKind, ByteSource, Location, Store};

/// First read of a file: usually covers the whole header, so one request suffices.
pub(crate) const HEADER_PROBE: u64 = 64 << 10;

/// One safetensors file of a checkpoint.
#[derive(Debug)]
pub struct Shard {
    location: Location,
    name: String,
    header: Header,
    source: Arc<dyn ByteSource>,
    backend_reason: String,
    map: MapCache,
}

impl Shard {
    /// Where the file is.
    pub fn location(&self) -> &Location {
        &self.location
    }

    /// The file's path, for a local file.
    pub fn path(&self) -> Option<&Path> {
        self.location.as_local()
    }

    /// The name as the index (or directory listing) gives it, relative to the checkpoint
    /// directory.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The validated header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The backend that reads this file.
    pub fn backend(&self) -> BackendKind {
        self.source.kind()
    }

    /// Why that backend was chosen.
    pub fn backend_reason(&self) -> &str {
        &self.backend_reason
    }

    /// The source that reads the file.
    pub fn source(&self) -> &Arc<dyn ByteSource> {
        &self.source
    }

    /// Brings `offset..offset + len` of the file into the page cache with one read through
    /// its source into `buf` (reused; its contents are of no further use): the device's
    /// largest requests and large page-cache folios, where faulting the bytes into a mapping
    /// reads the file's readahead size at a time and `POSIX_FADV_WILLNEED` single pages. For
    /// callers that populate a mapping of the same bytes next.
    pub(crate) fn read_in(&self, offset: u64, len: u64, buf: &mut Vec<u8>) -> std::io::Result<()> {
        buf.resize(len as usize, 0);
        self.source.read_exact_at(offset, buf)
    }

    /// Whether this shard's tensors are mapped for `what` under `mapping`, and why: the
    /// one place that decides (see [`crate::mapping`]).
    pub(crate) fn maps(&self, mapping: Mapping, what: Use) -> Result<(bool, String)> {
        decide(
            mapping,
            &self.location,
            &self.backend_reason,
            |path| self.map.advice(path),
            what,
        )
    }

    /// A lazy read brought `range` of the shard's mapping `map` in (see `MapCache::read`).
    pub(crate) fn read_mapped(
        &self,
        map: &weightlift_storage::MappedFile,
        range: std::ops::Range<u64>,
    ) {
        self.map.read(map, range);
    }

    /// The file's private mapping, shared by everything that uses it while it lives.
    ///
    /// # Safety
    ///
    /// The contract of [`Mapping::always`]: the file is not truncated or modified while the
    /// mapping or anything made from it lives.
    pub(crate) unsafe fn mapping(&self) -> Result<Arc<HostMemory>> {
        // SAFETY: passed on from this function's contract.
        unsafe { self.map.get(&self.location, self.header.file_len()) }
    }
}

/// Opens the file `name` of `store` and reads and validates its header.
pub(crate) fn open_shard(store: &dyn Store, name: String, from_index: bool) -> Result<Shard> {
    let location = store.location().join(&name);
    let opened = store
        .open(&name, HEADER_PROBE)
        .map_err(|source| Error::Io {
            location: location.clone(),
            context: if from_index {
                "opening a shard listed in the index"
            } else {
                "opening the file"
            },
            source,
        })?;
    let header = read_header(&*opened.source, opened.head).map_err(|e| match e {
        HeaderError::Format(source) => Error::Format {
            location: location.clone(),
            source,
        },
        HeaderError::Io(source) => Error::Io {
            location: location.clone(),
            context: "reading the header",
            source: source.into(),
        },
    })?;
    Ok(Shard {
        location,
        name,
        header,
        source: opened.source,
        backend_reason: opened.reason,
        map: MapCache::default(),
    })
}

enum HeaderError {
    Format(FormatError),
    Io(std::io::Error),
}

/// Reads and validates a header through a byte source, checking every length against the
/// source's real length before allocating for it. `head` holds the file's first bytes as
/// far as the store read them with the opening (possibly none); the rest is read here.
fn read_header(source: &dyn ByteSource, mut head: Vec<u8>) -> Result<Header, HeaderError> {
    let len = source.len();
    if len < PREFIX_LEN {
        return Err(HeaderError::Format(FormatError::HeaderTooSmall { len }));
    }
    if head.len() < PREFIX_LEN as usize {
        head = vec![0u8; len.min(HEADER_PROBE) as usize];
        source
            .read_exact_at(0, &mut head)
            .map_err(HeaderError::Io)?;
    }
    let prefix: [u8; 8] = head[..8].try_into().expect("at least 8 bytes");
    let header_len = header_len_from_prefix(prefix, len).map_err(HeaderError::Format)?;
    let end = (PREFIX_LEN + header_len) as usize;
    if end > head.len() {
        let have = head.len();
        head.resize(end, 0);
        source
            .read_exact_at(have as u64, &mut head[have..])
            .map_err(HeaderError::Io)?;
    }
    Header::parse(&head[PREFIX_LEN as usize..end], len).map_err(HeaderError::Format)
}
