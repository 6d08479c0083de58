//! Placement loads: tensors (or blocks of them) read straight into memory the caller owns,
//! each block where the caller says: at an offset of one of its destinations, with the
//! destination's strides, converted if asked. What fused parameters are made of (experts
//! stacked along a new first dimension, gate and up halves side by side, q/k/v rows cut from
//! one fused tensor) is then written once, in place, by one planned load: coalesced reads of
//! the files, run in parallel, with no intermediate copy of the model.
//!
//! Every placement is checked before any byte is read: the tensor exists, its block is
//! what the caller expects, the block lands inside its destination, and no two blocks land
//! on the same bytes.

use crate::checkpoint::Checkpoint;
use crate::convert::is_conversion_target;
use crate::error::{Error, Result};
use crate::exec::{self, Stretch, read_stretches};
use crate::options::LoadOptions;
use crate::plan::{Coalescer, GAP, Piece, Request, Run, Staged};
use crate::slice;
use std::ops::Range;
use weightlift_device::{CopyEngine, DeviceMemory, StagedCopy, StagedTarget};
use weightlift_format::Dtype;

/// One block of a source tensor and where it goes: destination `dest` (a position in the
/// destinations handed to [`Checkpoint::load_into`]), starting at byte `offset`, laid out with
/// `strides` (in elements, one per dimension of the block; the last must be 1), converted to
/// `dtype` if set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fill {
    tensor: String,
    block: Vec<Range<usize>>,
    shape: Option<Vec<usize>>,
    view: Option<Vec<usize>>,
    dest: usize,
    offset: u64,
    strides: Option<Vec<u64>>,
    dtype: Option<Dtype>,
}

impl Fill {
    /// All of `tensor`, as stored, into destination `dest` at byte `offset` (C-contiguous).
    pub fn new(tensor: impl Into<String>, dest: usize, offset: u64) -> Fill {
        Fill {
            tensor: tensor.into(),
            block: Vec::new(),
            shape: None,
            view: None,
            dest,
            offset,
            strides: None,
            dtype: None,
        }
    }

    /// Only the block `ranges` of the tensor (one range per leading dimension, as
    /// [`Checkpoint::get_slice`] takes them).
    pub fn block(mut self, ranges: Vec<Range<usize>>) -> Fill {
        self.block = ranges;
        self
    }

    /// The shape the block must have (checked against the file before anything is read).
    pub fn shape(mut self, shape: Vec<usize>) -> Fill {
        self.shape = Some(shape);
        self
    }

    /// The block's elements, in C order, seen as `shape` (as many elements) before the
    /// strides place them: how a row-interleaving (`[g0, u0, g1, u1, ...]` into
    /// `[g0, g1, ..., u0, u1, ...]`) becomes one placement, the rows seen as `[rows / 2, 2]`.
    pub fn view(mut self, shape: Vec<usize>) -> Fill {
        self.view = Some(shape);
        self
    }

    /// The destination's strides over the block (or its [`Fill::view`]), in elements
    /// (default: C-contiguous).
    pub fn strides(mut self, strides: Vec<u64>) -> Fill {
        self.strides = Some(strides);
        self
    }

    /// Converts the block to `dtype` (F16, BF16, F32 among themselves).
    pub fn dtype(mut self, dtype: Dtype) -> Fill {
        self.dtype = Some(dtype);
        self
    }
}

/// What a placement load did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct FillReport {
    /// Bytes read from storage (the blocks, and the small gaps bridged between them).
    pub bytes_read: u64,
    /// Reads made.
    pub requests: usize,
}

/// A contiguous run of one block, checked: `len` bytes of tensor `tensor` (its position in
/// shard `shard`'s header) at file offset `src`, converted from `from` to `to`, into
/// `dst_len` bytes of destination `dest` at `at`.
#[derive(Debug, Clone)]
struct Segment {
    shard: usize,
    tensor: u32,
    src: u64,
    len: u64,
    from: Dtype,
    to: Dtype,
    dest: usize,
    at: u64,
    dst_len: u64,
    fill: usize,
    /// The file bytes of the whole tensor (see [`crate::plan::Run::tensor_start`]).
    whole: Range<u64>,
}

