//! Mapped CPU loads: tensors left in private mappings of the files, populated in parallel.
//! The same bytes as owned loads; the placement and its reason per file; a file cut under
//! the mapping is an error naming the file and the tensor, not a crash; dropping the page
//! cache after owned loads.

use std::path::Path;
use weightlift::{
    Backend, Checkpoint, Dtype, Error, LoadOptions, Mapping, OpenOptions, Placement, StateDict,
};
use weightlift_testkit::files::{
    all_dtypes, dense, disk_tempdir, moe, split, write_file, write_sharded,
};

fn bytes_by_name(state: &StateDict) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<_> = state
        .iter()
        .map(|t| (t.name().to_string(), t.bytes().unwrap().to_vec()))
        .collect();
    out.sort();
    out
}

fn always() -> Mapping {
    // SAFETY: the tests' files are private to them and not modified while mapped (where a
    // test cuts one, it does so on purpose and only checks the error).
    unsafe { Mapping::always() }
}

fn auto() -> Mapping {
    // SAFETY: as in `always`.
    unsafe { Mapping::auto() }
}

/// `path` opened with `mapping` (and `backend`).
fn open(path: &Path, backend: Backend, mapping: Mapping) -> Checkpoint {
    let options = OpenOptions::default().backend(backend).mapping(mapping);
    Checkpoint::open_with(path, &options).unwrap()
}

#[test]
fn mapped_loads_equal_owned_loads() {
    let dir = disk_tempdir();
    for name in ["dense", "moe"] {
        std::fs::create_dir(dir.path().join(name)).unwrap();
    }
    write_sharded(&dir.path().join("dense"), &split(dense(3, 128), 2), true);
    write_sharded(
        &dir.path().join("moe"),
        &split(moe(2, 16, 32, 16), 3),
        false,
    );
    write_file(&dir.path().join("all.safetensors"), &all_dtypes());
    for path in ["dense", "moe", "all.safetensors"] {
        let path = dir.path().join(path);
        let never = Checkpoint::open(&path).unwrap();
        let (always, auto) = (
            open(&path, Backend::auto(), always()),
            open(&path, Backend::auto(), auto()),
        );
        let plain = LoadOptions::default();
        for (ckpt, options, filtered) in [
            (&always, plain.clone(), false),
            (&auto, plain.clone(), false),
            (&always, plain.clone().request_size(4096).threads(3), false),
            (&always, plain.clone().prefix("model.layers.1."), true),
        ] {
            let owned = never.load(&options).unwrap();
            let state = ckpt.load(&options).unwrap();
            let path = path.display();
            assert_eq!(bytes_by_name(&state), bytes_by_name(&owned), "{path}");
            if !filtered {
                assert_eq!(state.len(), ckpt.len());
            }
            for t in &state {
                let (memory, _) = t.host_allocation().unwrap();
                assert!(memory.is_mapped(), "{}", t.name());
            }
            for f in state.files() {
                assert_eq!(f.placement, Placement::Mapped);
                assert!(f.reason.starts_with("mapped"), "{}", f.reason);
            }
            assert_eq!(state.bytes_read(), owned.bytes_read());
            assert!(
                owned
                    .files()
                    .iter()
                    .all(|f| f.placement == Placement::Owned)
            );
        }
    }
}

#[test]
fn auto_copies_what_it_converts_and_always_refuses_to() {
    let dir = disk_tempdir();
    let path = dir.path().join("m.safetensors");
    write_file(&path, &dense(2, 64));
    let ckpt = open(&path, Backend::auto(), auto());
    let f32s = LoadOptions::default().convert_to(Dtype::F32);
    let state = ckpt.load(&f32s).unwrap();
    assert!(state.iter().all(|t| t.dtype() != Dtype::BF16));
    let f = &state.files()[0];
    assert_eq!(f.placement, Placement::Owned);
    assert!(f.reason.contains("conversion"), "{}", f.reason);
    let err = open(&path, Backend::auto(), always())
        .load(&f32s)
        .unwrap_err();
    assert!(matches!(err, Error::InvalidOption(_)), "{err}");
    // In memory (tmpfs): mapped too.
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let in_memory = shm.path().join("m.safetensors");
    std::fs::copy(&path, &in_memory).unwrap();
    let state = open(&in_memory, Backend::auto(), auto())
        .load(&LoadOptions::default())
        .unwrap();
    assert!(
        state.files()[0].reason.contains("tmpfs"),
        "{:?}",
        state.files()
    );
}

