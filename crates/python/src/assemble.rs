//! `assemble`: tensors made in place of pieces of several checkpoints' files (fused
//! parameters: see `weightlift::Checkpoint::assemble`), each handed to Python as one
//! allocation (`Memory`) to view as the parameter.

use crate::errors::py_err;
use crate::handle::PyCheckpoint;
use crate::memory::PyMemory;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use weightlift::{Assembly, Checkpoint, HostMemory, LoadOptions, Piece};

/// `c`'s position in `ckpts` (added, with whether its files map, when new).
fn index_of(ckpts: &mut Vec<(Arc<Checkpoint>, bool)>, c: &Py<PyCheckpoint>) -> PyResult<usize> {
    let ckpt = c.get().checkpoint();
    if let Some(i) = ckpts.iter().position(|(k, _)| Arc::ptr_eq(k, ckpt)) {
        return Ok(i);
    }
    let maps = ckpt.maps_loads().map_err(py_err)?;
    ckpts.push((Arc::clone(ckpt), maps));
    Ok(ckpts.len() - 1)
}

/// One assembly asked for: its length, the alignment its first byte needs (the element
/// size of the tensor it becomes) and its pieces (checkpoint, tensor, byte position).
type Job = (usize, usize, Vec<(Py<PyCheckpoint>, String, u64)>);

/// An assembly reserved, with its pieces: (checkpoint's position, tensor name, byte position).
type Reserved = (Assembly, Vec<(usize, String, u64)>);

/// Page size mappings are made in.
const PAGE: u64 = 4096;

