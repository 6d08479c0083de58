//! The read plan: which file bytes go where, built from the headers alone.
//!
//! Selected tensors of a shard are taken in file order and given aligned slots in one
//! allocation per shard. Runs of neighbouring tensors are coalesced into requests of about
//! `request_size` bytes; a tensor larger than that is split across requests, so large and
//! small tensors alike become a few large reads. A request never spans a tensor that was
//! not selected. A tensor may be selected in part (a slice, e.g. one rank's rows or
//! columns): its byte runs are planned one after the other into its slot, and two runs share
//! a request across the unselected bytes between them when those are at most
//! [`ReadPlan::build`]'s `max_gap` and belong to the two runs' tensors (the other ranks'
//! rows): a request saved is worth more than a small gap read and dropped. Per run,
//! planning does a constant amount of arithmetic and pushes one or a few [`Piece`]s;
//! nothing is quadratic.
//!
//! The [`Coalescer`] is the one planner of reads: loads feed it their slots' runs, placement
//! loads (`place.rs`) the runs of the caller's fills; both get requests by the same rules
//! (size floor, gap bridging, where a full request is cut, the staged bound) and run them with
//! the one executor (`exec.rs`).

use crate::convert::converted_len;
use crate::slice::SlicePlan;
use std::ops::Range;
use weightlift_device::SlotLayout;
use weightlift_format::{Dtype, Header};

/// The `slot` of a [`Piece`] whose bytes are read and dropped (a gap between two runs).
pub(crate) const GAP: u32 = u32::MAX;

/// A run of one tensor's bytes inside one request (or, with slot [`GAP`], bytes read and
/// dropped).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Piece {
    /// Position of the tensor in its [`ShardPlan::tensors`], or [`GAP`].
    pub slot: u32,
    /// Length of this run in the file.
    pub len: u64,
    /// Where the run's (possibly converted) bytes go in the shard's allocation.
    pub dst: u64,
    /// Length at the destination (differs from `len` under dtype conversion; 0 for a gap).
    pub dst_len: u64,
}

/// One contiguous read of a file.
#[derive(Debug, Clone)]
pub(crate) struct Request {
    /// Position of the shard in [`ReadPlan::shards`] (for a placement load: the shard's
    /// position in the checkpoint).
    pub shard_plan: u32,
    /// Absolute file offset.
    pub file_offset: u64,
    /// Bytes to read (gaps included).
    pub len: u64,
    /// The pieces, in file order, as a range of [`ReadPlan::pieces`].
    pub pieces: Range<u32>,
    /// The destination range in the shard's allocation (pieces plus alignment padding); for
    /// a placement load, `0..` the bytes its pieces hold (what a staging buffer takes).
    pub dst: Range<u64>,
}

/// The request size every plan works with: at least 4 KiB, and a multiple of 8 bytes, so that
/// splits inside a tensor fall on whole elements of every byte-sized dtype (converted pieces
/// never cut an element).
pub(crate) fn request_size(asked: u64) -> u64 {
    asked.max(4096).next_multiple_of(8)
}

/// What bounds a request's destination where each request goes through a staging buffer of
/// a fixed size (at least 4 KiB).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Staged {
    /// No bound.
    Free,
    /// The destination range a request covers (pieces and the padding between them): a
    /// load's requests land in one region of the shard's allocation.
    Span(u64),
    /// The bytes of a request's pieces, packed one after another: a placement load's land
    /// anywhere in the caller's destinations.
    Packed(u64),
}

/// A run of one tensor's bytes to read: `len` bytes of the file at `src`, landing at `dst`
/// (the load's allocation, or the caller's destination), converted from `from` to `to`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Run {
    pub shard_plan: u32,
    /// What the pieces of the run are tagged with ([`Piece::slot`]).
    pub slot: u32,
    pub src: u64,
    pub len: u64,
    pub from: Dtype,
    pub to: Dtype,
    pub dst: u64,
    /// Where the run's tensor starts and ends in the file: a gap between the previous run
    /// and this one may be read (and dropped) to keep one request only when it holds
    /// nothing but unselected bytes of these two tensors, so a load never reads a tensor it
    /// did not select.
    pub tensor_start: u64,
    pub tensor_end: u64,
}

