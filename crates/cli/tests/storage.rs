//! Loads reach storage that counts requests in large ones: a cold load of a checkpoint of
//! large tensors, run in a block-I/O cgroup (what the `--storage` profiles of `cargo xtask
//! bench` use), sends the disk requests of at least 512 KiB on average, owned and mapped
//! (measured here: ~1-1.5 MiB owned, ~0.9 MiB mapped; the block layer's bios of buffered
//! reads are 1 MiB without large folios). A regression to small requests (each a round trip
//! on a cloud volume or a network filesystem) fails here, not only in the bench. Both with
//! the disk's readahead and with the kernel's default 128 KiB (set on the disk for the test,
//! restored after). Where no such cgroup can be made (not root, no blkio or io controller),
//! or the readahead cannot be set, the test says so and passes that part.

use weightlift_testkit::cgroup::{IoCgroup, command_in};
use weightlift_testkit::files::{dense, disk_tempdir, evict, split, write_sharded};

#[test]
fn cold_loads_reach_the_disk_in_large_requests() {
    let dir = disk_tempdir();
    // 8 layers of 2048-wide matrices: tensors of 8 and 16 MiB, ~200 MiB in 3 shards.
    let paths = write_sharded(dir.path(), &split(dense(8, 2048), 3), true);
    let data: u64 = paths
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    // A request limit far above what the disk does: the group only counts.
    let name = format!("weightlift-test-io-{}", std::process::id());
    // As the disk is, then with the kernel's default readahead (128 KiB, what a cloud VM's
    // volume keeps): faulting a mapping in reads that much at a time, so a mapped load that
    // populated its ranges by faulting them reached the disk in 256 KiB requests there,
    // while this VM's 8 MiB readahead hid it.
    for readahead in [None, Some(128u64 << 10)] {
        let group = match IoCgroup::new(&name, dir.path(), None, Some(1_000_000)) {
            Ok(g) => g,
            Err(why) => {
                eprintln!("skipped: {why}");
                return;
            }
        };
        let group = match readahead {
            None => group,
            Some(bytes) => match group.with_readahead(bytes) {
                Ok(g) => g,
                Err(why) => {
                    eprintln!("skipped with a {} KiB readahead: {why}", bytes >> 10);
                    continue;
                }
            },
        };
        loads_reach_the_disk_in_large_requests(&group, dir.path(), &paths, data, readahead);
    }
}

/// Each load (`--map never`, `--map always`) of the checkpoint at `dir`, cold, in `group`.
fn loads_reach_the_disk_in_large_requests(
    group: &IoCgroup,
    dir: &std::path::Path,
    paths: &[std::path::PathBuf],
    data: u64,
    readahead: Option<u64>,
) {
    let exe = std::path::PathBuf::from(env!("CARGO_BIN_EXE_weightlift"));
    let setting = readahead.map_or("the disk's readahead".to_string(), |b| {
        format!("a {} KiB readahead", b >> 10)
    });
    for map in ["never", "always"] {
        for p in paths {
            evict(p).unwrap();
        }
        let before = group.reads();
        let out: std::process::Output = command_in(&[group.path()], &exe)
            .args(["load", dir.to_str().unwrap(), "--map", map])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got = group.reads().since(before);
        assert!(
            got.bytes >= data * 95 / 100,
            "--map {map}, {setting}: the disk served {} of {data} bytes (were they evicted?)",
            got.bytes
        );
        let avg = got.bytes / got.requests.max(1);
        assert!(
            avg >= 512 << 10,
            "--map {map}, {setting}: {} requests of {} KiB on average for {data} bytes",
            got.requests,
            avg >> 10
        );
        eprintln!(
            "--map {map}, {setting}: {} requests, {} KiB on average",
            got.requests,
            avg >> 10
        );
    }
}
