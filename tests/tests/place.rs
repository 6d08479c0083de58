//! Placement loads: blocks of tensors read straight into the caller's memory, where the
//! caller says; the fused layouts model loaders build (experts stacked, gate and up side by
//! side, q/k/v cut from one tensor, a column block) equal what copying in memory gives, with
//! conversions; bad placements refuse before reading anything.

use half::bf16;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use weightlift::{Checkpoint, Dtype, Error, Fill, LoadOptions};
use weightlift_testkit::files::{disk_tempdir, moe, split, write_sharded};

fn bytes(ckpt: &Checkpoint, name: &str) -> Vec<u8> {
    ckpt.get(name).unwrap().bytes().unwrap().to_vec()
}

#[test]
fn experts_stacked_and_gate_up_side_by_side_in_one_load() {
    let dir = disk_tempdir();
    // 2 layers x 4 experts, hidden 16, intermediate 8 (BF16), over 3 shards.
    write_sharded(dir.path(), &split(moe(2, 4, 16, 8), 3), true);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let (experts, inter, hidden) = (4usize, 8usize, 16usize);
    // gate_up_proj [E, 2I, H] and down_proj [E, H, I] per layer, BF16.
    let gate_up_len = experts * 2 * inter * hidden * 2;
    let down_len = experts * hidden * inter * 2;
    let mut fills = Vec::new();
    for layer in 0..2 {
        for e in 0..experts {
            let p = format!("model.layers.{layer}.mlp.experts.{e}");
            let dest = layer * 2;
            let at = (e * 2 * inter * hidden * 2) as u64;
            fills.push(
                Fill::new(format!("{p}.gate_proj.weight"), dest, at).shape(vec![inter, hidden]),
            );
            fills.push(
                Fill::new(
                    format!("{p}.up_proj.weight"),
                    dest,
                    at + (inter * hidden * 2) as u64,
                )
                .shape(vec![inter, hidden]),
            );
            fills.push(Fill::new(
                format!("{p}.down_proj.weight"),
                dest + 1,
                (e * hidden * inter * 2) as u64,
            ));
        }
    }
    let mut memory: Vec<Vec<u8>> = (0..4)
        .map(|i| vec![0u8; if i % 2 == 0 { gate_up_len } else { down_len }])
        .collect();
    let done = Arc::new(AtomicU64::new(0));
    let seen = Arc::clone(&done);
    let options = LoadOptions::default()
        .request_size(4096)
        .threads(3)
        .progress(move |p| seen.store(p.bytes_done, Ordering::Relaxed));
    let report = ckpt
        .load_into(
            &fills,
            memory.iter_mut().map(|m| &mut m[..]).collect(),
            &options,
        )
        .unwrap();
    assert!(report.requests > 1);
    assert_eq!(done.load(Ordering::Relaxed), report.bytes_read);
    // What stacking and concatenating copies in memory would give.
    for layer in 0..2 {
        let mut want_gate_up = Vec::new();
        let mut want_down = Vec::new();
        for e in 0..experts {
            let p = format!("model.layers.{layer}.mlp.experts.{e}");
            want_gate_up.extend(bytes(&ckpt, &format!("{p}.gate_proj.weight")));
            want_gate_up.extend(bytes(&ckpt, &format!("{p}.up_proj.weight")));
            want_down.extend(bytes(&ckpt, &format!("{p}.down_proj.weight")));
        }
        assert_eq!(memory[layer * 2], want_gate_up, "layer {layer} gate_up");
        assert_eq!(memory[layer * 2 + 1], want_down, "layer {layer} down");
    }
}