/// A placement load's plan: its segments in read order, and the requests the one coalescer
/// made of them (pieces tagged with segment positions; a piece's `dst` is its offset in its
/// segment's destination).
struct PlacePlan {
    segments: Vec<Segment>,
    requests: Vec<Request>,
    pieces: Vec<Piece>,
}

impl PlacePlan {
    fn pieces(&self, request: &Request) -> &[Piece] {
        &self.pieces[request.pieces.start as usize..request.pieces.end as usize]
    }

    fn report(&self) -> FillReport {
        FillReport {
            bytes_read: self.requests.iter().map(|r| r.len).sum(),
            requests: self.requests.len(),
        }
    }

    /// Reads `request` with one scatter read into `outs` (one per piece of it; `None` for
    /// gaps), naming the tensor that failed (the executor's rules, see `exec`).
    fn read(
        &self,
        ckpt: &Checkpoint,
        request: &Request,
        outs: Vec<Option<&mut [u8]>>,
    ) -> Result<()> {
        let shard = &ckpt.shards()[request.shard_plan as usize];
        let pieces = self.pieces(request);
        let stretches = pieces
            .iter()
            .zip(outs)
            .map(|(p, out)| match out {
                Some(out) => {
                    let seg = &self.segments[p.slot as usize];
                    Stretch::Into {
                        len: p.len,
                        from: seg.from,
                        to: seg.to,
                        out,
                    }
                }
                None => Stretch::Gap(p.len),
            })
            .collect();
        read_stretches(shard.source().as_ref(), request.file_offset, stretches).map_err(|e| {
            let infos = shard.header().tensors();
            let tensors = pieces
                .iter()
                .filter(|p| p.slot != GAP)
                .map(|p| &infos[self.segments[p.slot as usize].tensor as usize]);
            exec::read_error(shard, tensors, e)
        })
    }
}

fn invalid(tensor: &str, reason: String) -> Error {
    Error::InvalidPlacement {
        tensor: tensor.to_string(),
        reason,
    }
}

impl Checkpoint {
    /// Reads the blocks `fills` names into `dests`, memory the caller owns (see [`Fill`]):
    /// one planned load, coalesced reads run in parallel on the options' threads, straight
    /// into place where no conversion is asked. `options`: threads, request size, gap
    /// bridging (`max_gap`), progress and cancellation apply; the rest does not.
    ///
    /// Nothing is read unless every fill is valid (see [`Error::InvalidPlacement`]). On a
    /// read error the destinations hold part of the bytes: the error says which file and
    /// tensor.
    pub fn load_into(
        &self,
        fills: &[Fill],
        dests: Vec<&mut [u8]>,
        options: &LoadOptions,
    ) -> Result<FillReport> {
        let lens: Vec<u64> = dests.iter().map(|d| d.len() as u64).collect();
        let plan = self.place_plan(fills, &lens, options, Staged::Free)?;
        // Each piece's destination bytes, split off the destinations in destination order
        // (the segments are disjoint): what lets threads write them without sharing.
        let mut order: Vec<usize> = (0..plan.pieces.len())
            .filter(|&i| plan.pieces[i].slot != GAP)
            .collect();
        let dest_of = |i: usize| plan.segments[plan.pieces[i].slot as usize].dest;
        order.sort_by_key(|&i| (dest_of(i), plan.pieces[i].dst));
        let mut outs: Vec<Option<&mut [u8]>> = (0..plan.pieces.len()).map(|_| None).collect();
        let mut rest: Vec<Option<&mut [u8]>> = dests.into_iter().map(Some).collect();
        let mut taken = vec![0u64; rest.len()];
        for i in order {
            let (d, p) = (dest_of(i), &plan.pieces[i]);
            let dest = rest[d].take().expect("a destination");
            let (_, tail) = dest.split_at_mut((p.dst - taken[d]) as usize);
            let (mine, tail) = tail.split_at_mut(p.dst_len as usize);
            taken[d] = p.dst + p.dst_len;
            rest[d] = Some(tail);
            outs[i] = Some(mine);
        }
        let mut outs = outs.into_iter();
        let jobs: Vec<(&Request, Vec<Option<&mut [u8]>>)> = plan
            .requests
            .iter()
            .map(|r| (r, outs.by_ref().take(r.pieces.len()).collect()))
            .collect();
        self.run_plan(&plan, jobs, options, |request, outs| {
            plan.read(self, request, outs)
        })?;
        Ok(plan.report())
    }

