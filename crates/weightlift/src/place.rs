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
use crate::convert::{convert, is_conversion_target};
use crate::error::{Error, Result};
use crate::options::LoadOptions;
use crate::slice;
use rayon::prelude::*;
use std::cell::RefCell;
use std::ops::Range;
use std::sync::atomic::Ordering;
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

/// A contiguous run of one block: `src` bytes of a shard's file, converted from `from` to
/// `to`, into `len` bytes of a destination at `at`.
#[derive(Debug, Clone)]
struct Piece {
    shard: usize,
    src: Range<u64>,
    from: Dtype,
    to: Dtype,
    dest: usize,
    at: u64,
    len: u64,
    fill: usize,
}

/// Coalesced reads: a file range and the pieces (positions in the sorted pieces) it serves.
struct Request {
    shard: usize,
    range: Range<u64>,
    pieces: Range<usize>,
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
        let pieces = self.checked_pieces(fills, &lens, options.request_size.max(4096))?;
        // Each piece's destination bytes, split off the destinations (sorted by destination
        // and offset, disjoint): what lets threads write them without sharing.
        let mut slots: Vec<Option<&mut [u8]>> = (0..pieces.len()).map(|_| None).collect();
        let mut rest: Vec<Option<&mut [u8]>> = dests.into_iter().map(Some).collect();
        let mut taken = vec![0u64; rest.len()];
        for (p, piece) in pieces.iter().enumerate() {
            let dest = rest[piece.dest].take().expect("a destination");
            let (_, tail) = dest.split_at_mut((piece.at - taken[piece.dest]) as usize);
            let (mine, tail) = tail.split_at_mut(piece.len as usize);
            taken[piece.dest] = piece.at + piece.len;
            rest[piece.dest] = Some(tail);
            slots[p] = Some(mine);
        }
        let (pieces, order) = in_read_order(pieces);
        let mut slots: Vec<Option<&mut [u8]>> = order
            .iter()
            .map(|&p| Some(slots[p].take().expect("each piece once")))
            .collect();
        let requests = plan_requests(&pieces, options.request_size, options.max_gap);
        let report = report(&requests);
        let jobs: Vec<(Request, Vec<&mut [u8]>)> = requests
            .into_iter()
            .map(|r| {
                let mine = r
                    .pieces
                    .clone()
                    .map(|p| slots[p].take().expect("each piece in one request"))
                    .collect();
                (r, mine)
            })
            .collect();
        self.run_requests(jobs, options, report.bytes_read, |request, outs| {
            self.read_request(request, &pieces, outs, fills)
        })?;
        Ok(report)
    }

    /// [`Checkpoint::load_into`] into device memory the caller holds (`dests`), through
    /// `target`'s pinned staging pool: each coalesced read lands in a staging buffer
    /// (converted there where asked) and its blocks are copied asynchronously to their
    /// places (one copy per run of blocks that are neighbours in the destination too),
    /// while the next reads proceed. Every copy has completed when this returns, error or
    /// not. Requests are at most as long as a staging buffer holds (half of it where a
    /// conversion widens).
    pub fn load_into_staged<E: CopyEngine>(
        &self,
        fills: &[Fill],
        dests: Vec<&mut E::Memory>,
        target: &StagedTarget<E>,
        options: &LoadOptions,
    ) -> Result<FillReport> {
        let dests: Vec<&E::Memory> = dests.into_iter().map(|d| &*d).collect();
        let lens: Vec<u64> = dests.iter().map(|d| d.len()).collect();
        let widen = if fills.iter().any(|f| f.dtype.is_some()) {
            2
        } else {
            1
        };
        let max = options
            .request_size
            .min(target.buffer_size() as u64 / widen)
            .max(1);
        let pieces = self.checked_pieces(fills, &lens, max)?;
        let (pieces, _) = in_read_order(pieces);
        let requests = plan_requests(&pieces, max, options.max_gap);
        let report = report(&requests);
        let jobs: Vec<(Request, ())> = requests.into_iter().map(|r| (r, ())).collect();
        let ran = self.run_requests(jobs, options, report.bytes_read, |request, ()| {
            let mine = &pieces[request.pieces.clone()];
            let len: u64 = mine.iter().map(|p| p.len).sum();
            // The blocks lie one after another in the staging buffer, in read order; blocks
            // that are neighbours in the destination too go in one copy.
            let mut copies: Vec<StagedCopy<'_, E::Memory>> = Vec::new();
            let mut at = 0usize;
            for p in mine {
                let n = p.len as usize;
                match copies.last_mut() {
                    Some(last)
                        if last.src.end == at
                            && std::ptr::eq(last.memory, dests[p.dest])
                            && last.offset + last.src.len() as u64 == p.at =>
                    {
                        last.src.end += n;
                    }
                    _ => copies.push(StagedCopy {
                        src: at..at + n,
                        memory: dests[p.dest],
                        offset: p.at,
                    }),
                }
                at += n;
            }
            let fill = |buffer: &mut [u8]| {
                let mut outs = Vec::with_capacity(mine.len());
                let mut rest = buffer;
                for p in mine {
                    let (out, tail) = std::mem::take(&mut rest).split_at_mut(p.len as usize);
                    outs.push(out);
                    rest = tail;
                }
                self.read_request(request, &pieces, outs, fills)
            };
            // SAFETY: `dests` are borrowed mutably for this call, so nothing else reads or
            // writes them meanwhile, and they outlive it; the copies' destinations lie in
            // their memories (checked by `checked_pieces`, and again by `stage`) and no two
            // blocks share a byte (`check_overlaps`), so no two copies write the same bytes;
            // every copy has completed before this function returns (the `settle` below runs
            // whether or not the reads succeeded).
            unsafe { target.stage(len as usize, fill, &copies) }
        });
        let settled = target.settle();
        ran?;
        settled?;
        Ok(report)
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

    /// Runs `jobs` (a request and what it writes into) on the options' threads, stopping at
    /// the first error or cancellation.
    fn run_requests<T: Send>(
        &self,
        jobs: Vec<(Request, T)>,
        options: &LoadOptions,
        bytes: u64,
        read: impl Fn(&Request, T) -> Result<()> + Sync,
    ) -> Result<()> {
        let mut per_shard = vec![0u64; self.shards().len()];
        for (r, _) in &jobs {
            per_shard[r.shard] += r.range.end - r.range.start;
        }
        let progress = self.progress_sink(options, bytes);
        let pool = self.pool(options)?;
        pool.install(|| {
            jobs.into_par_iter()
                .with_max_len(1)
                .try_for_each(|(request, out)| {
                    if options
                        .cancel
                        .as_ref()
                        .is_some_and(|c| c.load(Ordering::Relaxed))
                    {
                        return Err(Error::Cancelled);
                    }
                    read(&request, out)?;
                    let len = request.range.end - request.range.start;
                    progress.done(request.shard, per_shard[request.shard], len);
                    Ok(())
                })
        })
    }

    /// Every fill's pieces (each at most `max` source bytes), checked against the file and
    /// the destinations' lengths `lens`, sorted by destination and offset, none overlapping.
    fn checked_pieces(&self, fills: &[Fill], lens: &[u64], max: u64) -> Result<Vec<Piece>> {
        let mut pieces = Vec::new();
        for (i, fill) in fills.iter().enumerate() {
            self.pieces(fill, i, lens, max, &mut pieces)?;
        }
        check_overlaps(&mut pieces, fills)?;
        Ok(pieces)
    }

    /// The pieces of `fill`, checked, appended to `out`; a piece longer than `max` bytes is
    /// cut into several, so that one large tensor is read by several threads.
    fn pieces(
        &self,
        fill: &Fill,
        index: usize,
        lens: &[u64],
        max: u64,
        out: &mut Vec<Piece>,
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
                // Up to the end of the run, of the destination's contiguous unit, and of the
                // piece size limit.
                // Sub-byte elements are placed whole (never cut between two elements of a byte).
                let cap = if bits.is_multiple_of(8) {
                    (max / (bits / 8)).max(1)
                } else {
                    u64::MAX
                };
                let n = (elements - done).min(unit - first % unit).min(cap);
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
                out.push(Piece {
                    shard: s,
                    src: src..src + (n * bits).div_ceil(8),
                    from,
                    to,
                    dest: fill.dest,
                    at,
                    len,
                    fill: index,
                });
                done += n;
            }
            flat += elements;
        }
        Ok(())
    }

    /// Reads one request: one scatter read of its file range, straight into the pieces'
    /// destinations (bridged gaps and converted pieces through a per-thread scratch buffer).
    fn read_request(
        &self,
        request: &Request,
        pieces: &[Piece],
        mut outs: Vec<&mut [u8]>,
        fills: &[Fill],
    ) -> Result<()> {
        let mine = &pieces[request.pieces.clone()];
        let shard = &self.shards()[request.shard];
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            // Scratch: gaps, and the source bytes of converted pieces.
            let mut need = 0u64;
            let mut at = request.range.start;
            for p in mine {
                need += p.src.start - at;
                if p.from != p.to {
                    need += p.src.end - p.src.start;
                }
                at = p.src.end;
            }
            if scratch.len() < need as usize {
                scratch.resize(need as usize, 0);
            }
            let mut rest = &mut scratch[..need as usize];
            let mut bufs: Vec<&mut [u8]> = Vec::with_capacity(mine.len() * 2);
            // (start, length) in the scratch buffer of each converted piece's source.
            let mut converted = Vec::new();
            let mut used = 0usize;
            let mut at = request.range.start;
            for (p, out) in mine.iter().zip(outs.iter_mut()) {
                if p.src.start > at {
                    let gap = (p.src.start - at) as usize;
                    let (buf, tail) = std::mem::take(&mut rest).split_at_mut(gap);
                    rest = tail;
                    used += gap;
                    bufs.push(buf);
                }
                if p.from == p.to {
                    bufs.push(&mut out[..]);
                } else {
                    let len = (p.src.end - p.src.start) as usize;
                    let (buf, tail) = std::mem::take(&mut rest).split_at_mut(len);
                    rest = tail;
                    converted.push((used, len));
                    used += len;
                    bufs.push(buf);
                }
                at = p.src.end;
            }
            shard
                .source()
                .read_scatter_at(request.range.start, &mut bufs)
                .map_err(|source| Error::Read {
                    location: shard.location().clone(),
                    tensor: mine
                        .first()
                        .map(|p| fills[p.fill].tensor.clone())
                        .unwrap_or_default(),
                    source,
                })?;
            drop(bufs);
            let mut next = converted.into_iter();
            for (p, out) in mine.iter().zip(outs.iter_mut()) {
                if p.from != p.to {
                    let (start, len) = next.next().expect("a source per converted piece");
                    convert(p.from, p.to, &scratch[start..start + len], out);
                }
            }
            Ok(())
        })
    }
}