#[test]
fn blocks_with_strides_and_conversions() {
    let dir = disk_tempdir();
    write_sharded(dir.path(), &split(moe(1, 2, 16, 8), 1), false);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let name = "model.layers.0.mlp.experts.1.gate_proj.weight"; // [8, 16] BF16
    let src = ckpt.get(name).unwrap();
    let vals: Vec<f32> = src
        .as_slice::<bf16>()
        .unwrap()
        .iter()
        .map(|v| v.to_f32())
        .collect();
    // q/k/v-style: rows 0..2, 2..5, 5..8 cut into three destinations, as F32.
    // Column block 4..12 of every row into the right half of a [8, 16] F32 matrix (stride 16).
    let mut q = vec![0u8; 2 * 16 * 4];
    let mut k = vec![0u8; 3 * 16 * 4];
    let mut v = vec![0u8; 3 * 16 * 4];
    let mut cols = vec![0u8; 8 * 16 * 4];
    let fills = vec![
        Fill::new(name, 0, 0).block(vec![0..2]).dtype(Dtype::F32),
        Fill::new(name, 1, 0).block(vec![2..5]).dtype(Dtype::F32),
        Fill::new(name, 2, 0).block(vec![5..8]).dtype(Dtype::F32),
        Fill::new(name, 3, 8 * 4)
            .block(vec![0..8, 4..12])
            .shape(vec![8, 8])
            .strides(vec![16, 1])
            .dtype(Dtype::F32),
    ];
    ckpt.load_into(
        &fills,
        vec![&mut q[..], &mut k[..], &mut v[..], &mut cols[..]],
        &LoadOptions::default(),
    )
    .unwrap();
    let f32s = |b: &[u8]| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    assert_eq!(f32s(&q), vals[0..32]);
    assert_eq!(f32s(&k), vals[32..80]);
    assert_eq!(f32s(&v), vals[80..128]);
    let got = f32s(&cols);
    for r in 0..8 {
        assert_eq!(got[r * 16..r * 16 + 8], [0.0; 8], "left half untouched");
        assert_eq!(
            got[r * 16 + 8..r * 16 + 16],
            vals[r * 16 + 4..r * 16 + 12],
            "row {r}"
        );
    }
}

#[test]
fn bad_placements_refuse_before_reading() {
    let dir = disk_tempdir();
    write_sharded(dir.path(), &split(moe(1, 2, 16, 8), 1), false);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let name = "model.layers.0.mlp.experts.0.up_proj.weight"; // [8, 16] BF16: 256 bytes
    let read = Arc::new(AtomicU64::new(0));
    let seen = Arc::clone(&read);
    let options =
        LoadOptions::default().progress(move |p| seen.store(p.bytes_done, Ordering::Relaxed));
    let mut a = vec![0u8; 512];
    let cases: Vec<(Vec<Fill>, &str)> = vec![
        (vec![Fill::new(name, 0, 300)], "outside destination 0"),
        (
            vec![Fill::new(name, 1, 0)],
            "destination 1 of 1 does not exist",
        ),
        (
            vec![Fill::new(name, 0, 0), Fill::new(name, 0, 200)],
            "overlaps",
        ),
        (
            vec![Fill::new(name, 0, 0).shape(vec![16, 8])],
            "expects a block of shape [16, 8]",
        ),
        (
            vec![Fill::new(name, 0, 0).dtype(Dtype::I32)],
            "cannot convert BF16 to I32",
        ),
        (
            vec![Fill::new(name, 0, 0).strides(vec![1, 8])],
            "last dimension must be contiguous",
        ),
    ];
    for (fills, words) in cases {
        let err = ckpt
            .load_into(&fills, vec![&mut a[..]], &options)
            .unwrap_err();
        assert!(matches!(err, Error::InvalidPlacement { .. }), "{err}");
        assert!(err.to_string().contains(words), "{err}");
        assert!(err.to_string().contains(name), "{err}");
    }
    let err = ckpt
        .load_into(&[Fill::new("nope", 0, 0)], vec![&mut a[..]], &options)
        .unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err}");
    assert_eq!(read.load(Ordering::Relaxed), 0, "nothing was read");
    assert_eq!(a, vec![0u8; 512], "nothing was written");
}