/// Assembles each job (`(nbytes, align, [(checkpoint, tensor name, byte position)])`, every
/// tensor whole and unconverted; the pieces of a job must not overlap) without the GIL. Returns
/// `(memories, mapped, copied)`: per job a `Memory` over the assembled bytes, or None where
/// it cannot be assembled (a checkpoint whose files are read, not mapped, by the mapping
/// policy; pieces whose place in the file would leave the first byte unaligned to `align`;
/// or no room left for more mappings in the process, see `weightlift::map_room`): the caller fills those the ordinary way. `mapped` and
/// `copied`: bytes mapped from the files and copied, all jobs together.
///
/// The checkpoints' files must not be truncated or modified while the memories live: the
/// contract of the mapping the checkpoints were opened with (`backend="auto"` or `"mmap"`).
#[pyfunction]
pub(crate) fn assemble(
    py: Python<'_>,
    jobs: Vec<Job>,
) -> PyResult<(Vec<Option<PyMemory>>, u64, u64)> {
    // Each checkpoint once: whether its files map, and its pieces.
    let mut ckpts: Vec<(Arc<Checkpoint>, bool)> = Vec::new();
    let mut room = weightlift::map_room().unwrap_or(0);
    // Per job: the assembly, and its pieces as (checkpoint, name, at).
    let mut made: Vec<Option<Reserved>> = Vec::with_capacity(jobs.len());
    for (len, align, pieces) in jobs {
        let mut located = Vec::with_capacity(pieces.len());
        let mut spans = Vec::with_capacity(pieces.len());
        for (c, name, at) in pieces {
            let i = index_of(&mut ckpts, &c)?;
            let (shard, offset, n) = ckpts[i]
                .0
                .file_span(&name)
                .ok_or_else(|| py_err(weightlift::Error::NotFound(name.clone())))?;
            spans.push((at, n, offset, (i, shard)));
            located.push((i, name, at));
        }
        spans.sort_unstable();
        if spans.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0)
            || spans
                .last()
                .is_some_and(|&(at, n, _, _)| at.saturating_add(n) > len as u64)
        {
            return Err(PyValueError::new_err(format!(
                "the pieces of an assembly of {len} bytes overlap or overflow it"
            )));
        }
        // Runs of pieces that follow each other in one file as in the assembly are placed as
        // one (see `Checkpoint::assemble`); each run large enough to map adds up to two
        // mappings.
        let mut runs: Vec<(u64, u64, u64, (usize, usize))> = Vec::with_capacity(spans.len());
        for &span in &spans {
            match runs.last_mut() {
                Some(run)
                    if run.3 == span.3 && run.0 + run.1 == span.0 && run.2 + run.1 == span.2 =>
                {
                    run.1 += span.1;
                }
                _ => runs.push(span),
            }
        }
        let maps_made = 2 * runs
            .iter()
            .filter(|s| s.1 >= weightlift::MIN_MAPPED as u64 + PAGE)
            .count();
        if located.iter().any(|(i, _, _)| !ckpts[*i].1) || maps_made > room {
            made.push(None);
            continue;
        }
        room -= maps_made;
        // The phase that maps the most bytes.
        let mut phases: Vec<(u64, u64)> = Vec::new();
        for &(at, n, offset, _) in &runs {
            let phase = (offset + PAGE - at % PAGE) % PAGE;
            match phases.iter_mut().find(|p| p.0 == phase) {
                Some(p) => p.1 += n,
                None => phases.push((phase, n)),
            }
        }
        let phase = phases.iter().max_by_key(|p| p.1).map_or(0, |p| p.0);
        if phase % align.max(1) as u64 != 0 {
            room += maps_made;
            made.push(None);
            continue;
        }
        let assembly = Assembly::new(len, phase as usize)
            .map_err(|e| PyValueError::new_err(format!("cannot reserve {len} bytes: {e}")))?;
        made.push(Some((assembly, located)));
    }
    let by_ckpt: Vec<Vec<Piece<'_>>> = (0..ckpts.len())
        .map(|i| {
            made.iter()
                .flatten()
                .flat_map(|(assembly, pieces)| {
                    pieces
                        .iter()
                        .filter(move |p| p.0 == i)
                        .map(move |(_, name, at)| Piece {
                            tensor: name,
                            into: assembly,
                            at: *at,
                        })
                })
                .collect()
        })
        .collect();
    let (mapped, copied) = py
        .detach(|| {
            // Up to eight checkpoints at a time, each read (and placed as it is read) by a
            // thread of its own: files read side by side keep a disk's queue full and a
            // network filesystem's server busy (hf-moe-large cold, median of 3: 1.73 s with
            // eight, 2.03 s with four, 2.71 s filling fresh memory instead).
            let next = AtomicUsize::new(0);
            let workers = by_ckpt.len().clamp(1, 8);
            let options = LoadOptions::default().threads(1);
            std::thread::scope(|scope| {
                let handles: Vec<_> = (0..workers)
                    .map(|_| {
                        scope.spawn(|| {
                            let (mut mapped, mut copied) = (0u64, 0u64);
                            loop {
                                let i = next.fetch_add(1, Ordering::Relaxed);
                                let Some(pieces) = by_ckpt.get(i) else {
                                    return Ok::<_, weightlift::Error>((mapped, copied));
                                };
                                if pieces.is_empty() {
                                    continue;
                                }
                                // SAFETY: the files' contract is the caller's (this function's
                                // documentation, which the Python glue passes on); the
                                // assemblies are this call's own, nothing reads them until it
                                // returns, and the pieces do not overlap (checked above), each
                                // placed by exactly one worker.
                                let report = unsafe { ckpts[i].0.assemble(pieces, &options) }?;
                                mapped += report.mapped;
                                copied += report.copied;
                            }
                        })
                    })
                    .collect();
                handles.into_iter().try_fold((0u64, 0u64), |(m, c), h| {
                    let (m2, c2) = h.join().expect("an assembling thread panicked")?;
                    Ok::<_, weightlift::Error>((m + m2, c + c2))
                })
            })
        })
        .map_err(py_err)?;
    drop(by_ckpt);
    let memories = made
        .into_iter()
        .map(|m| {
            m.map(|(assembly, _)| PyMemory {
                memory: Arc::new(HostMemory::assembled(assembly)),
            })
        })
        .collect();
    Ok((memories, mapped, copied))
}
