//! The public API as a user writes it: every item a user is meant to use appears here,
//! with its type spelled out where that pins a signature, so an accidental change to the
//! API fails to compile (as rustls' `tests/api.rs` does). It also runs, on a real file.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use weightlift::{
    Announcement, AutoPolicy, Backend, BackendKind, ByteSource, Checkpoint, DEFAULT_MAX_GAP,
    DEFAULT_REQUEST_SIZE, Device, Dtype, Element, Entry, Error, Fill, FillReport, Filter, Header,
    HostMemory, LoadOptions, LocalStore, Location, MappedCheckpoint, Mapping, MemoryBudget,
    OpenOptions, Placement, Prefetch, Progress, RemoteStats, Result, Shard, ShardIndex, Share,
    SharedLoad, StagedTarget, StagingOptions, StagingStats, StateDict, Store, StoreOptions, Tensor,
    TensorInfo, TensorView, open_store,
};
use weightlift_format::{TensorRef, write_file};

fn write(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("model.safetensors");
    let w: Vec<u8> = (0..24u8).collect();
    let b: Vec<u8> = half::bf16::from_f32(1.5).to_le_bytes().repeat(4).to_vec();
    let tensors = [
        TensorRef {
            name: "layer.w",
            dtype: Dtype::F32,
            shape: &[2, 3],
            data: &w,
        },
        TensorRef {
            name: "layer.b",
            dtype: Dtype::BF16,
            shape: &[4],
            data: &b,
        },
    ];
    write_file(&path, &tensors, None).unwrap();
    path
}

fn open_and_inspect(path: &Path) -> Result<Checkpoint> {
    let policy = AutoPolicy::default()
        .direct_min_bytes(None)
        .cached_fraction(0.5);
    let options: OpenOptions = OpenOptions::default()
        .backend(Backend::auto_with(policy))
        .mapping(Mapping::never());
    let ckpt = Checkpoint::open_with(path, &options)?;
    assert_eq!(ckpt.mapping(), Mapping::never());
    let _: &Location = ckpt.location();
    let _: &Arc<dyn Store> = ckpt.store();
    let _: Option<(&Location, &ShardIndex)> = ckpt.index();
    let _: Option<RemoteStats> = ckpt.remote_stats();
    let _: usize = ckpt.default_threads();
    assert_eq!(
        (ckpt.len(), ckpt.is_empty(), ckpt.data_bytes()),
        (2, false, 32)
    );
    assert_eq!(ckpt.names(), ["layer.b", "layer.w"]);
    let shard: &Shard = &ckpt.shards()[0];
    let _: (&Location, Option<&Path>, &str, &Header) =
        (shard.location(), shard.path(), shard.name(), shard.header());
    let _: (BackendKind, &str) = (shard.backend(), shard.backend_reason());
    let _: &Arc<dyn ByteSource> = shard.source();
    let (_, info): (&Shard, &TensorInfo) = ckpt.info("layer.w").unwrap();
    assert_eq!(info.shape, [2, 3]);
    assert_eq!(ckpt.tensors().count(), 2);
    Ok(ckpt)
}

