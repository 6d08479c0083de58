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
        let mut located = Vec::with_capacity(pieces.len());
        let mut selected: Vec<Vec<Pick>> = vec![Vec::new(); self.shards().len()];
        for piece in pieces {
            let (s, t) = self
                .locate(piece.tensor)
                .ok_or_else(|| Error::NotFound(piece.tensor.to_string()))?;
            selected[s].push(Pick {
                tensor: t as u32,
                slice: None,
            });
            located.push(s);
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
        // Only what fits the prefetch window is read ahead: the rest would be evicted before
        // it is mapped, and is read by the copies or on first touch.
        let budget = options.budget_in(self);
        let ahead = plan.prefix_within(budget.window());
        self.with_exec(&plan, options, |exec| exec.cache(&maps, ahead))?;
        // Pieces that follow each other both in the file and in their assembly (an expert's
        // gate and up projections) are placed as one: one mapping, and no page between them
        // copied.
        let mut spans: Vec<(usize, &Piece<'_>, u64, u64)> = pieces
            .iter()
            .zip(&located)
            .map(|(piece, &s)| {
                let (_, offset, len) = self.file_span(piece.tensor).expect("located above");
                (s, piece, offset, len)
            })
            .collect();
        spans.sort_unstable_by_key(|&(_, p, _, _)| (p.into as *const Assembly as usize, p.at));
        let mut runs: Vec<(usize, &Piece<'_>, u64, u64)> = Vec::with_capacity(spans.len());
        for span in spans {
            match runs.last_mut() {
                Some(run)
                    if run.0 == span.0
                        && std::ptr::eq(run.1.into, span.1.into)
                        && run.1.at + run.3 == span.1.at
                        && run.2 + run.3 == span.2 =>
                {
                    run.3 += span.3;
                }
                _ => runs.push(span),
            }
        }
        let mut report = AssembleReport::default();
        for (s, piece, offset, len) in runs {
            let sp = plan
                .shards
                .iter()
                .position(|sp| sp.shard == s)
                .expect("every piece's shard is in the plan");
            let map = maps[sp]
                .mapping()
                .expect("a shard's mapping is a mapped file");
            let at = usize::try_from(piece.at).map_err(|_| placement(piece, "out of range"))?;
            // SAFETY: the files' contract and the pieces' exclusivity are this function's.
            let mapped =
                unsafe { piece.into.place(map, offset, len as usize, at) }.map_err(|e| {
                    if e.kind() == std::io::ErrorKind::InvalidInput {
                        placement(piece, &e.to_string())
                    } else {
                        Error::Io {
                            location: self.shards()[s].location().clone(),
                            context: "assembling a tensor",
                            source: e.into(),
                        }
                    }
                })?;
            report.mapped += mapped as u64;
            report.copied += len - mapped as u64;
        }
        Ok(report)
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
