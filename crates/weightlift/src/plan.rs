//! The read plan: which file bytes go where, built from the headers alone.
//!
//! Selected tensors of a shard are taken in file order and given aligned slots in one
//! allocation per shard. Runs of neighbouring tensors are coalesced into requests of about
//! `request_size` bytes; a tensor larger than that is split across requests, so large and
//! small tensors alike become a few large reads. A request never spans a gap left by a
//! tensor that was not selected: only selected bytes are read. Per tensor, planning does a
//! constant amount of arithmetic and pushes one or a few [`Piece`]s; nothing is quadratic.

use crate::convert::converted_len;
use std::ops::Range;
use weightlift_device::SlotLayout;
use weightlift_format::{Dtype, Header};

/// A run of one tensor's bytes inside one request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Piece {
    /// Position of the tensor in its [`ShardPlan::tensors`].
    pub slot: u32,
    /// Length of this run in the file.
    pub len: u64,
    /// Where the run's (possibly converted) bytes go in the shard's allocation.
    pub dst: u64,
    /// Length at the destination (differs from `len` under dtype conversion).
    pub dst_len: u64,
}

/// One contiguous read of a file.
#[derive(Debug, Clone)]
pub(crate) struct Request {
    /// Position of the shard in [`ReadPlan::shards`].
    pub shard_plan: u32,
    /// Absolute file offset.
    pub file_offset: u64,
    /// Bytes to read.
    pub len: u64,
    /// The pieces, in file order, as a range of [`ReadPlan::pieces`].
    pub pieces: Range<u32>,
    /// The destination range in the shard's allocation (pieces plus alignment padding).
    pub dst: Range<u64>,
}

/// The part of the plan for one shard.
#[derive(Debug, Clone)]
pub(crate) struct ShardPlan {
    /// Position of the shard in the checkpoint.
    pub shard: usize,
    /// Selected tensors (positions in the header), in file order.
    pub tensors: Vec<u32>,
    /// The dtype each selected tensor has after loading.
    pub out_dtypes: Vec<Dtype>,
    /// Slots of the selected tensors in the shard's allocation.
    pub layout: SlotLayout,
    /// This shard's requests, as a range of [`ReadPlan::requests`].
    pub requests: Range<usize>,
    /// Bytes read from this shard.
    pub bytes: u64,
}

/// The whole plan of a load.
#[derive(Debug, Clone, Default)]
pub(crate) struct ReadPlan {
    pub shards: Vec<ShardPlan>,
    pub requests: Vec<Request>,
    pub pieces: Vec<Piece>,
    pub bytes: u64,
}

