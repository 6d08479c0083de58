//! Loads into device memory through the staged pipeline, on the fake device (copies land
//! late and out of order): the same bytes as a CPU load, with filters and conversion, within
//! the pinned budget, and errors (a failed copy, a truncated file) surface cleanly.

use std::time::Duration;
use weightlift::{Checkpoint, Device, Dtype, Error, LoadOptions, StagedTarget, StagingOptions};
use weightlift_testkit::fake::FakeEngine;
use weightlift_testkit::files::{
    all_dtypes, dense, disk_tempdir, host_bytes, moe, split, write_file, write_sharded,
};

fn staging() -> StagingOptions {
    StagingOptions::new(3, 64 << 10)
}

#[test]
fn staged_loads_equal_cpu_loads() {
    let dir = disk_tempdir();
    std::fs::create_dir(dir.path().join("dense")).unwrap();
    std::fs::create_dir(dir.path().join("moe")).unwrap();
    write_sharded(&dir.path().join("dense"), &split(dense(2, 128), 2), true);
    write_sharded(
        &dir.path().join("moe"),
        &split(moe(2, 32, 32, 16), 3),
        false,
    );
    write_file(&dir.path().join("all.safetensors"), &all_dtypes());

    for path in ["dense", "moe", "all.safetensors"] {
        let ckpt = Checkpoint::open(dir.path().join(path)).unwrap();
        for options in [
            LoadOptions::default().request_size(16 << 10),
            LoadOptions::default().prefix("model.layers.1."),
            LoadOptions::default().convert_to(Dtype::F32),
        ] {
            let cpu = ckpt.load(&options).unwrap();
            let target =
                StagedTarget::new(FakeEngine::new(Duration::from_micros(300)), staging()).unwrap();
            let gpu = ckpt.load_staged(&target, &options).unwrap();
            assert!(
                gpu.iter()
                    .all(|t| t.device() == Device::Cuda(0) && t.bytes().is_none())
            );
            assert!(gpu.iter().all(|t| t.device_ptr().is_some()));
            assert_eq!(host_bytes(&gpu), host_bytes(&cpu), "{path} {options:?}");

            let engine = target.engine();
            assert_eq!(
                engine.violations(),
                0,
                "buffer reused before its copy completed"
            );
            assert_eq!(
                engine.pinned_bytes(),
                3 * (64 << 10),
                "pinned memory is the pool"
            );
            // Device memory: the selected tensors plus alignment padding (< 64 B each).
            let selected = gpu.byte_len();
            let padding = 64 * gpu.len() as u64;
            assert!(
                engine.device_bytes() >= selected && engine.device_bytes() <= selected + padding,
                "{} device bytes for {selected}",
                engine.device_bytes()
            );
            let stats = gpu.staging().unwrap();
            assert_eq!(stats.copies, engine.copies());
            assert!(stats.bytes >= selected);
        }
    }
}

#[test]
fn slices_go_to_the_device_too() {
    let dir = disk_tempdir();
    let path = dir.path().join("m.safetensors");
    write_file(&path, &dense(2, 128));
    let ckpt = Checkpoint::open(&path).unwrap();
    let slice = ckpt
        .get_slice("model.layers.1.mlp.up_proj.weight", &[3..200, 10..70])
        .unwrap();
    let small = StagingOptions::new(2, 4096);
    let target = StagedTarget::new(FakeEngine::new(Duration::from_micros(100)), small).unwrap();
    let on_device = slice.to_device(&target).unwrap();
    assert_eq!(on_device.device(), Device::Cuda(0));
    assert_eq!(on_device.shape(), slice.shape());
    assert_eq!(on_device.to_host().unwrap().bytes(), slice.bytes());
    assert_eq!(target.engine().violations(), 0);
    assert!(
        target.engine().copies() > 1,
        "the slice went through several buffers"
    );
    assert!(slice.to(Device::Cpu).unwrap().bytes() == slice.bytes());
}

#[test]
fn a_failed_copy_fails_the_load() {
    let dir = disk_tempdir();
    write_sharded(dir.path(), &split(moe(2, 16, 32, 16), 2), true);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let engine = FakeEngine::new(Duration::from_micros(200)).failing_copy(4);
    let target = StagedTarget::new(engine, staging()).unwrap();
    let options = LoadOptions::default().request_size(8 << 10);
    let err = ckpt.load_staged(&target, &options).unwrap_err();
    assert!(matches!(err, Error::Device(_)), "{err}");
    assert!(err.to_string().contains("injected"), "{err}");
}

#[test]
fn a_truncated_file_fails_the_load_and_settles_the_copies() {
    let dir = disk_tempdir();
    let path = dir.path().join("m.safetensors");
    write_file(&path, &dense(3, 128));
    let ckpt = Checkpoint::open(&path).unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let target = StagedTarget::new(FakeEngine::new(Duration::from_millis(2)), staging()).unwrap();
    let err = ckpt
        .load_staged(&target, &LoadOptions::default().request_size(8 << 10))
        .unwrap_err();
    assert!(matches!(err, Error::Read { .. }), "{err}");
    assert_eq!(target.engine().violations(), 0);
}

#[test]
fn cuda_without_a_driver_is_an_error_not_a_panic() {
    let dir = disk_tempdir();
    let path = dir.path().join("m.safetensors");
    write_file(&path, &dense(1, 64));
    let ckpt = Checkpoint::open(&path).unwrap();
    match ckpt.load(&LoadOptions::default().device(Device::Cuda(0))) {
        Err(e) => assert!(e.to_string().contains("cuda:0"), "{e}"),
        // A machine with a GPU: the bytes must be right.
        Ok(state) => assert_eq!(
            host_bytes(&state),
            host_bytes(&ckpt.load(&LoadOptions::default()).unwrap())
        ),
    }
}
