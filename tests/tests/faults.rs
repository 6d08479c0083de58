//! Bad checkpoints and failing storage: clear errors naming the file and tensor, never a
//! panic, never a partial result passed off as complete.

use std::path::Path;
use weightlift::{Backend, Checkpoint, Error, FormatError, LoadOptions, OpenOptions, ShardIndex};
use weightlift_testkit::files::{Spec, dense, disk_tempdir, moe, split, write_file, write_sharded};

fn sharded(dir: &Path) -> Vec<std::path::PathBuf> {
    write_sharded(dir, &split(moe(2, 4, 32, 16), 3), true)
}

#[test]
fn truncated_shard() {
    let dir = disk_tempdir();
    let files = sharded(dir.path());
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&files[1])
        .unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len - 10).unwrap();
    let err = Checkpoint::open(dir.path()).unwrap_err();
    assert!(
        matches!(&err, Error::Format { location, source: FormatError::DataLengthMismatch { .. } } if location == &files[1].clone().into()),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("model-00002-of-00003.safetensors") && msg.contains("truncated"),
        "{msg}"
    );
}

#[test]
fn missing_shard() {
    let dir = disk_tempdir();
    let files = sharded(dir.path());
    std::fs::remove_file(&files[2]).unwrap();
    let err = Checkpoint::open(dir.path()).unwrap_err();
    assert!(
        matches!(&err, Error::Io { location, .. } if location == &files[2].clone().into()),
        "{err}"
    );
    assert!(err.to_string().contains("listed in the index"), "{err}");
}

#[test]
fn index_names_a_tensor_the_shard_lacks() {
    let dir = disk_tempdir();
    sharded(dir.path());
    let index_path = dir.path().join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index_path).unwrap();
    let text = text.replacen(
        "\"weight_map\": {",
        "\"weight_map\": {\n    \"ghost.weight\": \"model-00001-of-00003.safetensors\",",
        1,
    );
    std::fs::write(&index_path, text).unwrap();
    let err = Checkpoint::open(dir.path()).unwrap_err();
    assert!(
        matches!(&err, Error::Format { source: FormatError::IndexTensorNotInShard { tensor, .. }, .. } if tensor == "ghost.weight"),
        "{err}"
    );
    assert!(
        err.to_string().contains("model.safetensors.index.json"),
        "{err}"
    );
}

#[test]
fn shard_holds_a_tensor_the_index_lacks_or_misplaces() {
    let dir = disk_tempdir();
    sharded(dir.path());
    let index_path = dir.path().join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index_path).unwrap();
    let mut index = ShardIndex::parse(text.as_bytes()).unwrap();
    let last_shard = "model-00003-of-00003.safetensors";
    let moved = index
        .weight_map
        .iter()
        .find(|(_, shard)| shard.as_str() != last_shard)
        .map(|(name, _)| name.clone())
        .unwrap();
    index.weight_map.insert(moved, last_shard.into());
    std::fs::write(&index_path, index.to_json()).unwrap();
    let err = Checkpoint::open(dir.path()).unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Format {
                source: FormatError::IndexTensorNotInShard { .. }
                    | FormatError::ShardTensorNotInIndex { .. },
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn total_size_mismatch() {
    let dir = disk_tempdir();
    sharded(dir.path());
    let index_path = dir.path().join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index_path).unwrap();
    let text = text.replacen("\"total_size\": ", "\"total_size\": 1", 1);
    std::fs::write(&index_path, text).unwrap();
    let err = Checkpoint::open(dir.path()).unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Format {
                source: FormatError::IndexTotalSize { .. },
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn index_shard_path_escaping_the_directory() {
    let dir = disk_tempdir();
    let index_path = dir.path().join("model.safetensors.index.json");
    std::fs::write(&index_path, r#"{"weight_map":{"a":"../../etc/passwd"}}"#).unwrap();
    let err = Checkpoint::open(dir.path()).unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Format {
                source: FormatError::IndexShardPath { .. },
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn duplicate_tensor_across_shards_without_index() {
    let dir = disk_tempdir();
    write_file(
        &dir.path().join("a.safetensors"),
        &[Spec::new("w", weightlift::Dtype::F32, &[2])],
    );
    write_file(
        &dir.path().join("b.safetensors"),
        &[Spec::new("w", weightlift::Dtype::F32, &[2])],
    );
    let err = Checkpoint::open(dir.path()).unwrap_err();
    assert!(
        matches!(&err, Error::DuplicateTensor { tensor, .. } if tensor == "w"),
        "{err}"
    );
}

#[test]
fn unreadable_file() {
    let dir = disk_tempdir();
    // A directory where a shard should be: it opens, but reading it fails (EISDIR). Tests
    // run as root, so permission bits would not stop the read.
    std::fs::create_dir(dir.path().join("model.safetensors")).unwrap();
    let err = Checkpoint::open(dir.path()).unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Io {
                context: "reading the header",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("model.safetensors"), "{err}");
    // A directory with nothing to load.
    let empty = disk_tempdir();
    assert!(matches!(
        Checkpoint::open(empty.path()),
        Err(Error::NoShards { .. })
    ));
    assert!(matches!(
        Checkpoint::open(empty.path().join("nope.safetensors")),
        Err(Error::Io { .. })
    ));
}

#[test]
fn garbage_file_names_file_and_rule() {
    let dir = disk_tempdir();
    let path = dir.path().join("bad.safetensors");
    let json = r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#;
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(json.as_bytes());
    bytes.extend_from_slice(&[0; 4]);
    std::fs::write(&path, bytes).unwrap();
    let msg = Checkpoint::open(&path).unwrap_err().to_string();
    assert!(
        msg.contains("bad.safetensors") && msg.contains("\"w\"") && msg.contains("needs 8"),
        "{msg}"
    );
}

#[test]
fn file_shrinking_during_the_load_is_an_error_not_garbage() {
    for backend in [Backend::pread(), Backend::direct()] {
        let dir = disk_tempdir();
        let path = dir.path().join("m.safetensors");
        write_file(&path, &dense(2, 256));
        let ckpt = Checkpoint::open_with(&path, &OpenOptions::default().backend(backend)).unwrap();
        let (_, last) = ckpt.tensors().last().map(|(s, t)| (s, t.clone())).unwrap();
        let file_len = ckpt.shards()[0].header().file_len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(file_len - 100)
            .unwrap();
        let err = ckpt.load(&LoadOptions::default()).unwrap_err();
        match &err {
            Error::Read {
                location,
                tensor,
                source,
            } => {
                assert_eq!(location, &path.clone().into());
                assert_eq!(tensor, &last.name, "names the tensor cut short");
                assert_eq!(source.kind(), std::io::ErrorKind::UnexpectedEof);
            }
            other => panic!("unexpected error {other}"),
        }
        let msg = err.to_string();
        assert!(msg.contains("truncated"), "{msg}");
        let shown = path.display().to_string();
        assert_eq!(
            msg.matches(&shown).count(),
            1,
            "the file is named once: {msg}"
        );
        // Tensors before the cut still read; the cut one does not.
        let first = ckpt.tensors().next().unwrap().1.name.clone();
        assert!(ckpt.get(&first).is_ok());
        assert!(matches!(ckpt.get(&last.name), Err(Error::Read { .. })));
    }
}