#[test]
fn the_public_api_as_users_write_it() -> Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path());
    let ckpt = open_and_inspect(&path)?;

    // Loads: options, filters, progress, conversion, devices.
    let seen = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&seen);
    let options: LoadOptions = LoadOptions::default()
        .device(Device::Cpu)
        .threads(2)
        .request_size(DEFAULT_REQUEST_SIZE)
        .prefix("layer.")
        .huge_pages(false)
        .staging(StagingOptions::default())
        .progress(move |p: &Progress| {
            let _: (usize, u64, u64, u64) =
                (p.file, p.file_bytes_done, p.file_bytes_total, p.bytes_total);
            counter.store(p.bytes_done, Ordering::Relaxed);
        })
        .streams(2)
        .max_gap(DEFAULT_MAX_GAP)
        .drop_cache(false);
    assert!(matches!(options.selection(), Filter::Prefix(_)));
    let state: StateDict = ckpt.load(&options)?;
    assert_eq!(seen.load(Ordering::Relaxed), 32);
    assert_eq!(
        (state.len(), state.is_empty(), state.byte_len()),
        (2, false, 32)
    );
    let w: &Tensor = state.get("layer.w").unwrap();
    let _: (&str, Dtype, &[usize], usize, usize) = (
        w.name(),
        w.dtype(),
        w.shape(),
        w.num_elements(),
        w.byte_len(),
    );
    assert_eq!(w.device(), Device::Cpu);
    assert!(!w.is_meta() && w.device_ptr().is_none());
    assert_eq!(w.bytes().unwrap()[5], 5);
    let (memory, offset): (&Arc<HostMemory>, usize) = w.host_allocation().unwrap();
    assert_eq!(&memory.as_slice()[offset..offset + 24], w.bytes().unwrap());
    let floats: &[f32] = w.as_slice::<f32>()?;
    assert_eq!(floats.len(), 6);
    assert!(w.as_slice::<half::bf16>().is_err(), "wrong element type");
    let view: TensorView<'_> = w.view().unwrap();
    assert_eq!(view.as_slice::<f32>()?, floats);
    assert_eq!(<f32 as Element>::DTYPE, Dtype::F32);
    assert_eq!(state.iter_sorted().next().unwrap().name(), "layer.b");
    assert_eq!(state.iter().count(), 2);
    assert!(state.staging().is_none());
    let _: Vec<Tensor> = state.clone().into_tensors();
    let _: Tensor = w.to(Device::Cpu)?.to_host()?;

    let f32s = ckpt.load(
        &LoadOptions::default()
            .convert_to(Dtype::F32)
            .filter(|n| n == "layer.b"),
    )?;
    assert_eq!(f32s.get("layer.b").unwrap().as_slice::<f32>()?, [1.5; 4]);
    let meta = ckpt.load(&LoadOptions::default().device(Device::Meta))?;
    assert!(meta.iter().all(Tensor::is_meta));
    match ckpt.load(&LoadOptions::default().device(Device::Cuda(0))) {
        Err(Error::Device(_)) | Ok(_) => {}
        Err(other) => panic!("{other}"),
    }

    // The staged pipeline over any copy engine (here the fake device).
    let target: StagedTarget<weightlift_testkit::fake::FakeEngine> = StagedTarget::new(
        weightlift_testkit::fake::FakeEngine::default(),
        StagingOptions::default(),
    )?;
    let on_device = ckpt.load_staged(&target, &LoadOptions::default())?;
    let stats: StagingStats = on_device.staging().unwrap();
    assert!(stats.bytes >= 32);
    let _: Tensor = ckpt.get("layer.b")?.to_device(&target)?;

    // Lazy access and zero-copy views.
    let t = ckpt.get_slice("layer.w", &[1..2])?;
    assert_eq!(t.bytes().unwrap(), &(12..24u8).collect::<Vec<_>>()[..]);
    assert!(matches!(ckpt.get("nope"), Err(Error::NotFound(_))));
    // SAFETY: the test's own file is not modified while mapped.
    let mapped: MappedCheckpoint<'_> = unsafe { ckpt.map() }?;
    assert_eq!(mapped.view("layer.w")?.bytes, w.bytes().unwrap());
    assert_eq!(mapped.views().count(), 2);

    // Whole-file helpers and in-memory files.
    assert_eq!(weightlift::load(&path)?.len(), 2);
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(weightlift::load_bytes(&bytes)?.len(), 2);
    assert!(weightlift::default_threads() >= 4);

    // Bringing a store: what `open_with` does, by hand.
    let location = Location::from(dir.path());
    let (store, entry) = open_store(&location, &StoreOptions::default()).unwrap();
    assert_eq!(entry, Entry::Directory);
    let again = Checkpoint::open_in(store, entry, location, &OpenOptions::default())?;
    assert_eq!(again.len(), 2);
    let local: Arc<dyn Store> = Arc::new(LocalStore::new(dir.path().into(), Backend::pread()));
    let single = Checkpoint::open_in(
        local,
        Entry::File("model.safetensors".into()),
        path.as_path().into(),
        &OpenOptions::default(),
    )?;
    assert_eq!(single.shards()[0].backend(), BackendKind::Pread);

    // Errors name the file and the rule.
    let err: Error = Checkpoint::open(dir.path().join("missing")).unwrap_err();
    assert_eq!(err.io_kind(), Some(std::io::ErrorKind::NotFound));
    assert!(matches!(err, Error::Io { .. }));
    Ok(())
}

