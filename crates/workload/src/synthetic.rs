//! Synthetic checkpoints for demos and benchmarks: deterministic, non-zero data in the
//! layouts that matter, sharded with an index, at any size.
//!
//! - [`Profile::Moe`]: Qwen3-30B-A3B's names and layer structure (128 experts of three
//!   matrices per layer, attention with q/k norms, a router), with dimensions scaled down so
//!   that there are about 20,000 tensors per GiB, like the real model's 18,867 in 61 GB
//!   scaled to 1 GiB.
//! - [`Profile::Dense`]: a Llama-like dense model with a few hundred large matrices per GiB.

use rayon::prelude::*;
use std::path::{Path, PathBuf};
use weightlift_format::{Dtype, FormatError, INDEX_FILE_NAME, Layout, ShardIndex};

/// The shape of a synthetic checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Profile {
    /// A few hundred large BF16 matrices per GiB.
    Dense,
    /// Mixture of experts: about 20,000 small BF16 tensors per GiB.
    Moe,
}

impl Profile {
    /// `"dense"` or `"moe"`.
    pub fn name(self) -> &'static str {
        match self {
            Profile::Dense => "dense",
            Profile::Moe => "moe",
        }
    }
}

/// One tensor of a synthetic layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntheticTensor {
    /// Name.
    pub name: String,
    /// Dtype.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
}

impl SyntheticTensor {
    fn new(name: String, shape: &[usize]) -> SyntheticTensor {
        SyntheticTensor {
            name,
            dtype: Dtype::BF16,
            shape: shape.to_vec(),
        }
    }

    /// Bytes of data.
    pub fn byte_len(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64 * (self.dtype.bits() / 8) as u64
    }
}

/// The tensors of a `profile` checkpoint of about `bytes` bytes (whole layers, at least one).
pub fn layout(profile: Profile, bytes: u64) -> Vec<SyntheticTensor> {
    match profile {
        Profile::Moe => moe_layout(bytes),
        Profile::Dense => dense_layout(bytes),
    }
}

/// Embedding, as many whole layers as fit `bytes` (at least one), final norm and LM head.
fn assemble(
    bytes: u64,
    vocab: usize,
    h: usize,
    layer: impl Fn(usize) -> Vec<SyntheticTensor>,
) -> Vec<SyntheticTensor> {
    let per_layer: u64 = layer(0).iter().map(SyntheticTensor::byte_len).sum();
    let fixed = (2 * vocab * h * 2 + h * 2) as u64;
    let layers = (bytes.saturating_sub(fixed) as f64 / per_layer as f64)
        .round()
        .max(1.0) as usize;
    let mut out = vec![SyntheticTensor::new(
        "model.embed_tokens.weight".into(),
        &[vocab, h],
    )];
    (0..layers).for_each(|l| out.extend(layer(l)));
    out.push(SyntheticTensor::new("model.norm.weight".into(), &[h]));
    out.push(SyntheticTensor::new("lm_head.weight".into(), &[vocab, h]));
    out
}

fn moe_layout(bytes: u64) -> Vec<SyntheticTensor> {
    // Qwen3-30B-A3B divided down: hidden 2048 -> 256, expert width 768 -> 96, head_dim
    // 128 -> 32, vocab 151936 -> 8192; 128 experts and the tensor names kept.
    let (h, inter, experts, head_dim, vocab) = (256usize, 96usize, 128usize, 32usize, 8192usize);
    let (q, kv) = (2 * h, h / 4);
    let layer = |l: usize| -> Vec<SyntheticTensor> {
        let p = format!("model.layers.{l}");
        let mut t = vec![
            SyntheticTensor::new(format!("{p}.input_layernorm.weight"), &[h]),
            SyntheticTensor::new(format!("{p}.self_attn.q_proj.weight"), &[q, h]),
            SyntheticTensor::new(format!("{p}.self_attn.k_proj.weight"), &[kv, h]),
            SyntheticTensor::new(format!("{p}.self_attn.v_proj.weight"), &[kv, h]),
            SyntheticTensor::new(format!("{p}.self_attn.o_proj.weight"), &[h, q]),
            SyntheticTensor::new(format!("{p}.self_attn.q_norm.weight"), &[head_dim]),
            SyntheticTensor::new(format!("{p}.self_attn.k_norm.weight"), &[head_dim]),
            SyntheticTensor::new(format!("{p}.post_attention_layernorm.weight"), &[h]),
            SyntheticTensor::new(format!("{p}.mlp.gate.weight"), &[experts, h]),
        ];
        for e in 0..experts {
            t.push(SyntheticTensor::new(
                format!("{p}.mlp.experts.{e}.gate_proj.weight"),
                &[inter, h],
            ));
            t.push(SyntheticTensor::new(
                format!("{p}.mlp.experts.{e}.up_proj.weight"),
                &[inter, h],
            ));
            t.push(SyntheticTensor::new(
                format!("{p}.mlp.experts.{e}.down_proj.weight"),
                &[h, inter],
            ));
        }
        t
    };
    assemble(bytes, vocab, h, layer)
}