    /// [`Checkpoint::load_into`] into device memory the caller holds (`dests`), through
    /// `target`'s pinned staging pool: each coalesced read lands in a staging buffer
    /// (converted there where asked) and its blocks are copied asynchronously to their
    /// places (one copy per run of blocks that are neighbours in the destination too),
    /// while the next reads proceed. Every copy has completed when this returns, error or
    /// not. A request's blocks, converted, fit one staging buffer.
    pub fn load_into_staged<E: CopyEngine>(
        &self,
        fills: &[Fill],
        dests: Vec<&mut E::Memory>,
        target: &StagedTarget<E>,
        options: &LoadOptions,
    ) -> Result<FillReport> {
        let dests: Vec<&E::Memory> = dests.into_iter().map(|d| &*d).collect();
        let lens: Vec<u64> = dests.iter().map(|d| d.len()).collect();
        let staged = Staged::Packed(target.buffer_size() as u64);
        let plan = self.place_plan(fills, &lens, options, staged)?;
        let jobs: Vec<(&Request, ())> = plan.requests.iter().map(|r| (r, ())).collect();
        let ran = self.run_plan(&plan, jobs, options, |request, ()| {
            let mine = plan.pieces(request);
            // The blocks lie one after another in the staging buffer, in read order; blocks
            // that are neighbours in the destination too go in one copy.
            let mut copies: Vec<StagedCopy<'_, E::Memory>> = Vec::new();
            let mut at = 0usize;
            for p in mine.iter().filter(|p| p.slot != GAP) {
                let n = p.dst_len as usize;
                let memory = dests[plan.segments[p.slot as usize].dest];
                match copies.last_mut() {
                    Some(last)
                        if last.src.end == at
                            && std::ptr::eq(last.memory, memory)
                            && last.offset + last.src.len() as u64 == p.dst =>
                    {
                        last.src.end += n;
                    }
                    _ => copies.push(StagedCopy {
                        src: at..at + n,
                        memory,
                        offset: p.dst,
                    }),
                }
                at += n;
            }
            let fill = |buffer: &mut [u8]| {
                let mut outs = Vec::with_capacity(mine.len());
                let mut rest = buffer;
                for p in mine {
                    if p.slot == GAP {
                        outs.push(None);
                        continue;
                    }
                    let (out, tail) = std::mem::take(&mut rest).split_at_mut(p.dst_len as usize);
                    outs.push(Some(out));
                    rest = tail;
                }
                plan.read(self, request, outs)
            };
            // SAFETY: `dests` are borrowed mutably for this call, so nothing else reads or
            // writes them meanwhile, and they outlive it; the copies' destinations lie in
            // their memories (checked by `segments`, and again by `stage`) and no two
            // blocks share a byte (`check_overlaps`), so no two copies write the same bytes;
            // every copy has completed before this function returns (the `settle` below runs
            // whether or not the reads succeeded).
            unsafe { target.stage(at, fill, &copies) }
        });
        let settled = target.settle();
        ran?;
        settled?;
        Ok(plan.report())
    }

    /// [`Checkpoint::load_into_staged`] on CUDA device `ordinal` (feature `cuda`), into
    /// device memory another library allocated there: `dests` are `(device address,
    /// length)`, a torch tensor's `data_ptr()` and `nbytes`, say. The staging pool and
    /// streams are the options' (`staging`, `streams`).
    ///
    /// # Safety
    ///
    /// Each destination must be device memory on that device, in its primary context (the
    /// CUDA runtime's), allocated for the whole call, and neither read nor written by
    /// anything else until this returns (work queued on it on other streams must have
    /// completed before the call).
    #[cfg(feature = "cuda")]
    pub unsafe fn load_into_cuda(
        &self,
        fills: &[Fill],
        ordinal: usize,
        dests: &[(u64, u64)],
        options: &LoadOptions,
    ) -> Result<FillReport> {
        let target = StagedTarget::cuda(ordinal, options.streams, options.staging)?;
        let mut memories: Vec<_> = dests
            .iter()
            // SAFETY: the caller vouches for each range (this function's contract); the
            // values do not free it.
            .map(|&(ptr, len)| unsafe { target.engine().borrow(ptr, len) })
            .collect();
        self.load_into_staged(fills, memories.iter_mut().collect(), &target, options)
    }

