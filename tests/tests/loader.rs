//! The loader end to end: every backend and target returns the reference crate's bytes.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use weightlift::{Backend, Checkpoint, Device, Dtype, Error, LoadOptions, OpenOptions};
use weightlift_testkit::files::{
    Spec, all_dtypes, dense, disk_tempdir, moe, split, write_file, write_sharded,
};

/// Every tensor of every file under `paths`, as the reference crate reads it.
fn reference(paths: &[std::path::PathBuf]) -> BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let mut out = BTreeMap::new();
    for p in paths {
        let bytes = std::fs::read(p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in st.tensors() {
            out.insert(
                name,
                (
                    view.dtype().to_string(),
                    view.shape().to_vec(),
                    view.data().to_vec(),
                ),
            );
        }
    }
    out
}

fn backends() -> Vec<(&'static str, Backend)> {
    vec![
        ("auto", Backend::auto()),
        ("pread", Backend::pread()),
        ("direct", Backend::direct()),
        // SAFETY: test files are private to the test and not modified while open.
        ("mmap", unsafe { Backend::mmap() }),
    ]
}

/// Checks every backend x target against the reference for the checkpoint at `open_path`.
fn check_all(open_path: &Path, files: &[std::path::PathBuf], request_size: u64) {
    let expected = reference(files);
    for (bname, backend) in backends() {
        let ckpt =
            Checkpoint::open_with(open_path, &OpenOptions::default().backend(backend)).unwrap();
        assert_eq!(ckpt.len(), expected.len(), "{bname}");

        // cpu: owned buffers.
        let state = ckpt
            .load(&LoadOptions::default().request_size(request_size))
            .unwrap();
        assert_eq!(state.len(), expected.len());
        for (name, (dtype, shape, data)) in &expected {
            let t = state
                .get(name)
                .unwrap_or_else(|| panic!("{bname}: {name} missing"));
            assert_eq!(&t.dtype().to_string(), dtype);
            assert_eq!(t.shape(), &shape[..]);
            assert!(t.bytes().unwrap() == &data[..], "{bname}: bytes of {name}");
            assert_eq!(
                t.bytes().unwrap().as_ptr() as usize % 64,
                0,
                "{name} aligned"
            );
        }

        // meta: shapes only.
        let meta = ckpt
            .load(&LoadOptions::default().device(Device::Meta))
            .unwrap();
        for (name, (dtype, shape, data)) in &expected {
            let t = meta.get(name).unwrap();
            assert!(t.is_meta() && t.bytes().is_none());
            assert_eq!(
                (t.dtype().to_string(), t.shape()),
                (dtype.clone(), &shape[..])
            );
            assert_eq!(t.byte_len(), data.len());
        }

        // lazy: one tensor at a time.
        for (name, (_, _, data)) in expected.iter().step_by(7) {
            assert!(
                ckpt.get(name).unwrap().bytes().unwrap() == &data[..],
                "{bname}: get {name}"
            );
        }

        // views: zero-copy from maps.
        // SAFETY: as above, the files are not modified while mapped.
        let mapped = unsafe { ckpt.map() }.unwrap();
        let mut seen = 0;
        for v in mapped.views() {
            assert!(
                v.bytes == &expected[v.name].2[..],
                "{bname}: view {}",
                v.name
            );
            seen += 1;
        }
        assert_eq!(seen, expected.len());
    }
}

#[test]
fn single_file_all_dtypes() {
    let dir = disk_tempdir();
    let path = dir.path().join("model.safetensors");
    write_file(&path, &all_dtypes());
    check_all(&path, std::slice::from_ref(&path), 4096);
    check_all(&path, std::slice::from_ref(&path), 16 << 20);
    // Sub-byte tensors (shape [3, 8]) slice where the slice falls on byte boundaries: a
    // row of 8 F4 elements is 4 bytes, of 8 F6 elements 6 bytes; one F4 column is not.
    let ckpt = Checkpoint::open(&path).unwrap();
    let expected = reference(std::slice::from_ref(&path));
    for (name, row) in [("t.f4", 4), ("t.f6_e2m3", 6), ("t.f6_e3m2", 6)] {
        assert!(ckpt.get(name).unwrap().bytes().unwrap() == &expected[name].2[..]);
        let rows = ckpt.get_slice(name, &[1..3]).unwrap();
        assert!(rows.bytes().unwrap() == &expected[name].2[row..3 * row]);
        assert_eq!(rows.shape(), [2, 8]);
        let err = ckpt.get_slice(name, &[0..3, 1..2]).unwrap_err();
        assert!(err.to_string().contains("byte boundaries"), "{err}");
    }
}

