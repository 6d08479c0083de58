//! Tensors assembled in place from the files' pages (`Checkpoint::assemble`): fused
//! parameters equal what stacking copies gives, whatever the pieces' order, phase and
//! shard; most bytes are mapped, not copied; a checkpoint whose files are read, an unknown
//! tensor, a piece past its assembly and a cut file are errors, not crashes.

use proptest::prelude::*;
use weightlift::{Assembly, Checkpoint, Error, LoadOptions, Mapping, OpenOptions, Piece};
use weightlift_testkit::files::{disk_tempdir, moe, split, write_sharded};

fn bytes(ckpt: &Checkpoint, name: &str) -> Vec<u8> {
    ckpt.get(name).unwrap().bytes().unwrap().to_vec()
}

fn mapped(path: &std::path::Path) -> Checkpoint {
    // SAFETY: the tests' files are private to them and not modified while mapped (where a
    // test cuts one, it does so on purpose and only checks the error).
    let options = OpenOptions::default().mapping(unsafe { Mapping::always() });
    Checkpoint::open_with(path, &options).unwrap()
}

#[test]
fn experts_assembled_in_place_equal_stacked_copies() {
    let dir = disk_tempdir();
    // 2 layers x 8 experts of 64 x 576 BF16 (18 pages each), over 3 shards: pieces of one
    // parameter in two files, whose data start in different phases.
    let (layers, experts, hidden, inter) = (2usize, 8usize, 576usize, 64usize);
    write_sharded(
        dir.path(),
        &split(moe(layers, experts, hidden, inter), 3),
        true,
    );
    let ckpt = mapped(dir.path());
    assert!(ckpt.maps_loads().unwrap());
    let one = inter * hidden * 2;
    let mut assemblies = Vec::new();
    let mut wants = Vec::new();
    for layer in 0..layers {
        let (mut gate_up, mut down) = (Vec::new(), Vec::new());
        for e in 0..experts {
            let p = format!("model.layers.{layer}.mlp.experts.{e}");
            gate_up.extend(bytes(&ckpt, &format!("{p}.gate_proj.weight")));
            gate_up.extend(bytes(&ckpt, &format!("{p}.up_proj.weight")));
            down.extend(bytes(&ckpt, &format!("{p}.down_proj.weight")));
        }
        for want in [gate_up, down] {
            let (_, offset, _) = ckpt
                .file_span(&format!(
                    "model.layers.{layer}.mlp.experts.0.down_proj.weight"
                ))
                .unwrap();
            assemblies.push(Assembly::new(want.len(), offset as usize % 4096).unwrap());
            wants.push(want);
        }
    }
    let names: Vec<(usize, String, u64)> = (0..layers)
        .flat_map(|layer| {
            (0..experts).flat_map(move |e| {
                let p = format!("model.layers.{layer}.mlp.experts.{e}");
                let at = (e * 2 * one) as u64;
                [
                    (layer * 2, format!("{p}.gate_proj.weight"), at),
                    (layer * 2, format!("{p}.up_proj.weight"), at + one as u64),
                    (
                        layer * 2 + 1,
                        format!("{p}.down_proj.weight"),
                        (e * one) as u64,
                    ),
                ]
            })
        })
        .collect();
    // In reverse: the order pieces come in does not matter.
    let pieces: Vec<Piece<'_>> = names
        .iter()
        .rev()
        .map(|(a, name, at)| Piece {
            tensor: name,
            into: &assemblies[*a],
            at: *at,
        })
        .collect();
    // SAFETY: the files are not modified; the assemblies are read only after this returns;
    // the pieces do not overlap.
    let report = unsafe { ckpt.assemble(&pieces, &LoadOptions::default()) }.unwrap();
    let total: usize = wants.iter().map(Vec::len).sum();
    assert_eq!(report.mapped + report.copied, total as u64);
    assert!(
        report.mapped > total as u64 / 2,
        "most bytes mapped: {report:?}"
    );
    // The files were in the page cache (read above), so every placed page is mapped in by
    // the assembly itself, before anything touches it.
    #[cfg(target_os = "linux")]
    for (i, assembly) in assemblies.iter().enumerate() {
        let (present, pages) = present_pages(assembly.as_slice());
        assert_eq!(present, pages, "assembly {i}: pages mapped in");
    }
    for (i, (assembly, want)) in assemblies.iter().zip(&wants).enumerate() {
        assert_eq!(assembly.as_slice(), &want[..], "assembly {i}");
    }
}

