//! Fuzzes index-file parsing: any bytes give an index or an error; shard paths of an
//! accepted index never escape the checkpoint directory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weightlift_format::ShardIndex;

fuzz_target!(|data: &[u8]| {
    if let Ok(index) = ShardIndex::parse(data) {
        for shard in index.shards() {
            assert!(!shard.starts_with('/') && !shard.split('/').any(|c| c == ".."));
        }
        let _ = ShardIndex::parse(index.to_json().as_bytes()).expect("own output parses");
    }
});