impl ReadPlan {
    /// Plans reads of the selected tensors: `selected[i]` lists positions (in file order)
    /// of tensors of shard `i`; `convert` maps a tensor's dtype to the dtype to load it as.
    /// With `max_dst`, no request's destination range (its pieces, converted, plus the
    /// alignment padding between them) is longer than that: what a target that stages each
    /// request through a fixed-size buffer needs.
    pub(crate) fn build(
        headers: &[&Header],
        selected: Vec<Vec<u32>>,
        request_size: u64,
        max_dst: Option<u64>,
        convert: impl Fn(Dtype) -> Dtype,
    ) -> ReadPlan {
        // Splits inside a tensor fall on multiples of 8 bytes: whole elements of every
        // byte-sized dtype, so converted pieces never cut an element.
        let request_size = request_size.max(4096).next_multiple_of(8);
        let max_dst = max_dst.map_or(u64::MAX, |m| m.max(4096));
        let mut plan = ReadPlan::default();
        for (shard_index, tensors) in selected.into_iter().enumerate() {
            if tensors.is_empty() {
                continue;
            }
            let header = headers[shard_index];
            let infos = header.tensors();
            let data_start = header.data_start();
            let out_dtypes: Vec<Dtype> = tensors
                .iter()
                .map(|&t| convert(infos[t as usize].dtype))
                .collect();
            let layout = SlotLayout::new(tensors.iter().zip(&out_dtypes).map(|(&t, &out)| {
                let info = &infos[t as usize];
                converted_len(info.byte_len(), info.dtype, out)
            }));
            let shard_plan = plan.shards.len() as u32;
            let first_request = plan.requests.len();
            let mut current: Option<Request> = None;
            let mut bytes = 0u64;
            for (slot, &t) in tensors.iter().enumerate() {
                let info = &infos[t as usize];
                let (from, to) = (info.dtype, out_dtypes[slot]);
                let start = data_start + info.data_offsets.0;
                let len = info.byte_len();
                bytes += len;
                let mut done = 0u64;
                while done < len {
                    let at = start + done;
                    let dst = layout.offset(slot) + converted_len(done, from, to);
                    let contiguous = current.as_ref().is_some_and(|r| {
                        r.file_offset + r.len == at
                            && r.len < request_size
                            && dst < r.dst.start.saturating_add(max_dst)
                    });
                    if !contiguous {
                        if let Some(r) = current.take() {
                            plan.requests.push(r);
                        }
                        let piece = plan.pieces.len() as u32;
                        current = Some(Request {
                            shard_plan,
                            file_offset: at,
                            len: 0,
                            pieces: piece..piece,
                            dst: 0..0,
                        });
                    }
                    let r = current.as_mut().expect("a request is open");
                    let left = len - done;
                    let dst_start = if r.pieces.is_empty() {
                        dst
                    } else {
                        r.dst.start
                    };
                    // Destination room, in file bytes (conversion may widen).
                    let dst_room = dst_start.saturating_add(max_dst) - dst;
                    let dst_room = dst_room.saturating_mul(from.bits() as u64) / to.bits() as u64;
                    let room = (request_size - r.len).min(dst_room);
                    let mut take = left.min(room);
                    if take < left {
                        take -= take % 8;
                        if take == 0 {
                            // Less than an element's worth of room: start a new request.
                            plan.requests.push(current.take().expect("open"));
                            continue;
                        }
                    }
                    let dst_len = converted_len(take, from, to);
                    if r.pieces.is_empty() {
                        r.dst = dst..dst;
                    }
                    plan.pieces.push(Piece {
                        slot: slot as u32,
                        len: take,
                        dst,
                        dst_len,
                    });
                    r.pieces.end += 1;
                    r.len += take;
                    r.dst.end = dst + dst_len;
                    done += take;
                }
            }
            if let Some(r) = current.take() {
                plan.requests.push(r);
            }
            plan.bytes += bytes;
            plan.shards.push(ShardPlan {
                shard: shard_index,
                tensors,
                out_dtypes,
                layout,
                requests: first_request..plan.requests.len(),
                bytes,
            });
        }
        plan
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

    fn shard() -> impl Strategy<Value = Vec<(Dtype, Vec<usize>, bool)>> {
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
        prop::collection::vec((dtype, shape, any::<bool>()), 0..24)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        #[test]
        fn plans_read_every_selected_byte_once_and_nothing_else(
            shards in prop::collection::vec(shard(), 1..4),
            request_size in 1u64..40_000,
            max_dst in prop::option::of(1u64..40_000),
            to in prop::option::of(prop::sample::select(vec![Dtype::F32, Dtype::BF16, Dtype::F16])),
        ) {
            let headers: Vec<Header> = shards
                .iter()
                .map(|s| header(&s.iter().map(|(d, sh, _)| (*d, sh.clone())).collect::<Vec<_>>()))
                .collect();
            // Selection by name: the writer reorders tensors, so map names back.
            let selected: Vec<Vec<u32>> = headers
                .iter()
                .zip(&shards)
                .map(|(h, s)| {
                    h.tensors()
                        .iter()
                        .enumerate()
                        .filter(|(_, t)| s[t.name[1..].parse::<usize>().unwrap()].2)
                        .map(|(i, _)| i as u32)
                        .collect()
                })
                .collect();
            let refs: Vec<&Header> = headers.iter().collect();
            let convert = |d: Dtype| to.map_or(d, |to| converted(d, to));
            let plan = ReadPlan::build(&refs, selected.clone(), request_size, max_dst, convert);
            let effective = request_size.max(4096).next_multiple_of(8);
            let effective_dst = max_dst.map_or(u64::MAX, |m| m.max(4096));

            let mut expected_bytes = 0;
            for (shard, picks) in selected.iter().enumerate() {
                let sp = plan.shards.iter().find(|sp| sp.shard == shard);
                let Some(sp) = sp else {
                    prop_assert!(picks.is_empty());
                    continue;
                };
                prop_assert_eq!(&sp.tensors, picks);
                let h = &headers[shard];
                let infos = h.tensors();
                // Bytes of each selected tensor seen so far, in file order.
                let mut seen = vec![0u64; picks.len()];
                let mut last_dst_end = 0;
                for r in &plan.requests[sp.requests.clone()] {
                    prop_assert!(r.len > 0 && r.len <= effective);
                    prop_assert!(r.dst.end - r.dst.start <= effective_dst, "{:?} > {}", r.dst, effective_dst);
                    prop_assert!(r.dst.start >= last_dst_end && r.dst.end <= sp.layout.total());
                    last_dst_end = r.dst.end;
                    let mut at = r.file_offset;
                    let mut dst_at = r.dst.start;
                    let mut sum = 0;
                    for p in &plan.pieces[r.pieces.start as usize..r.pieces.end as usize] {
                        let slot = p.slot as usize;
                        let info = &infos[sp.tensors[slot] as usize];
                        let out = sp.out_dtypes[slot];
                        prop_assert_eq!(out, convert(info.dtype));
                        let start = h.data_start() + info.data_offsets.0;
                        // The piece is the next unread part of its tensor, contiguous in the file.
                        prop_assert_eq!(at, start + seen[slot]);
                        if seen[slot] > 0 {
                            prop_assert_eq!(seen[slot] % 8, 0, "splits fall on 8-byte boundaries");
                        }
                        let (num, den) = (out.bits() as u64, info.dtype.bits() as u64);
                        prop_assert_eq!(p.dst, sp.layout.offset(slot) + seen[slot] * num / den);
                        prop_assert_eq!(p.dst_len, p.len * num / den);
                        prop_assert!(p.dst >= dst_at);
                        prop_assert_eq!(sp.layout.offset(slot) % 64, 0);
                        seen[slot] += p.len;
                        prop_assert!(seen[slot] <= info.byte_len());
                        at += p.len;
                        dst_at = p.dst + p.dst_len;
                        sum += p.len;
                    }
                    prop_assert_eq!(sum, r.len);
                    prop_assert_eq!(dst_at, r.dst.end);
                    prop_assert!(at <= h.file_len());
                }
                for (slot, &t) in picks.iter().enumerate() {
                    prop_assert_eq!(seen[slot], infos[t as usize].byte_len(), "tensor read completely");
                    expected_bytes += infos[t as usize].byte_len();
                }
            }
            prop_assert_eq!(plan.bytes, expected_bytes);
            prop_assert_eq!(plan.requests.iter().map(|r| r.len).sum::<u64>(), expected_bytes);
        }
    }
}
