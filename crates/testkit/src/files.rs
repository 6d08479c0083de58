//! Checkpoints for tests: small, deterministic, written with weightlift-format's writer.

use std::path::{Path, PathBuf};
use weightlift_format::{Dtype, INDEX_FILE_NAME, ShardIndex, TensorRef};

/// A tensor to write, with its bytes.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Name.
    pub name: String,
    /// Dtype.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Bytes.
    pub data: Vec<u8>,
}

impl Spec {
    /// A tensor filled with deterministic pseudo-random bytes derived from its name.
    pub fn new(name: &str, dtype: Dtype, shape: &[usize]) -> Spec {
        let elements: usize = shape.iter().product();
        let len = dtype.byte_len(elements).expect("whole bytes");
        let mut seed = name.bytes().fold(0x9e37_79b9_7f4a_7c15u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        let data = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        Spec {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            data,
        }
    }
}

/// Writes one safetensors file.
pub fn write_file(path: &Path, specs: &[Spec]) {
    let refs: Vec<TensorRef> = specs
        .iter()
        .map(|s| TensorRef {
            name: &s.name,
            dtype: s.dtype,
            shape: &s.shape,
            data: &s.data,
        })
        .collect();
    let mut meta = weightlift_format::Metadata::new();
    meta.insert("format".into(), "pt".into());
    weightlift_format::write_file(path, &refs, Some(&meta)).expect("write test file");
}

/// Writes shards `model-0000i-of-0000n.safetensors` into `dir`, with an index file when
/// `index` is true. Returns the shard paths.
pub fn write_sharded(dir: &Path, shards: &[Vec<Spec>], index: bool) -> Vec<PathBuf> {
    let n = shards.len();
    let mut paths = Vec::new();
    let mut headers = Vec::new();
    for (i, specs) in shards.iter().enumerate() {
        let name = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
        let path = dir.join(&name);
        write_file(&path, specs);
        let bytes = std::fs::read(&path).unwrap();
        headers.push((
            name,
            weightlift_format::Header::from_file_bytes(&bytes).unwrap(),
        ));
        paths.push(path);
    }
    if index {
        let idx = ShardIndex::from_shards(headers.iter().map(|(n, h)| (n.as_str(), h)));
        std::fs::write(dir.join(INDEX_FILE_NAME), idx.to_json()).unwrap();
    }
    paths
}

/// Every dtype, zero-sized and scalar tensors, odd sizes.
pub fn all_dtypes() -> Vec<Spec> {
    let mut specs: Vec<Spec> = Dtype::ALL
        .iter()
        .map(|&d| Spec::new(&format!("t.{}", d.name().to_lowercase()), d, &[3, 8]))
        .collect();
    specs.push(Spec::new("empty", Dtype::F32, &[0, 7]));
    specs.push(Spec::new("empty2", Dtype::BF16, &[4, 0]));
    specs.push(Spec::new("scalar", Dtype::F64, &[]));
    specs.push(Spec::new("odd", Dtype::U8, &[1001]));
    specs.push(Spec::new("big", Dtype::F32, &[300, 1000]));
    specs
}

/// A dense layout: a few large matrices per layer.
pub fn dense(layers: usize, hidden: usize) -> Vec<Spec> {
    let mut specs = vec![Spec::new(
        "model.embed_tokens.weight",
        Dtype::BF16,
        &[1000, hidden],
    )];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        specs.push(Spec::new(
            &format!("{p}.self_attn.q_proj.weight"),
            Dtype::BF16,
            &[hidden, hidden],
        ));
        specs.push(Spec::new(
            &format!("{p}.mlp.up_proj.weight"),
            Dtype::BF16,
            &[hidden * 2, hidden],
        ));
        specs.push(Spec::new(
            &format!("{p}.input_layernorm.weight"),
            Dtype::F32,
            &[hidden],
        ));
    }
    specs
}

/// A mixture-of-experts layout: many small expert matrices per layer.
pub fn moe(layers: usize, experts: usize, hidden: usize, inter: usize) -> Vec<Spec> {
    let mut specs = Vec::new();
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        specs.push(Spec::new(
            &format!("{p}.mlp.gate.weight"),
            Dtype::BF16,
            &[experts, hidden],
        ));
        specs.push(Spec::new(
            &format!("{p}.post_attention_layernorm.weight"),
            Dtype::BF16,
            &[hidden],
        ));
        for e in 0..experts {
            for proj in ["gate_proj", "up_proj"] {
                specs.push(Spec::new(
                    &format!("{p}.mlp.experts.{e}.{proj}.weight"),
                    Dtype::BF16,
                    &[inter, hidden],
                ));
            }
            specs.push(Spec::new(
                &format!("{p}.mlp.experts.{e}.down_proj.weight"),
                Dtype::BF16,
                &[hidden, inter],
            ));
        }
    }
    specs
}

/// Splits specs into `n` shards of consecutive tensors.
pub fn split(specs: Vec<Spec>, n: usize) -> Vec<Vec<Spec>> {
    let per = specs.len().div_ceil(n);
    let mut out: Vec<Vec<Spec>> = Vec::new();
    for (i, s) in specs.into_iter().enumerate() {
        if i % per == 0 {
            out.push(Vec::new());
        }
        out.last_mut().unwrap().push(s);
    }
    out
}

/// A temporary directory on a disk-backed filesystem (tmpfs would hide O_DIRECT alignment
/// bugs), removed on drop: under the workspace's `target/`.
pub fn disk_tempdir() -> tempfile::TempDir {
    // Test binaries carried to another machine (the GPU bundle) have no workspace there:
    // `WEIGHTLIFT_TEST_TMPDIR` names a folder on a disk instead.
    let base = std::env::var_os("WEIGHTLIFT_TEST_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/test-tmp"));
    std::fs::create_dir_all(&base).expect("a folder for test files");
    tempfile::tempdir_in(base).expect("temp dir")
}

/// Every tensor of a load as (name, dtype, shape, bytes), sorted by name; device tensors are
/// copied back first. What tests compare a device load with a CPU load by.
pub fn host_bytes(state: &weightlift::StateDict) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
    let mut out: Vec<_> = state
        .iter()
        .map(|t| {
            let host = t.to_host().expect("tensor copied to the host");
            (
                t.name().to_string(),
                t.dtype(),
                t.shape().to_vec(),
                host.bytes().expect("host bytes").to_vec(),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Drops `path`'s pages from the page cache (`POSIX_FADV_DONTNEED`): the next reads of it
/// reach the disk.
pub fn evict(path: &Path) -> std::io::Result<()> {
    let file = std::fs::File::open(path)?;
    rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed)?;
    Ok(())
}