#[test]
fn a_file_cut_under_the_mapping_is_an_error_naming_file_and_tensor() {
    let dir = disk_tempdir();
    let path = dir.path().join("m.safetensors");
    write_file(&path, &dense(2, 256));
    // The truncation below is the point of the test: nothing touches the bytes past the cut;
    // the populate reports them instead.
    let ckpt = open(&path, Backend::pread(), always());
    let last = ckpt.tensors().last().unwrap().1.name.clone();
    let first = ckpt.tensors().next().unwrap().1.name.clone();
    // Map the file (one tensor keeps the mapping alive), then cut it.
    let kept = ckpt.get(&first).unwrap();
    assert!(kept.host_allocation().unwrap().0.is_mapped());
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 3000)
        .unwrap();
    let err = ckpt.load(&LoadOptions::default()).unwrap_err();
    match &err {
        Error::Read {
            location, tensor, ..
        } => {
            assert_eq!(location, &path.clone().into());
            assert_eq!(tensor, &last, "names the tensor cut short");
        }
        other => panic!("unexpected error {other}"),
    }
    assert!(err.to_string().contains("truncated"), "{err}");
    assert_eq!(kept.bytes().unwrap().len(), kept.byte_len());
    drop(kept);
    // Mapped afresh, the cut file fails before any page is touched (one check, shared by
    // loads and reads).
    let err = ckpt.load(&LoadOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    let err = ckpt.get(&first).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
}

#[test]
fn lazy_reads_of_mapped_files_are_views_and_copies_of_the_one_mapping() {
    let dir = disk_tempdir();
    let path = dir.path().join("m.safetensors");
    write_file(&path, &all_dtypes());
    let owned = Checkpoint::open(&path).unwrap();
    let ckpt = open(&path, Backend::auto(), auto());
    let load = ckpt.load(&LoadOptions::default()).unwrap();
    let shared = load.iter().next().unwrap().host_allocation().unwrap().0;
    for name in ["big", "t.bf16", "scalar", "empty", "t.f4"] {
        let view = ckpt.get(name).unwrap();
        let copy = owned.get(name).unwrap();
        assert_eq!(view.bytes(), copy.bytes(), "{name}");
        assert!(view.host_allocation().unwrap().0.is_mapped());
        assert!(!copy.host_allocation().unwrap().0.is_mapped());
        // One mapping per shard: the load's and the reads' are the same.
        assert!(std::sync::Arc::ptr_eq(
            view.host_allocation().unwrap().0,
            shared
        ));
    }
    // Rows: contiguous, a view. Columns: copied.
    let rows = ckpt.get_slice("big", &[10..20]).unwrap();
    assert!(rows.host_allocation().unwrap().0.is_mapped());
    assert_eq!(
        rows.bytes(),
        owned.get_slice("big", &[10..20]).unwrap().bytes()
    );
    let cols = ckpt.get_slice("big", &[0..300, 5..9]).unwrap();
    assert!(!cols.host_allocation().unwrap().0.is_mapped());
    assert_eq!(cols.shape(), [300, 4]);
    assert_eq!(
        cols.bytes(),
        owned.get_slice("big", &[0..300, 5..9]).unwrap().bytes()
    );
    assert!(ckpt.get("nope").is_err());
    // Zero-copy views of `map()` are the same mapping's bytes.
    // SAFETY: the file is not modified while mapped.
    let mapped = unsafe { ckpt.map() }.unwrap();
    let view = mapped.view("big").unwrap();
    let t = ckpt.get("big").unwrap();
    assert_eq!(view.bytes.as_ptr(), t.bytes().unwrap().as_ptr());
}