#[test]
fn mapped_checkpoints_prefetches_and_shared_loads() -> Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path());
    // SAFETY: the test's own file is not modified while mapped.
    let mapping = unsafe { Mapping::auto() };
    let ckpt = Arc::new(Checkpoint::open_with(
        &path,
        &OpenOptions::default().mapping(mapping),
    )?);
    let state = ckpt.load(&LoadOptions::default())?;
    assert_eq!(state.files()[0].placement, Placement::Mapped);
    let prefetch: Prefetch = ckpt.prefetch(LoadOptions::default().threads(1));
    let _: &Arc<Checkpoint> = prefetch.checkpoint();
    let rows: Tensor = prefetch.get_slice("layer.w", &[1..2])?;
    assert_eq!(rows.bytes().unwrap(), &(12..24u8).collect::<Vec<_>>()[..]);
    let _: Option<&Arc<StateDict>> = prefetch.wait();
    prefetch.cancel();

    let mut shared: SharedLoad<'_> =
        ckpt.load_share(&LoadOptions::default(), Share { rank: 0, world: 1 })?;
    let digest: u64 = shared.digest();
    assert_eq!(
        digest,
        ckpt.load_share(&LoadOptions::default(), Share { rank: 0, world: 1 })?
            .digest()
    );
    assert!(shared.span_mut(0).is_some());
    assert_eq!(shared.bytes_read(), 32);
    assert_eq!(shared.finish().len(), 2);
    Ok(())
}

#[test]
fn placement_loads_memory_budgets_and_read_ahead() -> Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path());
    // The budget every use of the checkpoint runs under, decided when it is opened.
    let budget: MemoryBudget = MemoryBudget::of(1 << 30).with_window(1 << 20);
    let _: (u64, u64, &str) = (budget.bytes(), budget.window(), budget.source());
    let _: MemoryBudget = MemoryBudget::detect();
    let _: MemoryBudget = MemoryBudget::set(Some(1 << 30), None);
    let ckpt = Arc::new(Checkpoint::open_with(
        &path,
        &OpenOptions::default().memory_budget(budget.clone()),
    )?);
    assert_eq!(ckpt.budget(), &budget);
    let _: LoadOptions = LoadOptions::default().memory_budget(budget);
    assert_eq!(weightlift::env::MEMORY_BUDGET, "WEIGHTLIFT_MEMORY_BUDGET");
    let _: (bool, Option<usize>, Option<String>) = (
        weightlift::env::drop_cache(),
        weightlift::env::prefetch_threads(),
        weightlift::env::http_token(),
    );
    let _: String = weightlift::human(1536);

    // Blocks straight into memory the caller owns.
    let fills: Vec<Fill> = vec![
        Fill::new("layer.w", 0, 0)
            .block(vec![1..2])
            .shape(vec![1, 3]),
        Fill::new("layer.b", 1, 0)
            .strides(vec![1])
            .dtype(Dtype::F32),
    ];
    let (mut rows, mut floats) = (vec![0u8; 12], vec![0u8; 16]);
    let report: FillReport = ckpt.load_into(
        &fills,
        vec![&mut rows[..], &mut floats[..]],
        &LoadOptions::default(),
    )?;
    let _: (u64, usize) = (report.bytes_read, report.requests);
    assert_eq!(rows, (12..24u8).collect::<Vec<_>>());
    assert_eq!(floats, 1.5f32.to_le_bytes().repeat(4));
    let target = StagedTarget::new(
        weightlift_testkit::fake::FakeEngine::default(),
        StagingOptions::default(),
    )?;
    let mut memory = weightlift::CopyEngine::alloc(target.engine(), 12)?;
    let _: FillReport = ckpt.load_into_staged(
        &fills[..1],
        vec![&mut memory],
        &target,
        &LoadOptions::default(),
    )?;
    // SAFETY: no destination: nothing is written.
    let cuda: Result<FillReport> =
        unsafe { ckpt.load_into_cuda(&[], 0, &[], &LoadOptions::default()) };
    let _ = cuda;

    // Reading ahead, warming the page cache, announcing a prefetch to come.
    let _: bool = ckpt.read_ahead();
    let warm: Prefetch = ckpt.warm();
    let _: bool = warm.is_active();
    let announced: Announcement = ckpt.announce();
    drop(announced);
    Ok(())
}

#[cfg(feature = "remote")]
#[test]
fn remote_options_are_public() {
    let options = weightlift::remote::RemoteOptions::default().max_in_flight(4);
    assert_eq!(options.max_in_flight, 4);
    let s3 =
        weightlift::remote::S3Config::new(Some("http://127.0.0.1:9"), "us-east-1", None).unwrap();
    assert!(!s3.signed());
    let _: OpenOptions = OpenOptions::default().remote(options.s3(Some(s3)));
}
