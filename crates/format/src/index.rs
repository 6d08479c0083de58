//! `model.safetensors.index.json`: which shard holds which tensor.
//!
//! The index is produced by other tools and trusted by nobody here: shard paths must stay
//! inside the checkpoint directory, and [`ShardIndex::check`] compares it with the shards'
//! own headers so that a stale or hand-edited index is caught before any data is read.

use crate::error::{FormatError, Result};
use crate::header::Header;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::path::{Component, Path};

/// The map type of [`ShardIndex::weight_map`]: hashed with foldhash (names come from files
/// that are checked against the shards anyway; SipHash's flooding resistance buys nothing).
pub type WeightMap = HashMap<String, String, foldhash::fast::RandomState>;

/// The conventional file name of the index of a sharded checkpoint.
pub const INDEX_FILE_NAME: &str = "model.safetensors.index.json";

/// A parsed index file.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardIndex {
    /// `metadata.total_size`: the sum of all tensors' byte lengths, if declared.
    pub total_size: Option<u64>,
    /// The whole `metadata` object, `total_size` included, as written.
    pub metadata: Map<String, Value>,
    /// Tensor name to shard file (relative to the index's directory). A hash map: a
    /// checkpoint has tens of thousands of entries and is only ever looked up by name
    /// ([`ShardIndex::to_json`] writes them sorted).
    pub weight_map: WeightMap,
}

#[derive(Deserialize)]
struct RawIndex {
    #[serde(default)]
    metadata: Option<Map<String, Value>>,
    weight_map: WeightMap,
}

impl ShardIndex {
    /// Parses an index file's bytes and checks that every shard path is a plain relative
    /// path inside the directory.
    pub fn parse(bytes: &[u8]) -> Result<ShardIndex> {
        let raw: RawIndex = serde_json::from_slice(bytes).map_err(|e| FormatError::IndexJson {
            message: e.to_string(),
        })?;
        let metadata = raw.metadata.unwrap_or_default();
        let total_size = match metadata.get("total_size") {
            None | Some(Value::Null) => None,
            Some(v) => Some(parse_total_size(v).ok_or_else(|| FormatError::IndexJson {
                message: format!("metadata.total_size must be a non-negative integer, found {v}"),
            })?),
        };
        // Tens of thousands of entries name a handful of shards: check each name once.
        let mut checked: Option<&str> = None;
        for shard in raw.weight_map.values() {
            if checked == Some(shard.as_str()) {
                continue;
            }
            if !is_plain_relative(shard) {
                return Err(FormatError::IndexShardPath {
                    shard: shard.clone(),
                });
            }
            checked = Some(shard);
        }
        Ok(ShardIndex {
            total_size,
            metadata,
            weight_map: raw.weight_map,
        })
    }

    /// Builds an index from shard headers, as a writer of a sharded checkpoint would.
    pub fn from_shards<'a, I>(shards: I) -> ShardIndex
    where
        I: IntoIterator<Item = (&'a str, &'a Header)>,
    {
        let mut weight_map = WeightMap::default();
        let mut total = 0u64;
        for (shard, header) in shards {
            for t in header.tensors() {
                total += t.byte_len();
                weight_map.insert(t.name.clone(), shard.to_string());
            }
        }
        let mut metadata = Map::new();
        metadata.insert("total_size".into(), Value::from(total));
        ShardIndex {
            total_size: Some(total),
            metadata,
            weight_map,
        }
    }

    /// The index as pretty-printed JSON, as `transformers` writes it.
    pub fn to_json(&self) -> String {
        let mut obj = Map::new();
        obj.insert("metadata".into(), Value::Object(self.metadata.clone()));
        let mut entries: Vec<(&String, &String)> = self.weight_map.iter().collect();
        entries.sort_unstable();
        obj.insert(
            "weight_map".into(),
            Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
                    .collect(),
            ),
        );
        serde_json::to_string_pretty(&Value::Object(obj)).expect("JSON values serialize")
    }

    /// The distinct shard files, sorted.
    pub fn shards(&self) -> Vec<&str> {
        let shards: std::collections::BTreeSet<&str> =
            self.weight_map.values().map(String::as_str).collect();
        shards.into_iter().collect()
    }

    /// Checks the index against the headers of its shards, given as `(shard name as in the
    /// index, header)`: every indexed shard is present, every indexed tensor is in the shard
    /// the index names, every shard tensor is indexed to that shard, and `total_size` (when
    /// declared) equals the tensors' bytes.
    pub fn check(&self, shards: &[(&str, &Header)]) -> Result<()> {
        // Every shard tensor is indexed to its own shard (one hash lookup each)...
        let mut actual = 0u64;
        let mut count = 0usize;
        for (shard, header) in shards {
            for t in header.tensors() {
                actual += t.byte_len();
                count += 1;
                match self.weight_map.get(&t.name) {
                    Some(s) if s == shard => {}
                    other => {
                        return Err(FormatError::ShardTensorNotInIndex {
                            tensor: t.name.clone(),
                            shard: shard.to_string(),
                            indexed_shard: other.cloned(),
                        });
                    }
                }
            }
        }
        // ...so the shard tensors map one-to-one onto index entries, and equal counts mean
        // every entry is covered. Only when they differ, find the entry to blame.
        if count != self.weight_map.len() {
            return Err(self.uncovered_entry(shards));
        }
        match self.total_size {
            Some(declared) if declared != actual => {
                Err(FormatError::IndexTotalSize { declared, actual })
            }
            _ => Ok(()),
        }
    }

    /// The error for an index entry no shard covers: its shard is missing, or lacks it.
    fn uncovered_entry(&self, shards: &[(&str, &Header)]) -> FormatError {
        let mut entries: Vec<(&String, &String)> = self.weight_map.iter().collect();
        entries.sort_unstable();
        for (tensor, shard) in entries {
            match shards.iter().find(|(s, _)| s == shard) {
                None => {
                    return FormatError::IndexMissingShard {
                        tensor: tensor.clone(),
                        shard: shard.clone(),
                    };
                }
                Some((_, header)) if header.get(tensor).is_none() => {
                    return FormatError::IndexTensorNotInShard {
                        tensor: tensor.clone(),
                        shard: shard.clone(),
                    };
                }
                Some(_) => {}
            }
        }
        // Not reachable when called as `check` does; an error rather than a panic all the same.
        FormatError::IndexJson {
            message: "the index lists tensors its shards do not hold".into(),
        }
    }
}

fn parse_total_size(v: &Value) -> Option<u64> {
    if let Some(n) = v.as_u64() {
        return Some(n);
    }
    // Some writers emit it as a float (e.g. `1234.0`); accept it only when it is integral.
    let f = v.as_f64()?;
    (f >= 0.0 && f.fract() == 0.0 && f < u64::MAX as f64).then_some(f as u64)
}

fn is_plain_relative(shard: &str) -> bool {
    !shard.is_empty()
        && !shard.contains('\\')
        && Path::new(shard)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}
