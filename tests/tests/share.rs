//! Loads shared by ranks: each reads a byte-balanced share, the shares are exchanged (here
//! in memory, standing in for a transport), and every rank ends with every tensor, byte for
//! byte what one process loading alone gets; slice plans load exactly the slices.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
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

/// A transport between threads standing in for ranks: every call is collective (all ranks
/// make the same calls in the same order), as `torch.distributed`'s are.
struct Loopback {
    world: usize,
    barrier: Barrier,
    bytes: Mutex<Vec<u8>>,
    statuses: Mutex<Vec<Option<String>>>,
    sends: AtomicUsize,
}

impl Loopback {
    fn new(world: usize) -> Loopback {
        Loopback {
            world,
            barrier: Barrier::new(world),
            bytes: Mutex::new(Vec::new()),
            statuses: Mutex::new(vec![None; world]),
            sends: AtomicUsize::new(0),
        }
    }

    /// Every rank's status; an error naming the ranks that failed.
    fn agree(&self, rank: usize, mine: Option<&weightlift::Error>) -> Result<(), String> {
        self.statuses.lock().unwrap()[rank] = mine.map(|e| e.to_string());
        self.barrier.wait();
        let failed: Vec<String> = (self.statuses.lock().unwrap().iter().enumerate())
            .filter_map(|(r, s)| s.as_ref().map(|s| format!("rank {r}: {s}")))
            .collect();
        self.barrier.wait();
        match failed.is_empty() {
            true => Ok(()),
            false => Err(failed.join("; ")),
        }
    }

    /// The owner's bytes into every other rank's.
    fn broadcast(&self, rank: usize, owner: usize, bytes: &mut [u8]) -> Result<(), String> {
        if rank == owner {
            *self.bytes.lock().unwrap() = bytes.to_vec();
            self.sends.fetch_add(1, Ordering::Relaxed);
        }
        self.barrier.wait();
        if rank != owner {
            bytes.copy_from_slice(&self.bytes.lock().unwrap());
        }
        self.barrier.wait();
        Ok(())
    }
}

/// Every rank plans its share, then reads it while exchanging, on threads of its own.
fn exchanged(
    ckpt: &Checkpoint,
    options: impl Fn(usize) -> LoadOptions + Sync,
    world: usize,
    chunk: u64,
) -> (Vec<Result<StateDict, String>>, usize) {
    let net = Loopback::new(world);
    let out = std::thread::scope(|s| {
        let ranks: Vec<_> = (0..world)
            .map(|rank| {
                let (net, options) = (&net, &options);
                s.spawn(move || {
                    let mut load = ckpt
                        .plan_share(&options(rank), Share { rank, world })
                        .map_err(|e| e.to_string())?;
                    load.exchange(
                        chunk,
                        |mine| net.agree(rank, mine),
                        |span, bytes| net.broadcast(rank, span.owner, bytes),
                    )
                    .map_err(|e| e.to_string())?;
                    Ok(load.finish())
                })
            })
            .collect();
        ranks.into_iter().map(|r| r.join().unwrap()).collect()
    });
    assert_eq!(net.world, world);
    (out, net.sends.load(Ordering::Relaxed))
}

#[test]
fn shares_read_while_they_are_exchanged_end_with_everything() {
    let dir = disk_tempdir();
    write_sharded(dir.path(), &split(moe(3, 24, 64, 32), 3), true);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let options = LoadOptions::default().request_size(64 << 10);
    let alone = bytes_by_name(&ckpt.load(&options).unwrap());
    let total = ckpt.data_bytes();
    for (world, chunk) in [(2, 100_000), (3, 1 << 20), (4, 4096)] {
        let (ranks, sends) = exchanged(&ckpt, |_| options.clone(), world, chunk);
        let mut sum = 0;
        for (rank, state) in ranks.into_iter().enumerate() {
            let state = state.unwrap();
            assert_eq!(bytes_by_name(&state), alone, "rank {rank}/{world}");
            sum += state.bytes_read();
        }
        assert_eq!(sum, total, "the storage is read once, not {world} times");
        // Pieces of at most `chunk` bytes: the spans cut into as many rounds as it takes.
        assert!(sends as u64 >= total / chunk, "{sends} pieces of {chunk}");
    }
}

#[test]
fn the_exchange_starts_before_a_rank_has_read_its_share() {
    let dir = disk_tempdir();
    write_sharded(dir.path(), &split(moe(3, 24, 64, 32), 3), true);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    // Rank 0's reads stop after their first request until a piece has been exchanged: an
    // exchange that waited for the whole share would never send one (the wait times out
    // and says so).
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let rx = Mutex::new(rx);
    let overlapped = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&overlapped);
    let waited = AtomicBool::new(false);
    let net = Loopback::new(2);
    let sent = Mutex::new(Some(tx));
    let options = LoadOptions::default()
        .request_size(64 << 10)
        .threads(1)
        .progress(move |_| {
            if !waited.swap(true, Ordering::SeqCst) {
                let got = rx
                    .lock()
                    .unwrap()
                    .recv_timeout(std::time::Duration::from_secs(20));
                flag.store(got.is_ok(), Ordering::SeqCst);
            }
        });
    let states: Vec<StateDict> = std::thread::scope(|s| {
        let ranks: Vec<_> = (0..2)
            .map(|rank| {
                let (net, sent) = (&net, &sent);
                let options = match rank {
                    0 => options.clone(),
                    _ => LoadOptions::default().request_size(64 << 10),
                };
                let ckpt = &ckpt;
                s.spawn(move || {
                    let mut load = ckpt.plan_share(&options, Share { rank, world: 2 }).unwrap();
                    load.exchange(
                        4096,
                        |mine| net.agree(rank, mine),
                        |span, bytes| {
                            net.broadcast(rank, span.owner, bytes)?;
                            if let Some(tx) = sent.lock().unwrap().take() {
                                let _ = tx.send(());
                            }
                            Ok(())
                        },
                    )
                    .unwrap();
                    load.finish()
                })
            })
            .collect();
        ranks.into_iter().map(|r| r.join().unwrap()).collect()
    });
    assert!(
        overlapped.load(Ordering::SeqCst),
        "a piece was exchanged while rank 0 still had its share to read"
    );
    let alone = bytes_by_name(&ckpt.load(&LoadOptions::default()).unwrap());
    for state in &states {
        assert_eq!(bytes_by_name(state), alone);
    }
}

#[test]
fn a_rank_whose_reads_fail_fails_every_rank_of_the_exchange() {
    let dir = disk_tempdir();
    write_sharded(dir.path(), &split(moe(3, 24, 64, 32), 3), true);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    // Rank 1's reads are called off before they start: its first piece never comes.
    let cancelled = Arc::new(AtomicBool::new(true));
    let options = |rank: usize| {
        let options = LoadOptions::default().request_size(64 << 10);
        match rank {
            1 => options.cancel(Arc::clone(&cancelled)),
            _ => options,
        }
    };
    let (ranks, _) = exchanged(&ckpt, options, 2, 1 << 20);
    for (rank, state) in ranks.into_iter().enumerate() {
        let err = state.expect_err("every rank fails");
        assert!(err.contains("rank 1: "), "rank {rank}: {err}");
        assert!(err.to_lowercase().contains("cancel"), "rank {rank}: {err}");
    }
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
        let (both, _) = exchanged(&ckpt, |_| options.clone(), 2, 64 << 10);
        for s in both {
            assert_eq!(bytes_by_name(&s.unwrap()), bytes_by_name(&state));
        }
    }
}