/// Turns runs, fed in file order per shard, into coalesced requests of at most the request
/// size: runs that follow each other in the file share a request; a run joins the previous
/// run's request across a gap of at most `max_gap` bytes when the gap lies within the two
/// runs' tensors (the rest of a block's tensor, the other ranks' rows or columns); a run
/// longer than a request's room is split on an 8-byte boundary, and the next request starts
/// where the split fell (never re-reading a gap).
pub(crate) struct Coalescer {
    request_size: u64,
    max_gap: u64,
    staged: Staged,
    pub requests: Vec<Request>,
    pub pieces: Vec<Piece>,
    current: Option<Request>,
    /// Where the previous run's tensor ends in the file.
    last_tensor_end: u64,
    /// Bytes read so far: the runs' and the gaps bridged.
    pub read_bytes: u64,
}

impl Coalescer {
    pub(crate) fn new(request_size: u64, max_gap: u64, staged: Staged) -> Coalescer {
        let staged = match staged {
            Staged::Free => Staged::Free,
            Staged::Span(m) => Staged::Span(m.max(4096)),
            Staged::Packed(m) => Staged::Packed(m.max(4096)),
        };
        Coalescer {
            request_size: self::request_size(request_size),
            max_gap,
            staged,
            requests: Vec::new(),
            pieces: Vec::new(),
            current: None,
            last_tensor_end: 0,
            read_bytes: 0,
        }
    }

    /// Room left in request `r` for a piece landing at `dst`, in destination bytes.
    fn dst_room(&self, r: &Request, dst: u64) -> u64 {
        match self.staged {
            Staged::Free => u64::MAX,
            Staged::Span(max) => {
                let start = if r.pieces.is_empty() {
                    dst
                } else {
                    r.dst.start
                };
                start.saturating_add(max).saturating_sub(dst)
            }
            Staged::Packed(max) => max.saturating_sub(r.dst.end),
        }
    }

    /// Plans `run`.
    pub(crate) fn push(&mut self, run: Run) {
        let (from, to) = (run.from, run.to);
        let mut done = 0u64;
        while done < run.len {
            let at = run.src + done;
            let left = run.len - done;
            let dst = run.dst + converted_len(done, from, to);
            // What joins the open request: the next bytes of the same file, or the bytes
            // after a small gap of unselected bytes of the tensors on either side. A gap
            // costs its bytes and saves a request: on storage that counts requests (a cloud
            // volume, a network filesystem, HTTP) a request costs more than a small gap, and
            // ranks of one host that read each other's rows share the page cache.
            let gap = self.current.as_ref().map_or(u64::MAX, |r| {
                if r.shard_plan != run.shard_plan {
                    return u64::MAX;
                }
                at.checked_sub(r.file_offset + r.len).unwrap_or(u64::MAX)
            });
            let joins = self.current.as_ref().is_some_and(|r| {
                let gap_ok =
                    gap == 0 || (gap <= self.max_gap && self.last_tensor_end >= run.tensor_start);
                gap_ok && r.len + gap < self.request_size && self.dst_room(r, dst) > 0
            });
            if !joins {
                self.close();
                let piece = self.pieces.len() as u32;
                self.current = Some(Request {
                    shard_plan: run.shard_plan,
                    file_offset: at,
                    len: 0,
                    pieces: piece..piece,
                    dst: 0..0,
                });
            }
            let packed = matches!(self.staged, Staged::Packed(_));
            let r = self.current.as_mut().expect("a request is open");
            if joins && gap > 0 {
                self.pieces.push(Piece {
                    slot: GAP,
                    len: gap,
                    dst: if packed { 0 } else { r.dst.end },
                    dst_len: 0,
                });
                r.pieces.end += 1;
                r.len += gap;
                self.read_bytes += gap;
            }
            let r = self.current.as_ref().expect("a request is open");
            // Destination room, in file bytes (conversion may widen).
            let dst_room =
                self.dst_room(r, dst).saturating_mul(from.bits() as u64) / to.bits() as u64;
            let room = self.request_size.saturating_sub(r.len).min(dst_room);
            let mut take = left.min(room);
            if take < left {
                take -= take % 8;
                if take == 0 {
                    // Less than an element's worth of room: start a new request.
                    self.close();
                    continue;
                }
            }
            let dst_len = converted_len(take, from, to);
            let r = self.current.as_mut().expect("a request is open");
            if packed {
                r.dst = 0..r.dst.end + dst_len;
            } else {
                if r.pieces.is_empty() {
                    r.dst = dst..dst;
                }
                r.dst.end = dst + dst_len;
            }
            self.pieces.push(Piece {
                slot: run.slot,
                len: take,
                dst,
                dst_len,
            });
            r.pieces.end += 1;
            r.len += take;
            self.read_bytes += take;
            done += take;
        }
        if run.len > 0 {
            // An empty tensor has no bytes to bridge from: the gap's start stays where the
            // last bytes read were, after the last tensor that had some.
            self.last_tensor_end = run.tensor_end;
        }
    }