    /// Without the `cuda` feature: an error saying so.
    ///
    /// # Safety
    ///
    /// None needed (nothing is touched); `unsafe` as in the `cuda` build.
    #[cfg(not(feature = "cuda"))]
    pub unsafe fn load_into_cuda(
        &self,
        _fills: &[Fill],
        ordinal: usize,
        _dests: &[(u64, u64)],
        _options: &LoadOptions,
    ) -> Result<FillReport> {
        Err(weightlift_device::cuda_not_built(ordinal).into())
    }

    /// Runs `jobs` (a request of `plan` and what it writes into) with the executor's loop on
    /// the options' threads, reporting progress per file.
    fn run_plan<'p, T: Send>(
        &self,
        plan: &'p PlacePlan,
        jobs: Vec<(&'p Request, T)>,
        options: &LoadOptions,
        read: impl Fn(&Request, T) -> Result<()> + Sync,
    ) -> Result<()> {
        let mut per_shard = vec![0u64; self.shards().len()];
        for r in &plan.requests {
            per_shard[r.shard_plan as usize] += r.len;
        }
        let progress = self.progress_sink(options, plan.report().bytes_read);
        let pool = self.pool(options)?;
        exec::run_jobs(&pool, options.cancel.as_deref(), jobs, |(request, out)| {
            read(request, out)?;
            let shard = request.shard_plan as usize;
            progress.done(shard, per_shard[shard], request.len);
            Ok(())
        })
    }

    /// The plan of a placement load: every fill's segments, checked against the file and the
    /// destinations' lengths `lens`, none overlapping, coalesced into requests in read order
    /// by the one coalescer (the options' request size and gap bridging; `staged`: what one
    /// request's blocks may hold).
    fn place_plan(
        &self,
        fills: &[Fill],
        lens: &[u64],
        options: &LoadOptions,
        staged: Staged,
    ) -> Result<PlacePlan> {
        let mut segments = Vec::new();
        for (i, fill) in fills.iter().enumerate() {
            self.segments(fill, i, lens, &mut segments)?;
        }
        check_overlaps(&mut segments, fills)?;
        segments.sort_by_key(|s| (s.shard, s.src));
        let mut coalescer = Coalescer::new(options.request_size, options.max_gap, staged);
        for (i, seg) in segments.iter().enumerate() {
            coalescer.push(Run {
                shard_plan: seg.shard as u32,
                slot: i as u32,
                src: seg.src,
                len: seg.len,
                from: seg.from,
                to: seg.to,
                dst: seg.at,
                tensor_start: seg.whole.start,
                tensor_end: seg.whole.end,
            });
        }
        let (requests, pieces) = coalescer.finish();
        Ok(PlacePlan {
            segments,
            requests,
            pieces,
        })
    }

