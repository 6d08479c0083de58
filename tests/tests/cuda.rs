//! The staged pipeline on a real GPU, through the CUDA driver (`CudaEngine`): the same bytes
//! as a CPU load for dense, MoE and every-dtype checkpoints, with filters, conversion and
//! slices; pinned memory exactly the pool; a truncated file and an allocation the device
//! cannot hold fail cleanly, and the next load in the same process is right.
//!
//! Built with `--features cuda`. Where no driver or no GPU is present each test says so and
//! passes, unless `WEIGHTLIFT_REQUIRE_CUDA=1` (set by the GPU bundle's `run.sh`), which turns
//! a missing GPU into a failure so that a GPU run cannot pass by skipping.

use std::sync::Mutex;
use weightlift::{Checkpoint, Device, Dtype, Error, LoadOptions, StagedTarget, StagingOptions};
use weightlift::{CopyEngine, CudaEngine};
use weightlift_testkit::files::{
    all_dtypes, dense, disk_tempdir, host_bytes, moe, split, write_file, write_sharded,
};

/// One test at a time on the GPU: one of them takes most of the device's memory.
static GPU: Mutex<()> = Mutex::new(());

/// The engine for `cuda:0`, or `None` (test skipped) where this machine has no GPU.
fn engine(streams: usize) -> Option<CudaEngine> {
    match CudaEngine::new(0, streams) {
        Ok(engine) => Some(engine),
        Err(e) if std::env::var_os("WEIGHTLIFT_REQUIRE_CUDA").is_some_and(|v| v == "1") => {
            panic!("WEIGHTLIFT_REQUIRE_CUDA=1 but {e}")
        }
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

fn checkpoints(dir: &std::path::Path) {
    std::fs::create_dir(dir.join("dense")).unwrap();
    std::fs::create_dir(dir.join("moe")).unwrap();
    write_sharded(&dir.join("dense"), &split(dense(3, 256), 2), true);
    write_sharded(&dir.join("moe"), &split(moe(2, 32, 64, 32), 3), false);
    write_file(&dir.join("all.safetensors"), &all_dtypes());
}

#[test]
fn device_loads_equal_cpu_loads() {
    let _gpu = GPU.lock().unwrap_or_else(|e| e.into_inner());
    if engine(1).is_none() {
        return;
    }
    let dir = disk_tempdir();
    checkpoints(dir.path());
    for path in ["dense", "moe", "all.safetensors"] {
        let ckpt = Checkpoint::open(dir.path().join(path)).unwrap();
        for options in [
            LoadOptions::default(),
            LoadOptions::default().request_size(16 << 10),
            LoadOptions::default().prefix("model.layers.1."),
            LoadOptions::default().convert_to(Dtype::F32),
        ] {
            let cpu = ckpt.load(&options).unwrap();
            let gpu = ckpt.load(&options.clone().device(Device::Cuda(0))).unwrap();
            assert!(gpu.iter().all(|t| t.device() == Device::Cuda(0)));
            assert!(gpu.iter().all(|t| t.device_ptr().is_some()));
            assert_eq!(host_bytes(&gpu), host_bytes(&cpu), "{path} {options:?}");
            let stats = gpu.staging().expect("a device load reports its stages");
            assert!(stats.bytes >= gpu.byte_len() && stats.copies > 0);
        }
    }
}

#[test]
fn small_pool_many_streams_same_bytes_and_pinned_is_the_pool() {
    let _gpu = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(engine) = engine(4) else { return };
    let dir = disk_tempdir();
    checkpoints(dir.path());
    let pool = StagingOptions::new(3, 64 << 10);
    let target = StagedTarget::new(engine, pool).unwrap();
    for path in ["dense", "moe", "all.safetensors"] {
        let ckpt = Checkpoint::open(dir.path().join(path)).unwrap();
        let options = LoadOptions::default().request_size(16 << 10).threads(8);
        let gpu = ckpt.load_staged(&target, &options).unwrap();
        let cpu = ckpt.load(&options).unwrap();
        assert_eq!(host_bytes(&gpu), host_bytes(&cpu), "{path}");
        let engine = target.engine();
        assert_eq!(
            engine.pinned_bytes(),
            3 * (64 << 10),
            "pinned memory is the pool"
        );
        assert_eq!(engine.peak_pinned_bytes(), 3 * (64 << 10), "and never more");
    }
    assert!(target.engine().streams() == 4);
}

#[test]
fn slices_and_host_tensors_go_to_the_device() {
    let _gpu = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(engine) = engine(2) else { return };
    let dir = disk_tempdir();
    let path = dir.path().join("m.safetensors");
    write_file(&path, &dense(2, 256));
    let ckpt = Checkpoint::open(&path).unwrap();
    let slice = ckpt
        .get_slice("model.layers.1.mlp.up_proj.weight", &[3..200, 10..70])
        .unwrap();
    let small = StagingOptions::new(2, 4096);
    let target = StagedTarget::new(engine, small).unwrap();
    let on_device = slice.to_device(&target).unwrap();
    assert_eq!(on_device.device(), Device::Cuda(0));
    assert_eq!(on_device.shape(), slice.shape());
    assert_eq!(on_device.to_host().unwrap().bytes(), slice.bytes());
    let via_to = slice.to(Device::Cuda(0)).unwrap();
    assert_eq!(via_to.to_host().unwrap().bytes(), slice.bytes());
}

#[test]
fn a_truncated_file_fails_and_the_next_load_is_right() {
    let _gpu = GPU.lock().unwrap_or_else(|e| e.into_inner());
    if engine(1).is_none() {
        return;
    }
    let dir = disk_tempdir();
    let good = dir.path().join("good.safetensors");
    let cut = dir.path().join("cut.safetensors");
    write_file(&good, &dense(3, 256));
    std::fs::copy(&good, &cut).unwrap();
    let ckpt = Checkpoint::open(&cut).unwrap();
    let len = std::fs::metadata(&cut).unwrap().len();
    std::fs::File::options()
        .write(true)
        .open(&cut)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let options = LoadOptions::default()
        .request_size(64 << 10)
        .device(Device::Cuda(0));
    let err = ckpt.load(&options).unwrap_err();
    assert!(matches!(err, Error::Read { .. }), "{err}");
    assert!(err.to_string().contains("cut.safetensors"), "{err}");

    let ckpt = Checkpoint::open(&good).unwrap();
    let gpu = ckpt.load(&options).unwrap();
    assert_eq!(
        host_bytes(&gpu),
        host_bytes(&ckpt.load(&LoadOptions::default()).unwrap())
    );
}

#[test]
fn an_allocation_the_device_cannot_hold_fails_and_the_next_load_is_right() {
    let _gpu = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(engine) = engine(1) else { return };
    let dir = disk_tempdir();
    let path = dir.path().join("m.safetensors");
    write_file(&path, &dense(3, 512));
    let ckpt = Checkpoint::open(&path).unwrap();
    let options = LoadOptions::default().device(Device::Cuda(0));

    // Take the device's memory in 1 GiB blocks, then smaller ones, until it has none left
    // for this checkpoint (a few MiB), as another process or a model already there would.
    let mut held = Vec::new();
    for block in [1u64 << 30, 16 << 20, 1 << 20, 64 << 10] {
        while let Ok(m) = engine.alloc(block) {
            held.push(m);
        }
    }
    let (free, total) = engine.memory_info().unwrap();
    eprintln!(
        "holding {} blocks; {free} of {total} bytes free",
        held.len()
    );
    let err = ckpt.load(&options).unwrap_err();
    assert!(matches!(err, Error::Device(_)), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("cuda:0"), "{msg}");
    eprintln!("the load with no device memory left: {msg}");

    drop(held);
    let gpu = ckpt.load(&options).unwrap();
    assert_eq!(
        host_bytes(&gpu),
        host_bytes(&ckpt.load(&LoadOptions::default()).unwrap())
    );
}

/// Placement loads into device memory another library owns (`load_into_cuda` with raw
/// device addresses, as torch tensors' are): the same bytes as placing into host memory,
/// experts stacked, gate and up side by side, converted to F32.
#[test]
fn placements_into_device_memory_equal_host_placements() {
    use weightlift::{DeviceMemory, Fill};
    let _gpu = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(engine) = engine(1) else { return };
    let dir = disk_tempdir();
    write_sharded(dir.path(), &split(moe(2, 32, 64, 32), 3), false);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    // [E, 2I, H] BF16 per layer, and down [E, H, I] as F32.
    let (experts, inter, hidden) = (32usize, 32usize, 64usize);
    let gate_up = experts * 2 * inter * hidden * 2;
    let down = experts * hidden * inter * 4;
    let mut fills = Vec::new();
    for layer in 0..2 {
        for e in 0..experts {
            let p = format!("model.layers.{layer}.mlp.experts.{e}");
            let at = (e * 2 * inter * hidden * 2) as u64;
            fills.push(Fill::new(format!("{p}.gate_proj.weight"), layer * 2, at));
            fills.push(Fill::new(
                format!("{p}.up_proj.weight"),
                layer * 2,
                at + (inter * hidden * 2) as u64,
            ));
            fills.push(
                Fill::new(
                    format!("{p}.down_proj.weight"),
                    layer * 2 + 1,
                    (e * hidden * inter * 4) as u64,
                )
                .dtype(Dtype::F32),
            );
        }
    }
    let lens = [gate_up, down, gate_up, down];
    let mut host: Vec<Vec<u8>> = lens.iter().map(|&n| vec![0u8; n]).collect();
    let options = LoadOptions::default().request_size(64 << 10);
    ckpt.load_into(
        &fills,
        host.iter_mut().map(|m| &mut m[..]).collect(),
        &options,
    )
    .unwrap();
    let memories: Vec<_> = lens
        .iter()
        .map(|&n| engine.alloc(n as u64).unwrap())
        .collect();
    let dests: Vec<(u64, u64)> = memories.iter().map(|m| (m.device_ptr(), m.len())).collect();
    // SAFETY: each range is a live allocation on cuda:0 made above, in the primary context,
    // with nothing queued on it, and untouched until the call returns.
    unsafe { ckpt.load_into_cuda(&fills, 0, &dests, &options) }.unwrap();
    for (i, (m, want)) in memories.iter().zip(&host).enumerate() {
        let mut got = vec![0u8; want.len()];
        m.read_back(0, &mut got).unwrap();
        assert_eq!(&got, want, "destination {i}");
    }
}