fn dense_layout(bytes: u64) -> Vec<SyntheticTensor> {
    let (h, inter, vocab) = (1024usize, 2816usize, 32000usize);
    let layer = |l: usize| -> Vec<SyntheticTensor> {
        let p = format!("model.layers.{l}");
        vec![
            SyntheticTensor::new(format!("{p}.input_layernorm.weight"), &[h]),
            SyntheticTensor::new(format!("{p}.self_attn.q_proj.weight"), &[h, h]),
            SyntheticTensor::new(format!("{p}.self_attn.k_proj.weight"), &[h, h]),
            SyntheticTensor::new(format!("{p}.self_attn.v_proj.weight"), &[h, h]),
            SyntheticTensor::new(format!("{p}.self_attn.o_proj.weight"), &[h, h]),
            SyntheticTensor::new(format!("{p}.post_attention_layernorm.weight"), &[h]),
            SyntheticTensor::new(format!("{p}.mlp.gate_proj.weight"), &[inter, h]),
            SyntheticTensor::new(format!("{p}.mlp.up_proj.weight"), &[inter, h]),
            SyntheticTensor::new(format!("{p}.mlp.down_proj.weight"), &[h, inter]),
        ]
    };
    assemble(bytes, vocab, h, layer)
}

/// Target size of one shard.
const SHARD_BYTES: u64 = 512 << 20;

/// Writes a `profile` checkpoint of about `bytes` bytes into `dir` (created if needed):
/// shards named like `transformers` names them (at least two) and
/// `model.safetensors.index.json`. Returns the shard paths. Each file is written atomically.
/// Errors name the file they are about.
pub fn generate(dir: &Path, profile: Profile, bytes: u64) -> Result<Vec<PathBuf>, String> {
    generate_with_progress(dir, profile, bytes, &|_| {})
}

/// [`generate`], calling `progress` with the bytes of each tensor once it is written (from
/// the writing threads), for a progress bar.
pub fn generate_with_progress(
    dir: &Path,
    profile: Profile,
    bytes: u64,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Vec<PathBuf>, String> {
    let fail = |path: &Path, e: FormatError| format!("{}: {e}", path.display());
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let tensors = layout(profile, bytes);
    let total: u64 = tensors.iter().map(SyntheticTensor::byte_len).sum();
    let shard_count = total.div_ceil(SHARD_BYTES).max(2) as usize;
    let per_shard = total.div_ceil(shard_count as u64);
    // Consecutive tensors fill shards in order, as sharded writers do.
    let mut groups: Vec<Vec<(usize, &SyntheticTensor)>> = vec![Vec::new()];
    let mut filled = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        if filled >= per_shard && groups.len() < shard_count {
            groups.push(Vec::new());
            filled = 0;
        }
        groups.last_mut().expect("one group").push((i, t));
        filled += t.byte_len();
    }
    let n = groups.len();
    let mut index = ShardIndex {
        total_size: Some(total),
        metadata: Default::default(),
        weight_map: Default::default(),
    };
    index.metadata.insert("total_size".into(), total.into());
    let mut meta = weightlift_format::Metadata::new();
    meta.insert("format".into(), "pt".into());
    // Shards are independent: write them in parallel (generation is CPU-bound on fill).
    let paths = groups
        .par_iter()
        .enumerate()
        .map(|(s, group)| {
            let path = dir.join(shard_name(s, n));
            let layout = Layout::new(
                group
                    .iter()
                    .map(|(_, t)| (t.name.as_str(), t.dtype, t.shape.as_slice())),
                Some(&meta),
            )
            .map_err(|e| fail(&path, e))?;
            weightlift_format::write_file_with(&path, |w| {
                w.write_all(layout.header_bytes())?;
                let mut buf = Vec::new();
                for &pos in layout.order() {
                    let (seed, t) = group[pos];
                    buf.resize(t.byte_len() as usize, 0);
                    fill(&mut buf, seed as u64);
                    w.write_all(&buf)?;
                    progress(t.byte_len());
                }
                Ok(())
            })
            .map_err(|e| fail(&path, e))?;
            Ok(path)
        })
        .collect::<Result<Vec<PathBuf>, String>>()?;
    for (s, group) in groups.iter().enumerate() {
        for (_, t) in group {
            index.weight_map.insert(t.name.clone(), shard_name(s, n));
        }
    }
    let index_path = dir.join(INDEX_FILE_NAME);
    weightlift_format::write_file_with(&index_path, |w| w.write_all(index.to_json().as_bytes()))
        .map_err(|e| fail(&index_path, e))?;
    Ok(paths)
}

fn shard_name(s: usize, n: usize) -> String {
    format!("model-{:05}-of-{n:05}.safetensors", s + 1)
}

/// Deterministic pseudo-random bytes (xorshift64*), never all zero.
fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        c.copy_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    for b in chunks.into_remainder() {
        *b = 0x5a;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_have_their_shape() {
        let moe = layout(Profile::Moe, 1 << 30);
        let bytes: u64 = moe.iter().map(SyntheticTensor::byte_len).sum();
        assert!((19_000..24_000).contains(&moe.len()), "{}", moe.len());
        assert!(
            (bytes as f64 / (1u64 << 30) as f64 - 1.0).abs() < 0.03,
            "{bytes}"
        );
        assert!(
            moe.iter()
                .any(|t| t.name == "model.layers.0.mlp.experts.127.down_proj.weight")
        );
        let dense = layout(Profile::Dense, 1 << 30);
        let dbytes: u64 = dense.iter().map(SyntheticTensor::byte_len).sum();
        assert!((200..500).contains(&dense.len()), "{}", dense.len());
        assert!((dbytes as f64 / bytes as f64 - 1.0).abs() < 0.05);
    }
}