/// The fused-expert fills of the first test, plus q/k/v rows and a strided column block
/// with conversions, with the destinations' lengths.
fn mixed_fills() -> (Vec<Fill>, Vec<usize>) {
    let (experts, inter, hidden) = (4usize, 8usize, 16usize);
    let mut fills = Vec::new();
    for e in 0..experts {
        let p = format!("model.layers.1.mlp.experts.{e}");
        let at = (e * 2 * inter * hidden * 2) as u64;
        fills.push(Fill::new(format!("{p}.gate_proj.weight"), 0, at));
        fills.push(Fill::new(
            format!("{p}.up_proj.weight"),
            0,
            at + (inter * hidden * 2) as u64,
        ));
        fills.push(Fill::new(
            format!("{p}.down_proj.weight"),
            1,
            (e * hidden * inter * 2) as u64,
        ));
    }
    let name = "model.layers.0.mlp.experts.3.gate_proj.weight";
    fills.extend([
        Fill::new(name, 2, 0).block(vec![0..2]).dtype(Dtype::F32),
        Fill::new(name, 2, 2 * 16 * 4).block(vec![2..8]),
        Fill::new(name, 3, 8 * 4)
            .block(vec![0..8, 4..12])
            .shape(vec![8, 8])
            .strides(vec![16, 1])
            .dtype(Dtype::F32),
    ]);
    let lens = vec![
        experts * 2 * inter * hidden * 2,
        experts * hidden * inter * 2,
        2 * 16 * 4 + 6 * 16 * 2,
        8 * 16 * 4,
    ];
    (fills, lens)
}

/// Into device memory through the staged pipeline (a fake device): the same bytes as the
/// host placement load, with several blocks per staging buffer, neighbours in one copy,
/// and no buffer reused or memory left while a copy runs.
#[test]
fn device_placements_equal_host_placements() {
    use std::time::Duration;
    use weightlift::{CopyEngine, DeviceMemory, StagedTarget, StagingOptions};
    use weightlift_testkit::fake::FakeEngine;

    let dir = disk_tempdir();
    write_sharded(dir.path(), &split(moe(2, 4, 16, 8), 3), true);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let (fills, lens) = mixed_fills();
    // The fake device's memory starts as 0xa5: so does the host's.
    let mut host: Vec<Vec<u8>> = lens.iter().map(|&n| vec![0xa5; n]).collect();
    let options = LoadOptions::default().threads(3).max_gap(1 << 10);
    ckpt.load_into(
        &fills,
        host.iter_mut().map(|m| &mut m[..]).collect(),
        &options,
    )
    .unwrap();
    for (buffers, size) in [(2, 4096), (3, 1 << 20)] {
        let target = StagedTarget::new(
            FakeEngine::new(Duration::from_micros(200)),
            StagingOptions::new(buffers, size),
        )
        .unwrap();
        let mut memory: Vec<_> = lens
            .iter()
            .map(|&n| target.engine().alloc(n as u64).unwrap())
            .collect();
        let report = ckpt
            .load_into_staged(&fills, memory.iter_mut().collect(), &target, &options)
            .unwrap();
        assert!(report.bytes_read > 0);
        for (i, (m, want)) in memory.iter().zip(&host).enumerate() {
            let mut got = vec![0u8; want.len()];
            m.read_back(0, &mut got).unwrap();
            assert_eq!(
                &got, want,
                "destination {i} with {buffers} x {size} staging"
            );
        }
        let engine = target.engine();
        assert_eq!(engine.violations(), 0);
        // Gate and up of an expert are neighbours in the file and in gate_up: one copy.
        assert!(
            engine.copies() < fills.len() as u64 + 8,
            "{} copies",
            engine.copies()
        );
        assert!(engine.pinned_bytes() <= (buffers * size) as u64);
    }
}

