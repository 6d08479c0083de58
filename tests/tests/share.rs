//! Loads shared by ranks: each reads a byte-balanced share, the shares are exchanged (here
//! in memory, standing in for a transport), and every rank ends with every tensor, byte for
//! byte what one process loading alone gets; slice plans load exactly the slices.

use std::ops::Range;
use weightlift::{Checkpoint, Dtype, LoadOptions, Share, StateDict};
use weightlift_testkit::files::{Spec, disk_tempdir, moe, split, write_file, write_sharded};

fn bytes_by_name(state: &StateDict) -> Vec<(String, Vec<usize>, Vec<u8>)> {
    let mut out: Vec<_> = state
        .iter()
        .map(|t| {
            (
                t.name().to_string(),
                t.shape().to_vec(),
                t.bytes().unwrap().to_vec(),
            )
        })
        .collect();
    out.sort();
    out
}

/// Every rank loads its share, then receives every other rank's spans.
fn shared(ckpt: &Checkpoint, options: &LoadOptions, world: usize) -> Vec<(StateDict, u64)> {
    let mut loads: Vec<_> = (0..world)
        .map(|rank| ckpt.load_share(options, Share { rank, world }).unwrap())
        .collect();
    let spans = loads[0].spans().to_vec();
    for load in &loads {
        assert_eq!(load.spans(), &spans[..], "every rank plans the same spans");
    }
    for (i, span) in spans.iter().enumerate() {
        let sent = loads[span.owner].span_mut(i).unwrap().to_vec();
        for (rank, load) in loads.iter_mut().enumerate() {
            if rank != span.owner {
                load.span_mut(i).unwrap().copy_from_slice(&sent);
            }
        }
    }
    loads
        .into_iter()
        .map(|load| {
            let read = load.bytes_read();
            (load.finish(), read)
        })
        .collect()
}

#[test]
fn ranks_read_their_share_once_and_end_with_everything() {
    let dir = disk_tempdir();
    write_sharded(dir.path(), &split(moe(3, 24, 64, 32), 3), true);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    for options in [
        LoadOptions::default().request_size(64 << 10),
        LoadOptions::default()
            .request_size(64 << 10)
            .convert_to(Dtype::F32),
    ] {
        let alone = ckpt.load(&options).unwrap();
        let total = alone.bytes_read();
        assert_eq!(total, ckpt.data_bytes());
        for world in [2, 4] {
            let ranks = shared(&ckpt, &options, world);
            let mut sum = 0;
            for (rank, (state, read)) in ranks.iter().enumerate() {
                assert_eq!(
                    bytes_by_name(state),
                    bytes_by_name(&alone),
                    "rank {rank}/{world}"
                );
                assert_eq!(state.bytes_read(), *read);
                // Each rank reads its share: at most 1/world of the bytes plus one request.
                assert!(
                    *read as f64 <= total as f64 / world as f64 + (64 << 10) as f64,
                    "rank {rank}/{world} read {read} of {total}"
                );
                sum += read;
            }
            assert_eq!(sum, total, "the storage is read once, not {world} times");
        }
    }
    assert!(
        ckpt.load_share(&LoadOptions::default(), Share { rank: 2, world: 2 })
            .is_err()
    );
}

#[test]
fn slice_plans_load_exactly_the_slices() {
    let dir = disk_tempdir();
    let path = dir.path().join("m.safetensors");
    let specs = vec![
        Spec::new("a.w", Dtype::BF16, &[64, 96]),
        Spec::new("b.w", Dtype::F32, &[96, 64]),
        Spec::new("c.bias", Dtype::F32, &[96]),
        Spec::new("d.f4", Dtype::F4, &[8, 16]),
    ];
    write_file(&path, &specs);
    let ckpt = Checkpoint::open(&path).unwrap();
    let world = 4usize;
    for rank in 0..world {
        // Column-parallel: each rank its quarter of the rows of `a.w`, and of the columns of
        // `b.w`; biases whole.
        let block = move |name: &str, shape: &[usize]| -> Option<Vec<Range<usize>>> {
            let part = |n: usize| (n / world * rank)..(n / world * (rank + 1));
            match name {
                "a.w" | "d.f4" => Some(vec![part(shape[0])]),
                "b.w" => Some(vec![0..shape[0], part(shape[1])]),
                _ => None,
            }
        };
        let options = LoadOptions::default().request_size(4096).slices(block);
        let state = ckpt.load(&options).unwrap();
        for t in &state {
            let ranges = block(t.name(), ckpt.info(t.name()).unwrap().1.shape.as_slice());
            let expected = ckpt
                .get_slice(t.name(), ranges.as_deref().unwrap_or(&[]))
                .unwrap();
            assert_eq!(t.shape(), expected.shape(), "{}", t.name());
            assert_eq!(t.bytes(), expected.bytes(), "{}", t.name());
        }
        // What was read: the slices, and between them (to save requests) the other ranks'
        // parts of the same tensors, never more than the tensors hold; with no gap allowed,
        // exactly the slices, into the same tensors.
        let selected: u64 = state.iter().map(|t| t.byte_len() as u64).sum();
        let tensors: u64 = specs.iter().map(|s| s.data.len() as u64).sum();
        assert!(state.bytes_read() >= selected && state.bytes_read() <= tensors);
        assert!(
            state.bytes_read() > selected,
            "small gaps are read to save requests"
        );
        let exact = ckpt.load(&options.clone().max_gap(0)).unwrap();
        assert_eq!(exact.bytes_read(), selected);
        assert_eq!(bytes_by_name(&exact), bytes_by_name(&state));
        // The same slices, shared by two ranks.
        let both = shared(&ckpt, &options, 2);
        for (s, _) in &both {
            assert_eq!(bytes_by_name(s), bytes_by_name(&state));
        }
    }
}