    /// The segments of `fill`, checked, appended to `out`: one per run of the block that is
    /// contiguous in the destination too (the coalescer cuts long ones into requests).
    fn segments(
        &self,
        fill: &Fill,
        index: usize,
        lens: &[u64],
        out: &mut Vec<Segment>,
    ) -> Result<()> {
        let name = fill.tensor.as_str();
        let (s, t) = self
            .locate(name)
            .ok_or_else(|| Error::NotFound(name.to_string()))?;
        let shard = &self.shards()[s];
        let info = &shard.header().tensors()[t];
        let from = info.dtype;
        let to = fill.dtype.unwrap_or(from);
        if to != from && !(is_conversion_target(from) && is_conversion_target(to)) {
            return Err(invalid(
                name,
                format!("cannot convert {from} to {to}: conversions are among F16, BF16 and F32"),
            ));
        }
        let bits = from.bits() as u64;
        let plan = if fill.block.is_empty() {
            slice::SlicePlan {
                shape: info.shape.clone(),
                runs: vec![(0, info.byte_len())],
            }
        } else {
            slice::plan(&info.shape, &fill.block, bits).map_err(|reason| Error::InvalidSlice {
                tensor: name.to_string(),
                reason,
            })?
        };
        if let Some(want) = &fill.shape
            && *want != plan.shape
        {
            return Err(invalid(
                name,
                format!(
                    "the destination expects a block of shape {want:?}, the file has {:?}",
                    plan.shape
                ),
            ));
        }
        let shape = match &fill.view {
            Some(view) => {
                let count = |s: &[usize]| s.iter().map(|&d| d as u128).product::<u128>();
                if count(view) != count(&plan.shape) {
                    return Err(invalid(
                        name,
                        format!(
                            "a view of shape {view:?} does not hold the block's {:?} elements",
                            plan.shape
                        ),
                    ));
                }
                view
            }
            None => &plan.shape,
        };
        let strides = match &fill.strides {
            Some(strides) if strides.len() != shape.len() => {
                return Err(invalid(
                    name,
                    format!(
                        "{} strides for a block of {} dimensions",
                        strides.len(),
                        shape.len()
                    ),
                ));
            }
            Some(strides) => strides.clone(),
            None => contiguous(shape),
        };
        if strides.last().is_some_and(|&s| s != 1) && shape.last().is_some_and(|&d| d > 1) {
            return Err(invalid(
                name,
                "the destination's last dimension must be contiguous (stride 1)".into(),
            ));
        }
        if !bits.is_multiple_of(8) && (fill.strides.is_some() || to != from) {
            return Err(invalid(
                name,
                format!("{from} elements are placed whole and contiguous only"),
            ));
        }
        let dest_len = *lens.get(fill.dest).ok_or_else(|| {
            invalid(
                name,
                format!("destination {} of {} does not exist", fill.dest, lens.len()),
            )
        })?;
        // Elements per unit contiguous in the destination: the trailing dimensions laid out
        // C-contiguously (for sub-byte dtypes, the whole contiguous block).
        let mut unit = 1u64;
        for d in (0..shape.len()).rev() {
            if strides[d] != unit {
                break;
            }
            unit *= shape[d] as u64;
        }
        let to_bits = to.bits() as u64;
        let base = shard.header().data_start() + info.data_offsets.0;
        let mut flat = 0u64; // elements of the block before the current run
        for &(run_at, run_len) in &plan.runs {
            let elements = run_len * 8 / bits;
            let mut done = 0u64;
            while done < elements {
                let first = flat + done;
                // Up to the end of the run, and of the destination's contiguous unit.
                let n = (elements - done).min(unit - first % unit);
                let at = fill.offset + dest_offset(first, shape, &strides) * to_bits / 8;
                let len = (n * to_bits).div_ceil(8);
                if at.checked_add(len).is_none_or(|end| end > dest_len) {
                    return Err(invalid(
                        name,
                        format!(
                            "bytes {at}..{} fall outside destination {} of {dest_len} bytes",
                            at.saturating_add(len),
                            fill.dest
                        ),
                    ));
                }
                let src = base + run_at + done * bits / 8;
                out.push(Segment {
                    shard: s,
                    tensor: t as u32,
                    src,
                    len: (n * bits).div_ceil(8),
                    from,
                    to,
                    dest: fill.dest,
                    at,
                    dst_len: len,
                    fill: index,
                    whole: base..base + info.byte_len(),
                });
                done += n;
            }
            flat += elements;
        }
        Ok(())
    }
}

/// C-contiguous strides (in elements) of `shape`.
fn contiguous(shape: &[usize]) -> Vec<u64> {
    let mut strides = vec![1u64; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1] as u64;
    }
    strides
}

/// The destination element offset of the block's `flat`-th element (C order).
fn dest_offset(mut flat: u64, shape: &[usize], strides: &[u64]) -> u64 {
    let mut at = 0u64;
    for d in (0..shape.len()).rev() {
        let n = shape[d] as u64;
        at += (flat % n) * strides[d];
        flat /= n;
    }
    at
}