#[test]
fn real_files_from_other_writers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/real");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            check_all(&path, std::slice::from_ref(&path), 4096);
            checked += 1;
        }
    }
    // The directory holds 13 files written by candle, fastsafetensors and safetensors:
    // finding none (a moved directory, a bad checkout) must fail, not pass vacuously.
    assert!(checked >= 13, "only {checked} real files found");
}

#[test]
fn sharded_with_index_dir_and_index_file() {
    let dir = disk_tempdir();
    let files = write_sharded(dir.path(), &split(moe(2, 8, 64, 32), 3), true);
    check_all(dir.path(), &files, 64 << 10);
    check_all(
        &dir.path().join("model.safetensors.index.json"),
        &files,
        16 << 20,
    );
}

#[test]
fn sharded_without_index() {
    let dir = disk_tempdir();
    let files = write_sharded(dir.path(), &split(dense(3, 96), 2), false);
    check_all(dir.path(), &files, 8192);
}

#[test]
fn twenty_thousand_tensors() {
    let dir = disk_tempdir();
    // 2 layers x 3300 experts x 3 matrices = ~20k tensors.
    let files = write_sharded(dir.path(), &split(moe(2, 3300, 16, 8), 2), true);
    let expected = reference(&files);
    assert!(expected.len() > 19_800);
    let state = Checkpoint::open(dir.path())
        .unwrap()
        .load(&LoadOptions::default())
        .unwrap();
    assert_eq!(state.len(), expected.len());
    for (name, (_, _, data)) in &expected {
        assert!(state.get(name).unwrap().bytes().unwrap() == &data[..]);
    }
}

#[test]
fn slices_equal_the_corresponding_elements() {
    let dir = disk_tempdir();
    let path = dir.path().join("m.safetensors");
    let specs = vec![
        Spec::new("m", Dtype::F32, &[6, 10]),
        Spec::new("c", Dtype::BF16, &[3, 4, 5]),
        Spec::new("v", Dtype::I64, &[9]),
    ];
    write_file(&path, &specs);
    let ckpt =
        Checkpoint::open_with(&path, &OpenOptions::default().backend(Backend::direct())).unwrap();
    for spec in &specs {
        let elem = spec.dtype.bits() / 8;
        let shape = &spec.shape;
        // Every sub-range along every single dimension, plus a 2-D window.
        let mut cases: Vec<Vec<std::ops::Range<usize>>> = Vec::new();
        for d in 0..shape.len() {
            for a in 0..=shape[d] {
                for b in a..=shape[d] {
                    let mut r: Vec<_> = shape.iter().map(|&n| 0..n).collect();
                    r[d] = a..b;
                    cases.push(r);
                }
            }
        }
        if shape.len() >= 2 {
            // Fewer ranges than dimensions: the rest are taken whole.
            cases.push(vec![1..3, 2..4]);
        }
        for given in cases {
            let t = ckpt.get_slice(&spec.name, &given).unwrap();
            let ranges: Vec<_> = (0..shape.len())
                .map(|d| given.get(d).cloned().unwrap_or(0..shape[d]))
                .collect();
            let new_shape: Vec<usize> = ranges.iter().map(|r| r.end - r.start).collect();
            assert_eq!(t.shape(), &new_shape[..]);
            // Expected bytes: walk every element of the slice in C order.
            let mut expected = Vec::new();
            let count: usize = new_shape.iter().product();
            for flat in 0..count {
                let mut rem = flat;
                let mut src = 0;
                let mut stride = 1;
                for d in (0..shape.len()).rev() {
                    let i = rem % new_shape[d] + ranges[d].start;
                    rem /= new_shape[d];
                    src += i * stride;
                    stride *= shape[d];
                }
                expected.extend_from_slice(&spec.data[src * elem..(src + 1) * elem]);
            }
            assert_eq!(
                t.bytes().unwrap(),
                &expected[..],
                "{} {:?}",
                spec.name,
                given
            );
        }
    }
    let err = ckpt.get_slice("m", &[0..7]).unwrap_err();
    assert!(matches!(err, Error::InvalidSlice { .. }), "{err}");
    assert!(err.to_string().contains("\"m\""));
    assert!(matches!(
        ckpt.get_slice("nope", &[]),
        Err(Error::NotFound(_))
    ));
}

