//! The staged (GPU) pipeline on the fake device: copies land late and out of order; buffers
//! must be reused only after their copy completed (the fake counts violations), every byte
//! must arrive, pinned memory must stay within the pool, and failures must surface.

use std::ops::Range;
use std::sync::Mutex;
use std::time::Duration;
use weightlift_device::{DeviceError, DeviceMemory, Region, StagedTarget, StagingOptions, Target};
use weightlift_testkit::fake::FakeEngine;

fn pattern(range: &Range<u64>) -> Vec<u8> {
    range.clone().map(|i| (i * 131 % 251) as u8).collect()
}

/// Regions of uneven lengths up to `max`, with gaps between some of them.
fn ranges(total: u64, max: u64) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    let mut at = 0;
    let mut n = 0u64;
    while at < total {
        let len = (1 + (n * 7919) % max).min(total - at);
        out.push(at..at + len);
        at += len + (n % 3) * 5;
        n += 1;
    }
    out
}

/// Fills `regions` from `threads` threads, each region with its pattern.
fn fill_all<R: Region + Send>(
    regions: Vec<R>,
    ranges: &[Range<u64>],
    threads: usize,
) -> Vec<Result<(), DeviceError>> {
    let work = Mutex::new(
        regions
            .into_iter()
            .zip(ranges.iter().cloned())
            .collect::<Vec<_>>(),
    );
    let results = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let next = work.lock().unwrap().pop();
                    let Some((region, range)) = next else {
                        break;
                    };
                    let r = region.fill(|buf: &mut [u8]| {
                        buf.copy_from_slice(&pattern(&range));
                        Ok::<(), DeviceError>(())
                    });
                    results.lock().unwrap().push(r);
                }
            });
        }
    });
    results.into_inner().unwrap()
}

#[test]
fn every_byte_arrives_and_pinned_memory_stays_in_the_pool() {
    let options = StagingOptions::new(3, 8192);
    let target = StagedTarget::new(FakeEngine::new(Duration::from_micros(800)), options).unwrap();
    let pinned_after_setup = target.engine().pinned_bytes();
    assert_eq!(pinned_after_setup, 3 * 8192);

    for total in [0u64, 1, 100_000, 300_001] {
        let mut alloc = target.allocate(total).unwrap();
        let ranges = ranges(total, 8192);
        let regions = target.regions(&mut alloc, &ranges).unwrap();
        for r in fill_all(regions, &ranges, 6) {
            r.unwrap();
        }
        let memory = target.finish(alloc).unwrap();
        for range in &ranges {
            let mut back = vec![0u8; (range.end - range.start) as usize];
            memory.read_back(range.start, &mut back).unwrap();
            assert_eq!(back, pattern(range), "{range:?}");
        }
    }
    // No buffer was allocated after setup, however many regions went through.
    assert_eq!(target.engine().pinned_bytes(), pinned_after_setup);
    let stats = target.stats();
    assert!(stats.copies > 40, "{stats:?}");
    assert_eq!(stats.copies, target.engine().copies());
    assert_eq!(
        target.engine().violations(),
        0,
        "buffers reused before their copy completed"
    );
}

#[test]
fn a_failed_fill_returns_its_buffer_and_copies_nothing() {
    let options = StagingOptions::new(1, 4096);
    let target = StagedTarget::new(FakeEngine::new(Duration::from_micros(200)), options).unwrap();
    let mut alloc = target.allocate(3 * 4096).unwrap();
    let ranges = [0..4096, 4096..8192, 8192..12288];
    let mut regions: Vec<Option<_>> = target
        .regions(&mut alloc, &ranges)
        .unwrap()
        .into_iter()
        .map(Some)
        .collect();
    let err = regions[1]
        .take()
        .unwrap()
        .fill(|_| Err::<(), _>(DeviceError::InvalidRegions("reader failed".into())))
        .unwrap_err();
    assert!(err.to_string().contains("reader failed"));
    // With one buffer, the next fills only work if the failed one gave it back.
    for i in [0, 2] {
        let range = &ranges[i];
        regions[i]
            .take()
            .unwrap()
            .fill(|buf| {
                buf.copy_from_slice(&pattern(range));
                Ok::<(), DeviceError>(())
            })
            .unwrap();
    }
    drop(regions);
    target.finish(alloc).unwrap();
    assert_eq!(target.engine().copies(), 2);
    assert_eq!(target.engine().violations(), 0);
}

