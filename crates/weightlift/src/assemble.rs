//! Tensors assembled in place from other tensors' bytes: a fused parameter (a layer's
//! experts stacked, gate and up side by side, q/k/v rows) made of checkpoint tensors that
//! lie apart in the file, without copying them into fresh memory. Each piece's whole pages
//! are the file's, mapped privately where the piece goes (see
//! [`weightlift_storage::Assembly`]); the pages it shares with its neighbours are copied.
//!
//! It is a mapped load's promise and price: the bytes are the page cache's (no copy, no
//! fresh memory faulted in and zeroed; reclaimable under memory pressure), writes stay
//! private, and the files must not be truncated or rewritten while the tensors live. Only
//! shards the checkpoint's [`crate::Mapping`] maps for a load are assembled this way.

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::mapping::Use;
use crate::options::LoadOptions;
use crate::plan::Pick;
use weightlift_storage::Assembly;

/// One tensor placed whole at byte `at` of an assembly.
#[derive(Debug, Clone, Copy)]
pub struct Piece<'a> {
    /// The tensor's name.
    pub tensor: &'a str,
    /// Where it goes.
    pub into: &'a Assembly,
    /// Its first byte's position in `into`.
    pub at: u64,
}

/// What an assembly did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AssembleReport {
    /// Bytes mapped from the files.
    pub mapped: u64,
    /// Bytes copied (pages shared by neighbouring pieces, pieces out of phase).
    pub copied: u64,
}