#[test]
fn filters_read_only_what_they_select() {
    let dir = disk_tempdir();
    let files = write_sharded(dir.path(), &split(moe(3, 4, 32, 16), 2), true);
    let expected = reference(&files);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let total = Arc::new(Mutex::new(0u64));
    let t2 = total.clone();
    let state = ckpt
        .load(
            &LoadOptions::default()
                .prefix("model.layers.1.mlp.experts.")
                .progress(move |p| *t2.lock().unwrap() = p.bytes_total),
        )
        .unwrap();
    let selected: Vec<_> = expected
        .keys()
        .filter(|n| n.starts_with("model.layers.1.mlp.experts."))
        .collect();
    assert_eq!(state.len(), selected.len());
    let selected_bytes: usize = selected.iter().map(|n| expected[*n].2.len()).sum();
    assert_eq!(
        *total.lock().unwrap(),
        selected_bytes as u64,
        "only selected bytes are planned"
    );
    for name in selected {
        assert!(state.get(name).unwrap().bytes().unwrap() == &expected[name].2[..]);
    }
    let only_even = ckpt
        .load(&LoadOptions::default().filter(|n| n.ends_with("up_proj.weight")))
        .unwrap();
    assert!(
        only_even
            .iter()
            .all(|t| t.name().ends_with("up_proj.weight"))
    );
    assert_eq!(only_even.len(), 12);
}

#[test]
fn unselected_bytes_stay_out_of_the_page_cache() {
    let dir = disk_tempdir();
    let path = dir.path().join("m.safetensors");
    // 16 MiB tensors. Kernel readahead may read past a selected tensor (up to 16 MiB here:
    // read_ahead_kb 8192, doubled by FADV_SEQUENTIAL), never before one: the checked
    // regions are t0 (before everything read) and the middle of t3 (24 MiB past t1's end).
    let specs: Vec<Spec> = (0..7)
        .map(|i| Spec::new(&format!("t{i}"), Dtype::U8, &[16 << 20]))
        .collect();
    write_file(&path, &specs);
    assert!(
        weightlift_workload::yardstick::evict(&path)
            .unwrap()
            .fraction()
            < 0.05
    );
    let ckpt =
        Checkpoint::open_with(&path, &OpenOptions::default().backend(Backend::pread())).unwrap();
    let state = ckpt
        .load(&LoadOptions::default().filter(|n| n == "t1" || n == "t5"))
        .unwrap();
    assert_eq!(state.len(), 2);
    // The middle 4 MiB of each tensor: resident only if that tensor was read.
    let resident = |name: &str| -> f64 {
        let (shard, info) = ckpt.info(name).unwrap();
        let start = shard.header().data_start() + info.data_offsets.0 + (6 << 20);
        weightlift_storage::residency_in(&path, start..start + (4 << 20))
            .unwrap()
            .fraction()
    };
    assert!(resident("t1") > 0.9);
    assert!(resident("t5") > 0.9);
    for unselected in ["t0", "t3"] {
        assert!(resident(unselected) < 0.05, "{unselected} was read");
    }
}

