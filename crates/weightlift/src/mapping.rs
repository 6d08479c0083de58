//! The one decision "map the file or read it": whether a shard's tensors are left in a
//! private mapping of the file or read into memory of their own. Loads, lazy reads
//! (`get`/`get_slice`), prefetches and the Python package all ask [`decide`], with the
//! checkpoint's [`Mapping`] (chosen once, when it is opened); each shard keeps one mapping
//! ([`MapCache`]), checked once against its header, and every user of it shares it.

use crate::error::{Error, Result};
use crate::memory::HostMemory;
use crate::trail::Trail;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use weightlift_storage::{Location, MappedFile};

/// Whether CPU loads and lazy reads may leave tensors in private (copy-on-write) mappings
/// of the files instead of copying them into memory of their own. Set when the checkpoint
/// is opened ([`crate::OpenOptions::mapping`]).
///
/// A mapped load reads nothing into new memory: the page cache's pages are mapped in place
/// (populated up front, in parallel, in large ranges), so it costs what reading the file
/// costs and no more, and the page cache does not hold a second copy of the model. Tensors
/// are writable; writes go to private copies of the pages, never to the file. The price is
/// the contract of every file mapping, which is why the constructors that allow it are
/// `unsafe`: nobody may truncate or rewrite the files while the tensors live (a truncated
/// mapping raises `SIGBUS` when touched; a rewritten one shows the new bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mapping(MapChoice);

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum MapChoice {
    #[default]
    Never,
    Always,
    Auto,
}

impl Mapping {
    /// Copy every tensor into owned memory (the default).
    pub fn never() -> Mapping {
        Mapping(MapChoice::Never)
    }

    /// Map every local file; URLs are an error.
    ///
    /// # Safety
    ///
    /// No file of the checkpoint may be truncated or modified while any tensor of a load
    /// or read lives (see [`Mapping`]).
    pub unsafe fn always() -> Mapping {
        Mapping(MapChoice::Always)
    }

    /// Map files on local block-device filesystems and in memory (tmpfs); read owned copies
    /// from network and FUSE filesystems and URLs, and of shards whose tensors are converted
    /// (`weightlift_storage::map_advice` is the rule). The reason per file is in
    /// [`crate::StateDict::files`].
    ///
    /// # Safety
    ///
    /// As [`Mapping::always`], for the files that end up mapped.
    pub unsafe fn auto() -> Mapping {
        Mapping(MapChoice::Auto)
    }
}

/// What a shard's bytes are wanted for: what cannot map differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Use {
    /// A planned load of many tensors: conversion needs new memory, and a slice plan
    /// gathers each tensor's block (a block is contiguous in the file only sometimes).
    Load { converts: bool, sliced: bool },
    /// One tensor or a block of one, read on demand: a contiguous block is a view of the
    /// mapping, any other block a copy out of it.
    Read,
}

/// Whether a shard at `location` maps for `what` under `mapping`, and why (the reason a
/// load reports per file). `backend_reason` says why the shard is read the way it is read
/// when it is not mapped; `advice` is the filesystem rule, asked only when it matters.
pub(crate) fn decide(
    mapping: Mapping,
    location: &Location,
    backend_reason: &str,
    advice: impl FnOnce(&Path) -> (bool, String),
    what: Use,
) -> Result<(bool, String)> {
    let auto = mapping.0 == MapChoice::Auto;
    let owned = |why: &str| Ok((false, format!("{why}; {backend_reason}")));
    if mapping.0 == MapChoice::Never {
        return Ok((false, backend_reason.to_string()));
    }
    let Some(path) = location.as_local() else {
        if auto {
            return owned("owned: a URL cannot be mapped");
        }
        return Err(Error::InvalidOption(format!(
            "{location}: a URL cannot be mapped (use Mapping::auto or never)"
        )));
    };
    if let Use::Load { converts, sliced } = what {
        if sliced {
            return owned("owned: a slice plan gathers each tensor's block");
        }
        if converts {
            if auto {
                return owned("owned: dtype conversion needs new memory");
            }
            return Err(Error::InvalidOption(
                "a mapped load cannot convert dtypes (use Mapping::auto or never)".into(),
            ));
        }
    }
    if !auto {
        return Ok((true, "mapped: asked for".into()));
    }
    let (map, reason) = advice(path);
    if map {
        Ok((true, reason))
    } else {
        owned(&reason)
    }
}

/// A shard's mapping: the filesystem rule's answer (asked once) and the file's private
/// mapping while anything uses it (made on first use, shared by every tensor, view and
/// load of the shard, unmapped with the last).
#[derive(Debug, Default)]
pub(crate) struct MapCache {
    advice: OnceLock<(bool, String)>,
    live: Mutex<Weak<HostMemory>>,
    /// What lazy reads brought in lately (see [`crate::trail`]).
    trail: Mutex<Trail>,
}

impl MapCache {
    /// [`weightlift_storage::map_advice`] for `path`, asked once per shard (a `statfs`).
    pub(crate) fn advice(&self, path: &Path) -> (bool, String) {
        self.advice
            .get_or_init(|| weightlift_storage::map_advice(path))
            .clone()
    }

    /// A lazy read brought `range` of `map` in: ranges read well before it are marked the
    /// first to reclaim, so that on a host short of memory a reader going through the file
    /// evicts what it read before what it has not read yet (a hint; nothing is lost).
    pub(crate) fn read(&self, map: &MappedFile, range: std::ops::Range<u64>) {
        let past = self
            .trail
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read(range);
        for old in past {
            map.cool(old.start, old.end - old.start);
        }
    }

    /// The file's private mapping (made now if none lives), checked once to hold the
    /// `needed` bytes its header describes.
    ///
    /// # Safety
    ///
    /// The contract of [`Mapping::always`]: the file is not truncated or modified while the
    /// mapping or anything made from it lives.
    pub(crate) unsafe fn get(&self, location: &Location, needed: u64) -> Result<Arc<HostMemory>> {
        let mut slot = self.live.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(map) = slot.upgrade() {
            return Ok(map);
        }
        let io = |source: weightlift_storage::Error| Error::Io {
            location: location.clone(),
            context: "mapping the file",
            source,
        };
        let path = location.as_local().ok_or_else(|| {
            io(weightlift_storage::Error::Unsupported(
                "only local files can be mapped",
            ))
        })?;
        // SAFETY: the caller promises the file is neither truncated nor modified while the
        // mapping lives (this function's contract, passed on from `Mapping`).
        let map = unsafe { MappedFile::open(path) }.map_err(|e| io(e.into()))?;
        if (map.len() as u64) < needed {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "file is {} bytes, its header needs {needed} (was it truncated?)",
                    map.len(),
                ),
            )
            .into()));
        }
        let map = Arc::new(HostMemory::mapped(map));
        *slot = Arc::downgrade(&map);
        Ok(map)
    }
}
