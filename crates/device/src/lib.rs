//! Where loaded bytes go: a [`Target`] allocates memory for a group of tensors and hands
//! out disjoint [`Region`]s of it that readers fill in parallel.
//!
//! This crate knows nothing of files. A target sees byte ranges of an allocation and host
//! buffers to fill; the loader decides which file bytes go where. The split into regions is
//! what lets very different devices share one loader:
//!
//! - [`CpuTarget`]: the region *is* the final memory; a read lands in place, no copy.
//! - [`StagedTarget`] (a GPU): the region hands out a reused pinned staging buffer, and
//!   committing it starts an asynchronous host-to-device copy while the next reads
//!   proceed. It is generic over a [`CopyEngine`]: `CudaEngine` (feature `cuda`), or a
//!   fake device that tests the pipeline on any machine (`weightlift-testkit`).
//!
//! "meta" loads (dtype and shape only) need no target at all: they read and allocate
//! nothing.

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod layout;
mod staged;

pub use cpu::{CpuRegion, CpuTarget, HostBuffer};
#[cfg(feature = "cuda")]
pub use cuda::{CopyEvent, CudaEngine, CudaMemory, PinnedBuffer};
pub use layout::{SlotLayout, TENSOR_ALIGN};
pub use staged::{
    CopyEngine, DeviceMemory, StagedAlloc, StagedCopy, StagedRegion, StagedTarget, StagingOptions,
    StagingStats,
};

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

/// Why a target could not allocate or commit.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// The allocation failed.
    #[error("cannot allocate {bytes} bytes on {device}: {reason}")]
    Alloc {
        /// Bytes asked for.
        bytes: u64,
        /// The device.
        device: String,
        /// Why.
        reason: String,
    },
    /// Regions must be sorted, non-overlapping and inside the allocation.
    #[error("invalid regions: {0}")]
    InvalidRegions(String),
    /// A driver call failed.
    #[error("{device}: {operation} failed: {reason}")]
    Driver {
        /// The device.
        device: String,
        /// What was being done.
        operation: &'static str,
        /// The driver's error.
        reason: String,
    },
    /// The device is not available (no driver, no such device, feature not built).
    #[error("device {device} is not available: {reason}")]
    Unavailable {
        /// The device.
        device: String,
        /// Why.
        reason: String,
    },
}

/// Where a load puts tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    /// Owned host memory.
    Cpu,
    /// No memory: dtype and shape only.
    Meta,
    /// An NVIDIA GPU by ordinal.
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Meta => f.write_str("meta"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// A device name that is none of `cpu`, `meta`, `cuda`, `cuda:N`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown device {name:?}: expected cpu, meta, cuda or cuda:N")]
pub struct ParseDeviceError {
    /// The name given.
    pub name: String,
}

impl FromStr for Device {
    type Err = ParseDeviceError;

    /// Parses `cpu`, `meta`, `cuda` (device 0) or `cuda:N`.
    fn from_str(s: &str) -> Result<Device, ParseDeviceError> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "meta" => Ok(Device::Meta),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| ParseDeviceError { name: s.into() }),
        }
    }
}

/// The error for `cuda:N` in a build without the `cuda` feature.
pub fn cuda_not_built(ordinal: usize) -> DeviceError {
    DeviceError::Unavailable {
        device: Device::Cuda(ordinal).to_string(),
        reason: "this build of weightlift has no CUDA support (cargo feature `cuda`)".into(),
    }
}

/// A destination for loaded bytes.
///
/// A load allocates once per group of tensors ([`Target::allocate`]), splits the
/// allocation into disjoint regions, one per coalesced read ([`Target::regions`]), fills
/// the regions from many threads ([`Region::fill`], which consumes the region: each is
/// filled at most once), then finishes the allocation ([`Target::finish`]), which waits for
/// any outstanding copies. An allocation dropped without `finish` waits for them too.
pub trait Target: Sync {
    /// An allocation being filled.
    type Alloc: Send;
    /// The finished memory, shared by the tensors that live in it.
    type Memory: Send + Sync + 'static;
    /// A region of an allocation, filled by one thread.
    type Region<'a>: Region + Send
    where
        Self: 'a;

    /// The device, for messages.
    fn device(&self) -> Device;

    /// Allocates `bytes` bytes.
    fn allocate(&self, bytes: u64) -> Result<Self::Alloc, DeviceError>;

    /// Splits `alloc` into one region per range. Ranges must be sorted, non-overlapping and
    /// within the allocation.
    fn regions<'a>(
        &'a self,
        alloc: &'a mut Self::Alloc,
        ranges: &[Range<u64>],
    ) -> Result<Vec<Self::Region<'a>>, DeviceError>;

    /// Completes the allocation once every region is filled.
    fn finish(&self, alloc: Self::Alloc) -> Result<Self::Memory, DeviceError>;

    /// The longest region the target can fill, if it is bounded (a staging buffer's size).
    fn max_region(&self) -> Option<u64> {
        None
    }

    /// Waits for any work still in flight (asynchronous copies). A load that fails calls
    /// this before it drops its allocations.
    fn settle(&self) -> Result<(), DeviceError> {
        Ok(())
    }
}

/// A byte range of an allocation, filled through a host buffer.
pub trait Region {
    /// Length in bytes.
    fn len(&self) -> u64;

    /// Whether the region is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls `fill` with a host buffer of [`Region::len`] bytes (its initial contents are
    /// unspecified), then commits what it wrote to the region. Nothing is committed when
    /// `fill` fails. Consumes the region: a region is filled once.
    fn fill<E: From<DeviceError>>(
        self,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<(), E>;
}

/// Checks that `ranges` are sorted, disjoint and end by `len`.
pub(crate) fn check_ranges(ranges: &[Range<u64>], len: u64) -> Result<(), DeviceError> {
    let mut at = 0;
    for r in ranges {
        if r.start < at || r.end < r.start || r.end > len {
            return Err(DeviceError::InvalidRegions(format!(
                "range {r:?} overlaps, is reversed or exceeds the allocation of {len} bytes"
            )));
        }
        at = r.end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names() {
        for (s, d) in [
            ("cpu", Device::Cpu),
            ("meta", Device::Meta),
            ("cuda:3", Device::Cuda(3)),
        ] {
            assert_eq!(s.parse::<Device>().unwrap(), d);
            assert_eq!(d.to_string(), s);
        }
        assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
        assert_eq!(
            "gpu".parse::<Device>(),
            Err(ParseDeviceError { name: "gpu".into() })
        );
        assert!("cuda:x".parse::<Device>().is_err());
    }

    #[test]
    fn range_checks() {
        assert!(check_ranges(&[0..2, 2..4, 6..6], 6).is_ok());
        assert!(check_ranges(&[0..3, 2..4], 6).is_err());
        assert!(check_ranges(&[0..7], 6).is_err());
        #[allow(clippy::reversed_empty_ranges)]
        let reversed = [3..1];
        assert!(check_ranges(&reversed, 6).is_err());
    }
}