#[test]
fn conversion_on_load() {
    let dir = disk_tempdir();
    let path = dir.path().join("m.safetensors");
    let bf: Vec<half::bf16> = (0..5000)
        .map(|i| half::bf16::from_f32(i as f32 * 0.25 - 100.0))
        .collect();
    let f16s: Vec<half::f16> = (0..3000)
        .map(|i| half::f16::from_f32(i as f32 * 0.5))
        .collect();
    let f32s: Vec<f32> = (0..4000).map(|i| i as f32 * 0.125).collect();
    let specs = vec![
        Spec {
            name: "bf".into(),
            dtype: Dtype::BF16,
            shape: vec![5000],
            data: bf.iter().flat_map(|x| x.to_le_bytes()).collect(),
        },
        Spec {
            name: "h".into(),
            dtype: Dtype::F16,
            shape: vec![3000],
            data: f16s.iter().flat_map(|x| x.to_le_bytes()).collect(),
        },
        Spec {
            name: "f".into(),
            dtype: Dtype::F32,
            shape: vec![4000],
            data: f32s.iter().flat_map(|x| x.to_le_bytes()).collect(),
        },
        Spec::new("i", Dtype::I32, &[77]),
    ];
    write_file(&path, &specs);
    let ckpt = Checkpoint::open(&path).unwrap();
    // Small requests: converted tensors get split across requests.
    let up = ckpt
        .load(
            &LoadOptions::default()
                .convert_to(Dtype::F32)
                .request_size(4096),
        )
        .unwrap();
    let got: &[f32] = up.get("bf").unwrap().as_slice().unwrap();
    assert_eq!(got.len(), 5000);
    assert!(got.iter().zip(&bf).all(|(a, b)| *a == b.to_f32()));
    let got: &[f32] = up.get("h").unwrap().as_slice().unwrap();
    assert!(got.iter().zip(&f16s).all(|(a, b)| *a == b.to_f32()));
    assert_eq!(up.get("f").unwrap().as_slice::<f32>().unwrap(), &f32s[..]);
    assert_eq!(up.get("i").unwrap().dtype(), Dtype::I32);
    assert_eq!(up.get("i").unwrap().bytes().unwrap(), &specs[3].data[..]);
    let down = ckpt
        .load(&LoadOptions::default().convert_to(Dtype::BF16))
        .unwrap();
    let got: &[half::bf16] = down.get("f").unwrap().as_slice().unwrap();
    assert!(
        got.iter()
            .zip(&f32s)
            .all(|(a, b)| *a == half::bf16::from_f32(*b))
    );
    assert_eq!(down.get("f").unwrap().byte_len(), 8000);
    let meta = ckpt
        .load(
            &LoadOptions::default()
                .convert_to(Dtype::F32)
                .device(Device::Meta),
        )
        .unwrap();
    assert_eq!(meta.get("h").unwrap().byte_len(), 12000);
    assert!(matches!(
        ckpt.load(&LoadOptions::default().convert_to(Dtype::I8)),
        Err(Error::InvalidOption(_))
    ));
    // Typed views check the dtype.
    assert!(matches!(
        up.get("i").unwrap().as_slice::<f32>(),
        Err(Error::TypedView { .. })
    ));
    assert_eq!(up.get("i").unwrap().as_slice::<i32>().unwrap().len(), 77);
}

#[test]
fn progress_reports_every_byte_once() {
    let dir = disk_tempdir();
    write_sharded(dir.path(), &split(dense(2, 128), 2), true);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let e2 = events.clone();
    ckpt.load(
        &LoadOptions::default()
            .request_size(8192)
            .progress(move |p| e2.lock().unwrap().push(*p)),
    )
    .unwrap();
    let events = events.lock().unwrap();
    assert!(events.len() > 10);
    let last_total = events.iter().map(|p| p.bytes_done).max().unwrap();
    assert_eq!(last_total, ckpt.data_bytes());
    for file in 0..2 {
        let max = events
            .iter()
            .filter(|p| p.file == file)
            .map(|p| p.file_bytes_done)
            .max()
            .unwrap();
        assert_eq!(max, ckpt.shards()[file].header().data_len());
    }
}
