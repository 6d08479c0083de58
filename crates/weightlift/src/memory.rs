//! Host memory holding loaded tensors: memory of the load's own, or a private mapping of
//! the file. One allocation per shard, shared by the shard's tensors.

use std::fmt;
use weightlift_device::HostBuffer;
use weightlift_storage::{Assembly, MappedFile};

/// Host memory holding loaded tensors: one allocation per shard, shared by its tensors.
pub struct HostMemory(HostKind);

enum HostKind {
    /// Owned memory the bytes were read into.
    Owned(HostBuffer),
    /// A private mapping of the whole file.
    Mapped(MappedFile),
    /// Pieces of files mapped (or copied) in place (see `Checkpoint::assemble`).
    Assembled(Assembly),
}

impl HostMemory {
    pub(crate) fn owned(buffer: HostBuffer) -> HostMemory {
        HostMemory(HostKind::Owned(buffer))
    }

    pub(crate) fn mapped(map: MappedFile) -> HostMemory {
        HostMemory(HostKind::Mapped(map))
    }

    /// Memory assembled from pieces of files, once every piece is placed (see
    /// `Checkpoint::assemble`).
    pub fn assembled(assembly: Assembly) -> HostMemory {
        HostMemory(HostKind::Assembled(assembly))
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        match &self.0 {
            HostKind::Owned(b) => b.as_slice(),
            HostKind::Mapped(m) => m.as_slice(),
            HostKind::Assembled(a) => a.as_slice(),
        }
    }

    /// Whether this is a private mapping of a file (rather than owned memory).
    pub fn is_mapped(&self) -> bool {
        matches!(self.0, HostKind::Mapped(_))
    }

    /// Whether this was assembled from pieces of files (see [`HostMemory::assembled`]).
    pub fn is_assembled(&self) -> bool {
        matches!(self.0, HostKind::Assembled(_))
    }

    /// The file mapping, for mapped memory.
    pub(crate) fn mapping(&self) -> Option<&MappedFile> {
        match &self.0 {
            HostKind::Mapped(m) => Some(m),
            HostKind::Owned(_) | HostKind::Assembled(_) => None,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Debug for HostMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.0 {
            HostKind::Owned(_) => "owned",
            HostKind::Mapped(_) => "mapped",
            HostKind::Assembled(_) => "assembled",
        };
        f.debug_struct("HostMemory")
            .field("kind", &kind)
            .field("len", &self.len())
            .finish()
    }
}