#[test]
fn a_failed_copy_surfaces_as_an_error() {
    let engine = FakeEngine::new(Duration::from_micros(300)).failing_copy(5);
    let options = StagingOptions::new(2, 4096);
    let target = StagedTarget::new(engine, options).unwrap();
    let mut alloc = target.allocate(200_000).unwrap();
    let ranges = ranges(200_000, 4096);
    let regions = target.regions(&mut alloc, &ranges).unwrap();
    let results = fill_all(regions, &ranges, 4);
    // The failure is seen by whoever waits for that copy: a later fill, or finish.
    let failed_fill = results.iter().any(|r| r.is_err());
    let finished = target.finish(alloc);
    assert!(failed_fill || finished.is_err());
    let msg = results
        .into_iter()
        .find_map(Result::err)
        .or(finished.err())
        .unwrap()
        .to_string();
    assert!(msg.contains("injected"), "{msg}");
}

#[test]
fn regions_longer_than_a_buffer_and_failed_allocations_are_errors() {
    let engine = FakeEngine::default().failing_alloc(1);
    let options = StagingOptions::new(2, 4096);
    let target = StagedTarget::new(engine, options).unwrap();
    assert_eq!(target.max_region(), Some(4096));
    let mut alloc = target.allocate(10_000).unwrap();
    assert!(matches!(
        target.regions(&mut alloc, &[0..5000]),
        Err(DeviceError::InvalidRegions(_))
    ));
    assert!(matches!(
        target.allocate(10),
        Err(DeviceError::Alloc { .. })
    ));
}

fn small_pool(delay: Duration) -> StagedTarget<FakeEngine> {
    let options = StagingOptions::new(3, 4096);
    StagedTarget::new(FakeEngine::new(delay), options).unwrap()
}

/// Device memory dropped while copies into it are in flight (a load that gave up, or a
/// caller that never calls `finish`) must wait for them: the fake counts memory freed
/// under a running copy.
#[test]
fn dropping_an_allocation_waits_for_its_copies() {
    let target = small_pool(Duration::from_millis(20));
    let mut alloc = target.allocate(3 * 4096).unwrap();
    let ranges = [0..4096, 4096..8192, 8192..12288];
    for r in fill_all(target.regions(&mut alloc, &ranges).unwrap(), &ranges, 1) {
        r.unwrap();
    }
    drop(alloc);
    assert_eq!(target.engine().violations(), 0, "memory freed under a copy");
    assert_eq!(target.engine().copies(), 3);
}

/// Regions handed out again over the same allocation first wait for the copies of the
/// earlier ones: two copies never write the same bytes at once.
#[test]
fn regions_handed_out_again_wait_for_earlier_copies() {
    let target = small_pool(Duration::from_millis(20));
    let mut alloc = target.allocate(4096).unwrap();
    let first = target.regions(&mut alloc, &[0..4096]).unwrap();
    first
        .into_iter()
        .next()
        .unwrap()
        .fill(|buf| {
            buf.fill(1);
            Ok::<(), DeviceError>(())
        })
        .unwrap();
    let second = target.regions(&mut alloc, &[0..4096]).unwrap();
    second
        .into_iter()
        .next()
        .unwrap()
        .fill(|buf| {
            buf.fill(2);
            Ok::<(), DeviceError>(())
        })
        .unwrap();
    let memory = target.finish(alloc).unwrap();
    let mut back = vec![0u8; 4096];
    memory.read_back(0, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 2), "the later fill wins");
    assert_eq!(
        target.engine().violations(),
        0,
        "overlapping copies in flight"
    );
}

#[test]
fn an_allocation_of_another_target_is_refused() {
    let a = small_pool(Duration::ZERO);
    let b = small_pool(Duration::ZERO);
    let mut alloc = b.allocate(4096).unwrap();
    assert!(matches!(
        a.regions(&mut alloc, &[0..4096]),
        Err(DeviceError::InvalidRegions(_))
    ));
    assert!(a.finish(b.allocate(16).unwrap()).is_err());
}