/// (pages present in this process's page table, pages) of the pages `bytes` spans, from
/// `/proc/self/pagemap` (bit 63 of each page's entry; readable without privileges). Reads
/// none of the bytes.
#[cfg(target_os = "linux")]
fn present_pages(bytes: &[u8]) -> (usize, usize) {
    use std::os::unix::fs::FileExt;
    let (first, last) = (
        bytes.as_ptr() as usize / 4096,
        (bytes.as_ptr() as usize + bytes.len()).div_ceil(4096),
    );
    let mut entries = vec![0u8; (last - first) * 8];
    std::fs::File::open("/proc/self/pagemap")
        .unwrap()
        .read_exact_at(&mut entries, first as u64 * 8)
        .unwrap();
    let present = entries
        .chunks_exact(8)
        .filter(|e| u64::from_le_bytes((*e).try_into().unwrap()) >> 63 == 1)
        .count();
    (present, last - first)
}

#[test]
fn what_cannot_be_assembled_is_an_error() {
    let dir = disk_tempdir();
    write_sharded(dir.path(), &split(moe(1, 4, 576, 64), 1), false);
    let name = "model.layers.0.mlp.experts.0.gate_proj.weight";
    let len = 64 * 576 * 2;
    let assembly = Assembly::new(len, 0).unwrap();
    let piece = |tensor, at| Piece {
        tensor,
        into: &assembly,
        at,
    };
    let options = LoadOptions::default();
    // A checkpoint whose files are read, not mapped.
    let read = Checkpoint::open(dir.path()).unwrap();
    assert!(!read.maps_loads().unwrap());
    // SAFETY: as above (nothing is placed by these calls that fail).
    unsafe {
        let err = read.assemble(&[piece(name, 0)], &options).unwrap_err();
        assert!(matches!(err, Error::InvalidOption(_)), "{err}");
        let ckpt = mapped(dir.path());
        let err = ckpt
            .assemble(&[piece("no.such.tensor", 0)], &options)
            .unwrap_err();
        assert!(matches!(err, Error::NotFound(_)), "{err}");
        let err = ckpt.assemble(&[piece(name, 2)], &options).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidOption(m) if m.contains(name)),
            "{err}"
        );
    }
    // A file cut short after it was opened.
    let ckpt = mapped(dir.path());
    let path = ckpt.shards()[0].path().unwrap().to_path_buf();
    let (_, offset, _) = ckpt.file_span(name).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(offset + 100)
        .unwrap();
    // SAFETY: the file was cut on purpose; only the error is checked, nothing is touched.
    let err = unsafe { ckpt.assemble(&[piece(name, 0)], &options) }.unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// Any tensors, each placed once at a random place (gaps between them left zero), in
    /// any phase: the assembly holds each tensor's bytes where it was placed.
    #[test]
    fn any_pieces_in_any_phase(
        picks in proptest::collection::vec((0usize..24, 0usize..9000), 1..12),
        phase in 0usize..4096,
    ) {
        static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
        let dir = DIR.get_or_init(|| {
            let dir = disk_tempdir();
            write_sharded(dir.path(), &split(moe(2, 4, 576, 64), 2), true);
            dir
        });
        let ckpt = mapped(dir.path());
        let mut names: Vec<String> = ckpt.names().into_iter().map(String::from).collect();
        names.sort();
        let mut chosen: Vec<(String, usize)> = Vec::new();
        for (i, gap) in picks {
            let name = names[i % names.len()].clone();
            if !chosen.iter().any(|(n, _)| *n == name) {
                chosen.push((name, gap));
            }
        }
        let mut want = Vec::new();
        let mut places = Vec::new();
        for (name, gap) in &chosen {
            want.extend(std::iter::repeat_n(0u8, *gap));
            places.push(want.len() as u64);
            want.extend(bytes(&ckpt, name));
        }
        let assembly = Assembly::new(want.len(), phase).unwrap();
        let pieces: Vec<Piece<'_>> = chosen
            .iter()
            .zip(&places)
            .map(|((name, _), &at)| Piece { tensor: name, into: &assembly, at })
            .collect();
        // SAFETY: as above.
        let report = unsafe { ckpt.assemble(&pieces, &LoadOptions::default()) }.unwrap();
        prop_assert_eq!(report.mapped + report.copied, want.len() as u64 - chosen.iter().map(|c| c.1 as u64).sum::<u64>());
        prop_assert!(assembly.as_slice() == &want[..]);
    }
}