impl Checkpoint {
    /// Whether every shard's tensors are mapped by a load that converts nothing (the
    /// checkpoint's [`crate::Mapping`], through the one policy): where
    /// [`Checkpoint::assemble`] can run.
    pub fn maps_loads(&self) -> Result<bool> {
        for shard in self.shards() {
            let (map, _) = shard.maps(
                self.mapping(),
                Use::Load {
                    converts: false,
                    sliced: false,
                },
            )?;
            if !map {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Where tensor `name`'s bytes are: its shard (position in [`Checkpoint::shards`]), the
    /// offset of its first byte in that file, and how many there are.
    pub fn file_span(&self, name: &str) -> Option<(usize, u64, u64)> {
        let (s, t) = self.locate(name)?;
        let header = self.shards()[s].header();
        let (start, end) = header.tensors()[t].data_offsets;
        Some((s, header.data_start() + start, end - start))
    }

    /// Places each piece's tensor, whole and unconverted, at its place in its assembly (see
    /// the module documentation): the files' ranges are read into the page cache first
    /// (large reads in parallel, one file per thread, as a mapped load populates them;
    /// options: threads, request size, gap bridging, progress and cancellation), then the
    /// pieces' whole pages mapped and the rest copied.
    ///
    /// # Safety
    ///
    /// - The files must not be truncated or modified while any assembly lives (the
    ///   contract of [`crate::Mapping::always`]).
    /// - Nothing reads or writes the pieces' bytes of the assemblies while this runs, and no
    ///   two pieces overlap; other pieces of the same assemblies may be placed at once by
    ///   other calls.
    pub unsafe fn assemble(
        &self,
        pieces: &[Piece<'_>],
        options: &LoadOptions,
    ) -> Result<AssembleReport> {
        if !self.maps_loads()? {
            return Err(Error::InvalidOption(format!(
                "{}: assembling maps the files, and this checkpoint's are read, not mapped",
                self.location()
            )));
        }
        let mut spans: Vec<Run<'_>> = Vec::with_capacity(pieces.len());
        let mut selected: Vec<Vec<Pick>> = vec![Vec::new(); self.shards().len()];
        for piece in pieces {
            let (shard, t) = self
                .locate(piece.tensor)
                .ok_or_else(|| Error::NotFound(piece.tensor.to_string()))?;
            selected[shard].push(Pick {
                tensor: t as u32,
                slice: None,
            });
            let (start, end) = self.shards()[shard].header().tensors()[t].data_offsets;
            spans.push(Run {
                shard,
                piece,
                offset: self.shards()[shard].header().data_start() + start,
                len: end - start,
            });
        }
        for picks in &mut selected {
            picks.sort_unstable_by_key(|p| p.tensor);
            picks.dedup_by_key(|p| p.tensor);
        }
        let plan = self.plan(selected, options, None, |d| d);
        let maps = plan
            .shards
            .iter()
            // SAFETY: every shard maps under the checkpoint's `Mapping` (checked above),
            // made by its unsafe constructors, whose contract the caller took on.
            .map(|sp| unsafe { self.shards()[sp.shard].mapping() })
            .collect::<Result<Vec<_>>>()?;
        // Pieces that follow each other both in the file and in their assembly (an expert's
        // gate and up projections) are placed as one: one mapping, and no page between them
        // copied.
        spans.sort_unstable_by_key(|r| (r.piece.into as *const Assembly as usize, r.piece.at));
        let mut runs: Vec<Run<'_>> = Vec::with_capacity(spans.len());
        for span in spans {
            match runs.last_mut() {
                Some(run)
                    if run.shard == span.shard
                        && std::ptr::eq(run.piece.into, span.piece.into)
                        && run.piece.at + run.len == span.piece.at
                        && run.offset + run.len == span.offset =>
                {
                    run.len += span.len;
                }
                _ => runs.push(span),
            }
        }
        // Each run is placed as soon as the request holding its last byte is in the page
        // cache (the file's requests are read in order): placing overlaps reading the rest.
        // Only what fits the prefetch window is read ahead (the rest would be evicted before
        // it is placed); runs past it are placed after, their copies read then and their
        // mapped pages on first touch.
        let budget = options.budget_in(self);
        let ahead = plan.prefix_within(budget.window());
        runs.sort_unstable_by_key(|r| (r.shard, r.offset + r.len));
        let mut by_request: Vec<std::ops::Range<usize>> = vec![0..0; ahead.len()];
        let mut next = 0;
        for (i, request) in ahead.iter().enumerate() {
            let shard = plan.shards[request.shard_plan as usize].shard;
            let end = request.file_offset + request.len;
            let from = runs[next..]
                .iter()
                .position(|r| (r.shard, r.offset + r.len) >= (shard, request.file_offset))
                .map_or(runs.len(), |p| next + p);
            let to = runs[from..]
                .iter()
                .position(|r| (r.shard, r.offset + r.len) > (shard, end))
                .map_or(runs.len(), |p| from + p);
            by_request[i] = from..to;
            next = to;
        }
        let shard_plan = |s: usize| {
            plan.shards
                .iter()
                .position(|sp| sp.shard == s)
                .expect("every piece's shard is in the plan")
        };
        let mapped = std::sync::atomic::AtomicU64::new(0);
        // Runs whose bytes are in the page cache are mapped in as well (see
        // `Assembly::populate`); those past the window stay to be faulted in when touched.
        let place = |run: &Run<'_>, cached: bool| -> Result<()> {
            let map = maps[shard_plan(run.shard)]
                .mapping()
                .expect("a shard's mapping is a mapped file");
            // SAFETY: the files' contract and the pieces' exclusivity are this function's;
            // each run is placed once.
            let n = unsafe { run.place(map, cached) }.map_err(|e| self.assembly_error(run, e))?;
            mapped.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        };
        let placed = |i: usize| by_request.get(i).cloned().unwrap_or(0..0);
        self.with_exec(&plan, options, |exec| {
            exec.cache(&maps, ahead, |_, index| {
                runs[placed(index)].iter().try_for_each(|r| place(r, true))
            })
        })?;
        let done: Vec<bool> = {
            let mut done = vec![false; runs.len()];
            for r in &by_request {
                done[r.clone()].iter_mut().for_each(|d| *d = true);
            }
            done
        };
        runs.iter()
            .zip(&done)
            .filter(|(_, d)| !**d)
            .try_for_each(|(run, _)| place(run, false))?;
        let mapped = mapped.into_inner();
        let total: u64 = runs.iter().map(|r| r.len).sum();
        let report = AssembleReport {
            mapped,
            copied: total - mapped,
        };
        Ok(report)
    }
}

/// Pieces that follow each other in one file as in their assembly, placed as one.
struct Run<'a> {
    shard: usize,
    /// The first piece (its assembly and place).
    piece: &'a Piece<'a>,
    /// The run's bytes in the file.
    offset: u64,
    len: u64,
}

impl Run<'_> {
    /// Places the run (see [`Assembly::place`]), its mapped pages mapped in where
    /// `populate`; the bytes mapped.
    ///
    /// # Safety
    ///
    /// [`Checkpoint::assemble`]'s contract; `map` is the run's file.
    unsafe fn place(
        &self,
        map: &weightlift_storage::MappedFile,
        populate: bool,
    ) -> std::io::Result<usize> {
        let at = usize::try_from(self.piece.at)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "out of range"))?;
        let into = self.piece.into;
        // SAFETY: passed on from this function's contract.
        let mapped = unsafe { into.place(map, self.offset, self.len as usize, at) }?;
        if populate && mapped > 0 {
            // SAFETY: as above: the run's bytes are this call's alone.
            unsafe { into.populate(at, self.len as usize) }?;
        }
        Ok(mapped)
    }
}

impl Checkpoint {
    fn assembly_error(&self, run: &Run<'_>, e: std::io::Error) -> Error {
        if e.kind() == std::io::ErrorKind::InvalidInput {
            placement(run.piece, &e.to_string())
        } else {
            Error::Io {
                location: self.shards()[run.shard].location().clone(),
                context: "assembling a tensor",
                source: e.into(),
            }
        }
    }
}

fn placement(piece: &Piece<'_>, why: &str) -> Error {
    Error::InvalidOption(format!(
        "tensor {:?} at byte {} of an assembly of {}: {why}",
        piece.tensor,
        piece.at,
        piece.into.len()
    ))
}