/// `pieces` in read order (by file and offset), with the position each had before.
fn in_read_order(pieces: Vec<Piece>) -> (Vec<Piece>, Vec<usize>) {
    let mut order: Vec<usize> = (0..pieces.len()).collect();
    order.sort_by_key(|&p| (pieces[p].shard, pieces[p].src.start));
    let sorted = order.iter().map(|&p| pieces[p].clone()).collect();
    (sorted, order)
}

/// What reading `requests` amounts to.
fn report(requests: &[Request]) -> FillReport {
    FillReport {
        bytes_read: requests.iter().map(|r| r.range.end - r.range.start).sum(),
        requests: requests.len(),
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

/// Sorts `pieces` by destination and offset and fails on any two that write the same bytes.
fn check_overlaps(pieces: &mut [Piece], fills: &[Fill]) -> Result<()> {
    pieces.sort_by_key(|p| (p.dest, p.at));
    for pair in pieces.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if a.dest == b.dest && b.at < a.at + a.len {
            return Err(invalid(
                &fills[b.fill].tensor,
                format!(
                    "its block overlaps tensor {:?}'s in destination {} (bytes {}..{})",
                    fills[a.fill].tensor,
                    b.dest,
                    b.at,
                    (a.at + a.len).min(b.at + b.len)
                ),
            ));
        }
    }
    Ok(())
}

/// Coalesces pieces (sorted by file and offset) into reads of at most `request_size` bytes,
/// bridging gaps of at most `max_gap` bytes (a read that starts because the previous one is
/// full begins where that one ended, so bridged bytes are read wherever the requests are
/// cut); a piece whose source overlaps the previous one's starts a new read.
fn plan_requests(pieces: &[Piece], request_size: u64, max_gap: u64) -> Vec<Request> {
    let mut out: Vec<Request> = Vec::new();
    for (i, p) in pieces.iter().enumerate() {
        let mut start = p.src.start;
        if let Some(last) = out.last_mut()
            && last.shard == p.shard
            && p.src.start >= last.range.end
            && p.src.start - last.range.end <= max_gap
        {
            if p.src.end - last.range.start <= request_size {
                last.range.end = p.src.end;
                last.pieces.end = i + 1;
                continue;
            }
            start = last.range.end;
        }
        out.push(Request {
            shard: p.shard,
            range: start..p.src.end,
            pieces: i..i + 1,
        });
    }
    out
}

thread_local! {
    /// Per-thread scratch for bridged gaps and converted pieces.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(src: Range<u64>) -> Piece {
        Piece {
            shard: 0,
            src,
            from: Dtype::U8,
            to: Dtype::U8,
            dest: 0,
            at: 0,
            len: 0,
            fill: 0,
        }
    }

    #[test]
    fn requests_bridge_gaps_even_where_they_are_cut() {
        let pieces = [
            piece(0..10),
            piece(20..30),
            piece(35..60),
            piece(1000..1010),
        ];
        // Bridged up to 16 bytes, at most 40 bytes a read: cut after 20..30, the next read
        // starts where that one ended (30), so 30..35 is read too; 1000 is too far.
        let r = plan_requests(&pieces, 40, 16);
        let got: Vec<(Range<u64>, Range<usize>)> = r
            .iter()
            .map(|r| (r.range.clone(), r.pieces.clone()))
            .collect();
        assert_eq!(got, vec![(0..30, 0..2), (30..60, 2..3), (1000..1010, 3..4)]);
        // Overlapping sources start a read of their own.
        let r = plan_requests(&[piece(0..10), piece(5..15)], 100, 100);
        assert_eq!(r.len(), 2);
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