/// Sorts `segments` by destination and offset and fails on any two that write the same
/// bytes.
fn check_overlaps(segments: &mut [Segment], fills: &[Fill]) -> Result<()> {
    segments.sort_by_key(|p| (p.dest, p.at));
    for pair in segments.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if a.dest == b.dest && b.at < a.at + a.dst_len {
            return Err(invalid(
                &fills[b.fill].tensor,
                format!(
                    "its block overlaps tensor {:?}'s in destination {} (bytes {}..{})",
                    fills[a.fill].tensor,
                    b.dest,
                    b.at,
                    (a.at + a.dst_len).min(b.at + b.dst_len)
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::convert;
    use proptest::prelude::*;

    fn dtype() -> impl Strategy<Value = Dtype> {
        prop::sample::select(vec![
            Dtype::U8,
            Dtype::I32,
            Dtype::F16,
            Dtype::BF16,
            Dtype::F32,
        ])
    }

    /// The naive reference: each element of the block, converted one at a time, written at
    /// its place in the canvas.
    fn reference(
        data: &[u8],
        dtype: Dtype,
        cols: usize,
        rows: Range<usize>,
        columns: Range<usize>,
        to: Dtype,
        canvas: (&mut [u8], usize, usize, usize),
    ) {
        let (out, canvas_cols, row0, col0) = canvas;
        let (size, to_size) = (dtype.bits() / 8, to.bits() / 8);
        for (i, r) in rows.clone().enumerate() {
            for (j, c) in columns.clone().enumerate() {
                let src = &data[(r * cols + c) * size..][..size];
                let at = ((row0 + i) * canvas_cols + col0 + j) * to_size;
                if dtype == to {
                    out[at..at + to_size].copy_from_slice(src);
                } else {
                    convert(dtype, to, src, &mut out[at..at + to_size]);
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Random tensors, blocks, strided destinations and conversions: a placement load
        /// writes every block where the naive reference does and nothing else, reads every
        /// block's bytes and, between them, gaps of at most `max_gap` of the blocks' tensors
        /// only, in requests of at most the request size.
        #[test]
        fn placements_equal_the_naive_reference(
            tensors in prop::collection::vec((dtype(), 1usize..40, 1usize..40, any::<u8>()), 1..10),
            fills in prop::collection::vec(
                (0usize..10, prop::option::of((0usize..40, 0usize..40, 0usize..40, 0usize..40)),
                 (0usize..3, 0usize..3, 0usize..3), any::<bool>()),
                1..14,
            ),
            request_size in 1u64..20_000,
            max_gap in prop::sample::select(vec![0u64, 64, 4096, 1 << 20]),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("m.safetensors");
            let names: Vec<String> = (0..tensors.len()).map(|i| format!("t{i}")).collect();
            let shapes: Vec<[usize; 2]> = tensors.iter().map(|t| [t.1, t.2]).collect();
            let data: Vec<Vec<u8>> = tensors
                .iter()
                .map(|&(dtype, r, c, seed)| {
                    let n = r * c * dtype.bits() / 8;
                    // Finite floats of every dtype: bytes below 0x70 keep exponents in range.
                    (0..n).map(|i| ((i * 31 + seed as usize * 7) % 0x70) as u8).collect()
                })
                .collect();
            let refs: Vec<_> = tensors
                .iter()
                .enumerate()
                .map(|(i, t)| weightlift_format::TensorRef {
                    name: &names[i],
                    dtype: t.0,
                    shape: &shapes[i],
                    data: &data[i],
                })
                .collect();
            weightlift_format::write_file(&path, &refs, None).unwrap();
            let ckpt = Checkpoint::open(&path).unwrap();

            let mut plan_fills = Vec::new();
            let mut canvases: Vec<Vec<u8>> = Vec::new();
            let mut want: Vec<Vec<u8>> = Vec::new();
            let mut selected = 0u64;
            for &(t, block, (pad_r, pad_c, at), converts) in &fills {
                let t = t % tensors.len();
                let (dtype, r, c, _) = tensors[t];
                let fold = |n: usize, a: usize, b: usize| {
                    let (a, b) = (a % (n + 1), b % (n + 1));
                    a.min(b)..a.max(b)
                };
                let (rows, columns) = match block {
                    Some((a, b, x, y)) => (fold(r, a, b), fold(c, x, y)),
                    None => (0..r, 0..c),
                };
                let floats = [Dtype::F16, Dtype::BF16, Dtype::F32];
                let to = if converts && floats.contains(&dtype) {
                    floats[(t + rows.start) % 3]
                } else {
                    dtype
                };
                let (br, bc) = (rows.len(), columns.len());
                let (canvas_r, canvas_c) = (br + pad_r + at, bc + pad_c + at);
                let to_size = to.bits() / 8;
                let len = canvas_r * canvas_c * to_size;
                let mut expected = vec![0xeeu8; len];
                reference(&data[t], dtype, c, rows.clone(), columns.clone(), to,
                    (&mut expected, canvas_c, at, at));
                let mut fill = Fill::new(names[t].clone(), canvases.len(), ((at * canvas_c + at) * to_size) as u64)
                    .shape(vec![br, bc])
                    .strides(vec![canvas_c as u64, 1])
                    .dtype(to);
                if block.is_some() {
                    fill = fill.block(vec![rows.clone(), columns.clone()]);
                }
                selected += (br * bc * dtype.bits() / 8) as u64;
                plan_fills.push(fill);
                canvases.push(vec![0xeeu8; len]);
                want.push(expected);
            }
            let options = LoadOptions::default()
                .threads(2)
                .request_size(request_size)
                .max_gap(max_gap);
            let report = ckpt
                .load_into(&plan_fills, canvases.iter_mut().map(|c| &mut c[..]).collect(), &options)
                .unwrap();
            for (i, (got, want)) in canvases.iter().zip(&want).enumerate() {
                prop_assert!(got == want, "fill {i}: {:?}", plan_fills[i]);
            }
            prop_assert!(report.bytes_read >= selected, "{} read for {selected}", report.bytes_read);
            let plan = ckpt.place_plan(&plan_fills, &want.iter().map(|w| w.len() as u64).collect::<Vec<_>>(),
                &options, Staged::Free).unwrap();
            let size = crate::plan::request_size(request_size);
            let header = ckpt.shards()[0].header();
            let placed: Vec<bool> = header
                .tensors()
                .iter()
                .map(|t| plan_fills.iter().any(|f| f.tensor == t.name))
                .collect();
            let mut gaps = 0u64;
            for r in &plan.requests {
                prop_assert!(r.len > 0 && r.len <= size);
                prop_assert_eq!(plan.pieces(r).iter().map(|p| p.len).sum::<u64>(), r.len);
                let mut at = r.file_offset;
                for p in plan.pieces(r) {
                    if p.slot == GAP {
                        prop_assert!(p.len <= max_gap, "gap {} over {max_gap}", p.len);
                        gaps += p.len;
                        for (t, info) in header.tensors().iter().enumerate() {
                            let start = header.data_start() + info.data_offsets.0;
                            let end = header.data_start() + info.data_offsets.1;
                            prop_assert!(placed[t] || end <= at || at + p.len <= start || start == end,
                                "a gap reads {}, which nothing places", info.name);
                        }
                    }
                    at += p.len;
                }
            }
            prop_assert!(report.bytes_read <= selected + gaps, "{} read for {selected}", report.bytes_read);
        }
    }

    #[test]
    fn destination_offsets_follow_strides() {
        // A [2, 3] block in the top-left of a [4, 5] matrix.
        let strides = [5, 1];
        assert_eq!(dest_offset(0, &[2, 3], &strides), 0);
        assert_eq!(dest_offset(2, &[2, 3], &strides), 2);
        assert_eq!(dest_offset(3, &[2, 3], &strides), 5);
        assert_eq!(dest_offset(5, &[2, 3], &strides), 7);
        assert_eq!(contiguous(&[2, 3, 4]), vec![12, 4, 1]);
        assert_eq!(contiguous(&[]), Vec::<u64>::new());
    }
}