    /// Ends the open request (the end of a shard's runs, or of a full request).
    pub(crate) fn close(&mut self) {
        if let Some(r) = self.current.take() {
            self.requests.push(r);
        }
    }

    /// The requests and their pieces, every request closed.
    pub(crate) fn finish(mut self) -> (Vec<Request>, Vec<Piece>) {
        self.close();
        (self.requests, self.pieces)
    }
}

/// What a load reads of one tensor.
#[derive(Debug, Clone)]
pub(crate) struct Pick {
    /// Position of the tensor in its header.
    pub tensor: u32,
    /// A block of it (shape and byte runs within the tensor), or `None` for all of it.
    pub slice: Option<SlicePlan>,
}

/// The part of the plan for one shard.
#[derive(Debug, Clone)]
pub(crate) struct ShardPlan {
    /// Position of the shard in the checkpoint.
    pub shard: usize,
    /// Selected tensors (positions in the header), in file order.
    pub tensors: Vec<u32>,
    /// The shape of each selected tensor's block, where only a block is read.
    pub shapes: Vec<Option<Vec<usize>>>,
    /// The dtype each selected tensor has after loading.
    pub out_dtypes: Vec<Dtype>,
    /// Slots of the selected tensors in the shard's allocation.
    pub layout: SlotLayout,
    /// This shard's requests, as a range of [`ReadPlan::requests`].
    pub requests: Range<usize>,
    /// Selected bytes of this shard.
    pub bytes: u64,
    /// Bytes read from this shard: the selected ones and the gaps between runs.
    pub read_bytes: u64,
}

/// The whole plan of a load.
#[derive(Debug, Clone, Default)]
pub(crate) struct ReadPlan {
    pub shards: Vec<ShardPlan>,
    pub requests: Vec<Request>,
    pub pieces: Vec<Piece>,
    /// Selected bytes.
    pub bytes: u64,
}

impl ReadPlan {
    /// The plan's first requests whose lengths add up to at most `bytes` (all of them when
    /// the plan reads no more).
    pub(crate) fn prefix_within(&self, bytes: u64) -> &[Request] {
        let mut total = 0u64;
        let end = self
            .requests
            .iter()
            .position(|r| {
                total += r.len;
                total > bytes
            })
            .unwrap_or(self.requests.len());
        &self.requests[..end]
    }

    /// Plans reads of the selected tensors: `picks[i]` lists the tensors of shard `i` to read
    /// (in file order), each whole or in part; `convert` maps a tensor's dtype to the dtype to
    /// load it as. With `max_dst`, no request's destination range (its pieces, converted,
    /// plus the alignment padding between them) is longer than that: what a target that
    /// stages each request through a fixed-size buffer needs. `max_gap` bounds the unselected
    /// bytes read between two runs of selected tensors (see the module docs).
    pub(crate) fn build(
        headers: &[&Header],
        picks: Vec<Vec<Pick>>,
        request_size: u64,
        max_dst: Option<u64>,
        max_gap: u64,
        convert: impl Fn(Dtype) -> Dtype,
    ) -> ReadPlan {
        let staged = max_dst.map_or(Staged::Free, Staged::Span);
        let mut coalescer = Coalescer::new(request_size, max_gap, staged);
        let mut plan = ReadPlan::default();
        for (shard_index, picks) in picks.into_iter().enumerate() {
            if picks.is_empty() {
                continue;
            }
            let header = headers[shard_index];
            let infos = header.tensors();
            let data_start = header.data_start();
            let tensors: Vec<u32> = picks.iter().map(|p| p.tensor).collect();
            let out_dtypes: Vec<Dtype> = tensors
                .iter()
                .map(|&t| convert(infos[t as usize].dtype))
                .collect();
            let selected_len = |p: &Pick| match &p.slice {
                Some(s) => s.runs.iter().map(|r| r.1).sum(),
                None => infos[p.tensor as usize].byte_len(),
            };
            let layout = SlotLayout::new(picks.iter().zip(&out_dtypes).map(|(p, &out)| {
                converted_len(selected_len(p), infos[p.tensor as usize].dtype, out)
            }));
            let shard_plan = plan.shards.len() as u32;
            let first_request = coalescer.requests.len();
            let read_before = coalescer.read_bytes;
            let mut bytes = 0u64;
            for (slot, pick) in picks.iter().enumerate() {
                let info = &infos[pick.tensor as usize];
                let (from, to) = (info.dtype, out_dtypes[slot]);
                let base = data_start + info.data_offsets.0;
                let whole = [(0, info.byte_len())];
                let runs: &[(u64, u64)] = match &pick.slice {
                    Some(s) => &s.runs,
                    None => &whole,
                };
                // Bytes of this tensor's block planned so far (where the next run lands).
                let mut planned = 0u64;
                for &(offset, len) in runs {
                    bytes += len;
                    coalescer.push(Run {
                        shard_plan,
                        slot: slot as u32,
                        src: base + offset,
                        len,
                        from,
                        to,
                        dst: layout.offset(slot) + converted_len(planned, from, to),
                        tensor_start: base,
                        tensor_end: base + info.byte_len(),
                    });
                    planned += len;
                }
            }
            coalescer.close();
            plan.bytes += bytes;
            plan.shards.push(ShardPlan {
                shard: shard_index,
                tensors,
                shapes: picks
                    .into_iter()
                    .map(|p| p.slice.map(|s| s.shape))
                    .collect(),
                out_dtypes,
                layout,
                requests: first_request..coalescer.requests.len(),
                bytes,
                read_bytes: coalescer.read_bytes - read_before,
            });
        }
        (plan.requests, plan.pieces) = coalescer.finish();
        plan
    }