/// A failing copy fails the load with the device's error after every started copy
/// completed; bad placements refuse before anything is read or copied.
#[test]
fn device_placement_errors() {
    use std::time::Duration;
    use weightlift::{CopyEngine, StagedTarget, StagingOptions};
    use weightlift_testkit::fake::FakeEngine;

    let dir = disk_tempdir();
    write_sharded(dir.path(), &split(moe(2, 4, 16, 8), 3), true);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let (fills, lens) = mixed_fills();
    let target = StagedTarget::new(
        FakeEngine::new(Duration::from_millis(1)).failing_copy(3),
        StagingOptions::new(2, 4096),
    )
    .unwrap();
    let mut memory: Vec<_> = lens
        .iter()
        .map(|&n| target.engine().alloc(n as u64).unwrap())
        .collect();
    let options = LoadOptions::default().threads(2);
    let err = ckpt
        .load_into_staged(&fills, memory.iter_mut().collect(), &target, &options)
        .unwrap_err();
    assert!(err.to_string().contains("injected"), "{err}");
    drop(memory);
    assert_eq!(target.engine().violations(), 0, "memory freed under a copy");

    let target = StagedTarget::new(FakeEngine::default(), StagingOptions::new(2, 4096)).unwrap();
    let mut small = target.engine().alloc(100).unwrap();
    let err = ckpt
        .load_into_staged(
            &[Fill::new(
                "model.layers.0.mlp.experts.0.up_proj.weight",
                0,
                0,
            )],
            vec![&mut small],
            &target,
            &options,
        )
        .unwrap_err();
    assert!(matches!(err, Error::InvalidPlacement { .. }), "{err}");
    assert_eq!(target.engine().copies(), 0);
}

/// A row-interleaved tensor (`[g0, u0, g1, u1, ...]`, as some checkpoints store gate and up)
/// de-interleaved in one placement: its rows seen as `[rows / 2, 2]`, the pairs' halves sent
/// to the two halves of the destination; a view of the wrong size refuses.
#[test]
fn interleaved_rows_are_one_placement_through_a_view() {
    let dir = disk_tempdir();
    write_sharded(dir.path(), &split(moe(1, 2, 16, 8), 1), false);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let name = "model.layers.0.mlp.experts.1.gate_proj.weight"; // [8, 16] BF16
    let src = bytes(&ckpt, name);
    let row = 16 * 2;
    let mut dest = vec![0u8; src.len()];
    ckpt.load_into(
        &[Fill::new(name, 0, 0)
            .view(vec![4, 2, 16])
            .strides(vec![16, 4 * 16, 1])],
        vec![&mut dest[..]],
        &LoadOptions::default(),
    )
    .unwrap();
    for r in 0..8 {
        // Source row r = 2 * i + j lands at row j * 4 + i.
        let (i, j) = (r / 2, r % 2);
        let at = (j * 4 + i) * row;
        assert_eq!(dest[at..at + row], src[r * row..(r + 1) * row], "row {r}");
    }
    let err = ckpt
        .load_into(
            &[Fill::new(name, 0, 0).view(vec![4, 2, 15])],
            vec![&mut dest[..]],
            &LoadOptions::default(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("does not hold"), "{err}");
}

/// A file cut after the checkpoint was opened: the placement load fails naming the first
/// tensor of the failed read that lies past the file's new end (the rule loads follow), not
/// the first tensor of the read.
#[test]
fn a_cut_file_names_the_tensor_past_its_end() {
    let dir = disk_tempdir();
    write_sharded(dir.path(), &split(moe(1, 4, 16, 8), 1), false);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let shard = &ckpt.shards()[0];
    let path = shard.path().unwrap().to_path_buf();
    let infos = shard.header().tensors();
    // Cut the file in the middle of its last tensor but one: every tensor is one read.
    let victim = &infos[infos.len() - 2];
    let cut = shard.header().data_start() + victim.data_offsets.0 + 2;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(cut)
        .unwrap();
    let mut fills = Vec::new();
    let mut lens = Vec::new();
    for (i, t) in infos.iter().enumerate() {
        fills.push(Fill::new(t.name.clone(), i, 0));
        lens.push(t.byte_len() as usize);
    }
    let mut dests: Vec<Vec<u8>> = lens.iter().map(|&n| vec![0u8; n]).collect();
    let options = LoadOptions::default().request_size(64 << 20);
    let err = ckpt
        .load_into(
            &fills,
            dests.iter_mut().map(|d| &mut d[..]).collect(),
            &options,
        )
        .unwrap_err();
    match &err {
        Error::Read { tensor, .. } => assert_eq!(tensor, &victim.name, "{err}"),
        other => panic!("not a read error: {other}"),
    }
}
