//! The memory budget and the prefetch window: an owned load that does not fit refuses at
//! planning, naming the bytes; a mapped load larger than the window populates only the
//! window; prefetches through the window give the same bytes as plain reads, and release
//! what was read when asked.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use weightlift::{
    Checkpoint, Error, LoadOptions, Mapping, MemoryBudget, OpenOptions, Placement, Share,
};
use weightlift_testkit::files::{dense, disk_tempdir, moe, split, write_sharded};

fn mapped(dir: &std::path::Path) -> Arc<Checkpoint> {
    // SAFETY: the tests' files are private to them and not modified while mapped.
    let options = OpenOptions::default().mapping(unsafe { Mapping::auto() });
    Arc::new(Checkpoint::open_with(dir, &options).unwrap())
}

#[test]
fn an_owned_load_that_does_not_fit_refuses_before_reading() {
    let dir = disk_tempdir();
    write_sharded(dir.path(), &split(dense(4, 256), 2), true);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let read = Arc::new(AtomicU64::new(0));
    let seen = Arc::clone(&read);
    let options = LoadOptions::default()
        .memory_budget(MemoryBudget::of(64 << 10))
        .progress(move |p| seen.store(p.bytes_done, Ordering::Relaxed));
    let err = ckpt.load(&options).unwrap_err();
    assert!(matches!(err, Error::DoesNotFit { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("64.00 KiB") && msg.contains("set by the caller"),
        "{msg}"
    );
    assert!(msg.contains("WEIGHTLIFT_MEMORY_BUDGET"), "{msg}");
    assert_eq!(read.load(Ordering::Relaxed), 0, "nothing was read");
    // Shared loads hold every tensor on every rank: the same rule.
    let err = ckpt
        .load_share(&options, Share { rank: 0, world: 2 })
        .unwrap_err();
    assert!(matches!(err, Error::DoesNotFit { .. }), "{err}");
    // A part of it fits; meta loads need nothing.
    let part = LoadOptions::default()
        .memory_budget(MemoryBudget::of(512 << 10))
        .prefix("model.layers.0.");
    assert!(!ckpt.load(&part).unwrap().is_empty());
    let meta = LoadOptions::default()
        .memory_budget(MemoryBudget::of(1))
        .device(weightlift::Device::Meta);
    assert_eq!(ckpt.load(&meta).unwrap().len(), ckpt.len());
}

#[test]
fn a_mapped_load_larger_than_the_window_populates_only_the_window() {
    let dir = disk_tempdir();
    write_sharded(dir.path(), &split(moe(4, 16, 64, 32), 3), true);
    let ckpt = mapped(dir.path());
    let whole = Checkpoint::open(dir.path())
        .unwrap()
        .load(&LoadOptions::default())
        .unwrap();
    let window = ckpt.data_bytes() / 3;
    let options = LoadOptions::default()
        .memory_budget(MemoryBudget::of(u64::MAX).with_window(window))
        .request_size(64 << 10);
    let state = ckpt.load(&options).unwrap();
    assert!(
        state.bytes_read() <= window,
        "{} > {window}",
        state.bytes_read()
    );
    assert!(
        state
            .files()
            .iter()
            .all(|f| f.placement == Placement::Mapped)
    );
    assert!(
        state
            .files()
            .iter()
            .any(|f| f.reason.contains("populated up front")),
        "{:?}",
        state.files()
    );
    for t in &whole {
        assert_eq!(
            state.get(t.name()).unwrap().bytes(),
            t.bytes(),
            "{}",
            t.name()
        );
    }
}

#[test]
fn prefetches_through_a_small_window_give_the_files_bytes() {
    let dir = disk_tempdir();
    write_sharded(dir.path(), &split(moe(4, 16, 64, 32), 3), true);
    let plain = Checkpoint::open(dir.path()).unwrap();
    for (ckpt, drop_cache) in [
        (mapped(dir.path()), false),
        (mapped(dir.path()), true),
        // Not mapped: read through the window (the page cache) by local reads.
        (Arc::new(Checkpoint::open(dir.path()).unwrap()), true),
    ] {
        let options = LoadOptions::default()
            .memory_budget(MemoryBudget::of(256 << 10).with_window(128 << 10))
            .drop_cache(drop_cache);
        let prefetch = ckpt.prefetch(options);
        for (_, info) in ckpt.tensors() {
            let got = prefetch.get_slice(&info.name, &[]).unwrap();
            let want = plain.get(&info.name).unwrap();
            assert_eq!(got.bytes(), want.bytes(), "{}", info.name);
        }
        // Slices and missing names behave as plain reads do.
        let name = "model.layers.1.mlp.experts.3.up_proj.weight";
        assert_eq!(
            prefetch.get_slice(name, &[2..5]).unwrap().bytes(),
            plain.get_slice(name, &[2..5]).unwrap().bytes()
        );
        assert!(matches!(
            prefetch.get_slice("nope", &[]),
            Err(Error::NotFound(_))
        ));
        prefetch.cancel();
    }
}