    /// This rank's part of the plan when `world` processes share the reading: the requests
    /// (in file order, across shards) split into `world` contiguous runs of about equal
    /// bytes; returns the positions of `rank`'s requests. Contiguous, so each rank reads a
    /// few long stretches of the files.
    pub(crate) fn share(&self, rank: usize, world: usize) -> Range<usize> {
        let world = world.max(1) as u64;
        let total: u64 = self.requests.iter().map(|r| r.len).sum();
        // Request i belongs to the rank whose byte range holds its first byte.
        let owner = |before: u64| (before.saturating_mul(world) / total.max(1)) as usize;
        let mut before = 0u64;
        let (mut first, mut end) = (self.requests.len(), self.requests.len());
        for (i, r) in self.requests.iter().enumerate() {
            let o = owner(before);
            if o == rank && first == self.requests.len() {
                first = i;
            }
            if o > rank {
                end = i;
                break;
            }
            before += r.len;
        }
        first.min(end)..end
    }

    /// Who fills what: for each rank, for each shard it reads, the destination range in that
    /// shard's allocation its requests cover (alignment padding between them included):
    /// `(rank, position in `shards`, range)`, in rank order.
    pub(crate) fn spans(&self, world: usize) -> Vec<(usize, usize, Range<u64>)> {
        let mut spans: Vec<(usize, usize, Range<u64>)> = Vec::new();
        for rank in 0..world.max(1) {
            for r in &self.requests[self.share(rank, world)] {
                let sp = r.shard_plan as usize;
                match spans.last_mut() {
                    Some((owner, shard, range)) if *owner == rank && *shard == sp => {
                        range.end = r.dst.end;
                    }
                    _ => spans.push((rank, sp, r.dst.clone())),
                }
            }
        }
        spans
    }
}

#[cfg(test)]
mod tests {
    //! Property tests of the planner on arbitrary headers, selections, request sizes and
    //! conversions: every selected byte is read exactly once and lands in its slot; nothing
    //! else is read; requests are contiguous and bounded; destinations are disjoint.

    use super::*;
    use crate::convert::converted;
    use proptest::prelude::*;
    use weightlift_format::{TensorRef, serialize};