#[test]
fn the_one_policy_decides_loads_and_lazy_reads_alike() {
    let dir = disk_tempdir();
    let path = dir.path().join("m.safetensors");
    write_file(&path, &dense(2, 64));
    let name = "model.layers.1.mlp.up_proj.weight";
    // Local disk under `auto`: mapped, for loads and reads.
    let local = open(&path, Backend::auto(), auto());
    assert!(
        local
            .get(name)
            .unwrap()
            .host_allocation()
            .unwrap()
            .0
            .is_mapped()
    );
    let state = local.load(&LoadOptions::default()).unwrap();
    assert_eq!(state.files()[0].placement, Placement::Mapped);
    // `never` (the default): owned, for both.
    let never = Checkpoint::open(&path).unwrap();
    assert!(
        !never
            .get(name)
            .unwrap()
            .host_allocation()
            .unwrap()
            .0
            .is_mapped()
    );
    let state = never.load(&LoadOptions::default()).unwrap();
    assert_eq!(state.files()[0].placement, Placement::Owned);
    // A FUSE mount (a stand-in for a network filesystem) under `auto`: owned, for both.
    if let Some(mount) = weightlift_testkit::fuse::Mount::new(dir.path()) {
        let over_fuse = mount.path().join("m.safetensors");
        let ckpt = open(&over_fuse, Backend::auto(), auto());
        let t = ckpt.get(name).unwrap();
        assert!(!t.host_allocation().unwrap().0.is_mapped());
        assert_eq!(t.bytes(), never.get(name).unwrap().bytes());
        let state = ckpt.load(&LoadOptions::default()).unwrap();
        let f = &state.files()[0];
        assert_eq!(f.placement, Placement::Owned);
        assert!(f.reason.contains("fuse"), "{}", f.reason);
    } else {
        eprintln!("skipped the FUSE half: bindfs is not installed or cannot mount here");
    }
}

fn resident(path: &Path) -> f64 {
    weightlift_storage::residency(path).unwrap().fraction()
}

#[test]
fn owned_loads_can_drop_what_they_read_from_the_page_cache() {
    let dir = disk_tempdir();
    let files = write_sharded(dir.path(), &split(dense(4, 256), 2), true);
    // Freshly written pages are dirty, and dirty pages are not dropped: write them back.
    for f in &files {
        std::fs::File::open(f).unwrap().sync_all().unwrap();
    }
    let ckpt = Checkpoint::open_with(
        dir.path(),
        &OpenOptions::default().backend(Backend::pread()),
    )
    .unwrap();
    let kept = ckpt.load(&LoadOptions::default()).unwrap();
    assert!(files.iter().all(|f| resident(f) > 0.9));
    let state = ckpt.load(&LoadOptions::default().drop_cache(true)).unwrap();
    assert_eq!(bytes_by_name(&state), bytes_by_name(&kept));
    for f in &files {
        // The data is gone from the cache; at most the header's page stays.
        assert!(resident(f) < 0.05, "{}: {}", f.display(), resident(f));
    }
}

#[test]
fn a_cancelled_load_stops_with_an_error_and_slices_of_loaded_tensors() {
    let dir = disk_tempdir();
    let path = dir.path().join("m.safetensors");
    write_file(&path, &dense(2, 128));
    let ckpt = Checkpoint::open(&path).unwrap();
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    for ckpt in [&ckpt, &open(&path, Backend::auto(), always())] {
        let err = ckpt
            .load(&LoadOptions::default().cancel(flag.clone()))
            .unwrap_err();
        assert!(matches!(err, Error::Cancelled), "{err}");
    }
    // Slices of a loaded tensor: rows share its memory, columns are copies; both equal
    // what a lazy read of the slice gives.
    let state = ckpt.load(&LoadOptions::default()).unwrap();
    let t = state.get("model.layers.1.mlp.up_proj.weight").unwrap();
    for ranges in [vec![3..9], vec![0..256, 7..20], vec![]] {
        let s = t.slice(&ranges).unwrap();
        let lazy = ckpt.get_slice(t.name(), &ranges).unwrap();
        assert_eq!(
            (s.shape(), s.bytes()),
            (lazy.shape(), lazy.bytes()),
            "{ranges:?}"
        );
    }
    let rows = t.slice(&[3..9]).unwrap();
    assert!(std::sync::Arc::ptr_eq(
        rows.host_allocation().unwrap().0,
        t.host_allocation().unwrap().0
    ));
    assert!(t.slice(&[0..999]).is_err());
}