    fn header(tensors: &[(Dtype, Vec<usize>)]) -> Header {
        let names: Vec<String> = (0..tensors.len()).map(|i| format!("t{i:03}")).collect();
        let data: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(d, s)| vec![0u8; d.byte_len(s.iter().product()).unwrap()])
            .collect();
        let refs: Vec<TensorRef> = tensors
            .iter()
            .zip(&names)
            .zip(&data)
            .map(|(((dtype, shape), name), data)| TensorRef {
                name,
                dtype: *dtype,
                shape,
                data,
            })
            .collect();
        Header::from_file_bytes(&serialize(&refs, None).unwrap()).unwrap()
    }

    /// Per tensor: dtype, shape, whether selected, and maybe a block to slice (raw numbers,
    /// folded into the shape below; invalid blocks, e.g. half a byte of F4, read whole).
    type Spec = (
        Dtype,
        Vec<usize>,
        bool,
        Option<(usize, usize, Option<(usize, usize)>)>,
    );

    fn shard() -> impl Strategy<Value = Vec<Spec>> {
        let dtype = prop::sample::select(vec![
            Dtype::U8,
            Dtype::BF16,
            Dtype::F16,
            Dtype::F32,
            Dtype::I64,
            Dtype::F4,
        ]);
        // Up to ~24 KiB per tensor, so that 4 KiB requests split tensors.
        let shape = prop::collection::vec(0usize..48, 0..3).prop_map(|mut s| {
            s.push(2);
            s
        });
        let block = prop::option::of((
            0usize..64,
            0usize..64,
            prop::option::of((0usize..64, 0usize..64)),
        ));
        prop::collection::vec((dtype, shape, any::<bool>(), block), 0..24)
    }

    /// The block `raw` picks from `shape`: a range of the first dimension, maybe one of the
    /// second, in bounds.
    fn block(shape: &[usize], raw: (usize, usize, Option<(usize, usize)>)) -> Vec<Range<usize>> {
        let fold = |n: usize, a: usize, b: usize| {
            let (a, b) = (a % (n + 1), b % (n + 1));
            a.min(b)..a.max(b)
        };
        let mut ranges = vec![fold(shape[0], raw.0, raw.1)];
        if let (Some((c, d)), Some(&n1)) = (raw.2, shape.get(1)) {
            ranges.push(fold(n1, c, d));
        }
        ranges
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        #[test]
        fn plans_read_every_selected_byte_once_and_nothing_else(
            shards in prop::collection::vec(shard(), 1..4),
            request_size in 1u64..40_000,
            max_dst in prop::option::of(1u64..40_000),
            max_gap in prop::sample::select(vec![0u64, 64, 4096, 1 << 20]),
            to in prop::option::of(prop::sample::select(vec![Dtype::F32, Dtype::BF16, Dtype::F16])),
        ) {
            let headers: Vec<Header> = shards
                .iter()
                .map(|s| header(&s.iter().map(|(d, sh, _, _)| (*d, sh.clone())).collect::<Vec<_>>()))
                .collect();
            // Selection by name: the writer reorders tensors, so map names back.
            let picks: Vec<Vec<Pick>> = headers
                .iter()
                .zip(&shards)
                .map(|(h, s)| {
                    h.tensors()
                        .iter()
                        .enumerate()
                        .filter_map(|(i, t)| {
                            let (_, shape, selected, raw) = &s[t.name[1..].parse::<usize>().unwrap()];
                            if !selected {
                                return None;
                            }
                            let slice = raw
                                .map(|raw| block(shape, raw))
                                .and_then(|r| crate::slice::plan(shape, &r, t.dtype.bits() as u64).ok());
                            Some(Pick { tensor: i as u32, slice })
                        })
                        .collect()
                })
                .collect();
            let refs: Vec<&Header> = headers.iter().collect();
            let convert = |d: Dtype| to.map_or(d, |to| converted(d, to));
            let plan = ReadPlan::build(&refs, picks.clone(), request_size, max_dst, max_gap, convert);
            let effective = request_size.max(4096).next_multiple_of(8);
            let effective_dst = max_dst.map_or(u64::MAX, |m| m.max(4096));

            let (mut selected_bytes, mut gap_bytes) = (0u64, 0u64);
            for (shard, picks) in picks.iter().enumerate() {
                let sp = plan.shards.iter().find(|sp| sp.shard == shard);
                let Some(sp) = sp else {
                    prop_assert!(picks.is_empty());
                    continue;
                };
                prop_assert_eq!(&sp.tensors, &picks.iter().map(|p| p.tensor).collect::<Vec<_>>());
                let h = &headers[shard];
                let infos = h.tensors();
                // Each pick's runs in absolute file offsets, and how far each was read.
                let runs: Vec<Vec<(u64, u64)>> = picks
                    .iter()
                    .map(|p| {
                        let base = h.data_start() + infos[p.tensor as usize].data_offsets.0;
                        match &p.slice {
                            Some(s) => s.runs.iter().map(|&(o, l)| (base + o, l)).collect(),
                            None => vec![(base, infos[p.tensor as usize].byte_len())],
                        }
                    })
                    .collect();
                let mut at_run = vec![(0usize, 0u64); picks.len()];
                let mut seen = vec![0u64; picks.len()];
                let mut last_dst_end = 0;
                let mut shard_read = 0;
                for r in &plan.requests[sp.requests.clone()] {
                    prop_assert!(r.len > 0 && r.len <= effective);
                    prop_assert!(r.dst.end - r.dst.start <= effective_dst, "{:?} > {}", r.dst, effective_dst);
                    prop_assert!(r.dst.start >= last_dst_end && r.dst.end <= sp.layout.total());
                    last_dst_end = r.dst.end;
                    let mut at = r.file_offset;
                    let mut dst_at = r.dst.start;
                    let mut sum = 0;
                    for p in &plan.pieces[r.pieces.start as usize..r.pieces.end as usize] {
                        sum += p.len;
                        if p.slot == GAP {
                            // Unselected bytes, only between runs and bounded, and only of
                            // selected tensors: nothing of a tensor the load did not pick.
                            prop_assert!(p.len > 0 && p.len <= max_gap, "gap {}", p.len);
                            for (i, t) in infos.iter().enumerate() {
                                let start = h.data_start() + t.data_offsets.0;
                                let end = h.data_start() + t.data_offsets.1;
                                if start < end && start < at + p.len && at < end {
                                    prop_assert!(
                                        picks.iter().any(|pick| pick.tensor as usize == i),
                                        "a gap reads unselected tensor {}", t.name
                                    );
                                }
                            }
                            prop_assert_eq!(p.dst_len, 0);
                            gap_bytes += p.len;
                            at += p.len;
                            continue;
                        }
                        let slot = p.slot as usize;
                        let info = &infos[sp.tensors[slot] as usize];
                        let out = sp.out_dtypes[slot];
                        prop_assert_eq!(out, convert(info.dtype));
                        // The piece is the next unread part of its tensor's runs.
                        let (run, within) = at_run[slot];
                        let (start, len) = runs[slot][run];
                        prop_assert_eq!(at, start + within);
                        prop_assert!(within + p.len <= len, "a piece stays within its run");
                        if within > 0 {
                            prop_assert_eq!(within % 8, 0, "splits fall on 8-byte boundaries");
                        }
                        let (num, den) = (out.bits() as u64, info.dtype.bits() as u64);
                        prop_assert_eq!(p.dst, sp.layout.offset(slot) + seen[slot] * num / den);
                        prop_assert_eq!(p.dst_len, p.len * num / den);
                        prop_assert!(p.dst >= dst_at);
                        prop_assert_eq!(sp.layout.offset(slot) % 64, 0);
                        seen[slot] += p.len;
                        at_run[slot] = if within + p.len == len { (run + 1, 0) } else { (run, within + p.len) };
                        at += p.len;
                        dst_at = p.dst + p.dst_len;
                    }
                    prop_assert_eq!(sum, r.len);
                    prop_assert_eq!(dst_at, r.dst.end);
                    prop_assert!(at <= h.file_len());
                    shard_read += r.len;
                }
                for (slot, runs) in runs.iter().enumerate() {
                    let want: u64 = runs.iter().map(|r| r.1).sum();
                    prop_assert_eq!(seen[slot], want, "every run read completely");
                    selected_bytes += want;
                }
                prop_assert_eq!(sp.read_bytes, shard_read);
            }
            prop_assert_eq!(plan.bytes, selected_bytes);
            prop_assert_eq!(plan.requests.iter().map(|r| r.len).sum::<u64>(), selected_bytes + gap_bytes);

            // Shares: contiguous, in rank order, covering every request once, balanced.
            let total: u64 = plan.requests.iter().map(|r| r.len).sum();
            let biggest = plan.requests.iter().map(|r| r.len).max().unwrap_or(0);
            for world in 1..6usize {
                let mut next = 0;
                for rank in 0..world {
                    let share = plan.share(rank, world);
                    prop_assert_eq!(share.start, next, "contiguous");
                    next = share.end;
                    let bytes: u64 = plan.requests[share].iter().map(|r| r.len).sum();
                    prop_assert!(bytes <= total / world as u64 + biggest, "rank {rank}/{world}: {bytes} of {total}");
                }
                prop_assert_eq!(next, plan.requests.len());
                // The spans cover what each rank's requests fill.
                let spans = plan.spans(world);
                for rank in 0..world {
                    for r in &plan.requests[plan.share(rank, world)] {
                        let sp = r.shard_plan as usize;
                        prop_assert!(spans.iter().any(|(o, s, range)| *o == rank && *s == sp
                            && range.start <= r.dst.start && r.dst.end <= range.end));
                    }
                }
            }
        }
    }
}
