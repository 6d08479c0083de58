//! One test per validation rule and per accepted edge case, through the public API.

use weightlift_format::{
    Dtype, FormatError, Header, MAX_HEADER_SIZE, PREFIX_LEN, TensorRef, serialize,
};

/// A file made of a header JSON and `data_len` bytes of data.
fn file(json: &str, data_len: usize) -> Vec<u8> {
    let mut f = (json.len() as u64).to_le_bytes().to_vec();
    f.extend_from_slice(json.as_bytes());
    f.extend((0..data_len).map(|i| i as u8));
    f
}

fn parse(json: &str, data_len: usize) -> Result<Header, FormatError> {
    Header::from_file_bytes(&file(json, data_len))
}

#[test]
fn too_small_for_prefix() {
    for len in 0..8 {
        let err = Header::from_file_bytes(&vec![0u8; len]).unwrap_err();
        assert!(matches!(err, FormatError::HeaderTooSmall { len: l } if l == len as u64));
    }
}

#[test]
fn header_length_over_limit() {
    let mut f = (MAX_HEADER_SIZE + 1).to_le_bytes().to_vec();
    f.extend_from_slice(b"{}");
    let err = Header::from_file_bytes(&f).unwrap_err();
    assert!(
        matches!(err, FormatError::HeaderTooLarge { header_len } if header_len == MAX_HEADER_SIZE + 1)
    );
    let mut f = u64::MAX.to_le_bytes().to_vec();
    f.extend_from_slice(b"{}");
    assert!(matches!(
        Header::from_file_bytes(&f),
        Err(FormatError::HeaderTooLarge { .. })
    ));
}

#[test]
fn header_length_past_end_of_file() {
    let mut f = 100u64.to_le_bytes().to_vec();
    f.extend_from_slice(b"{}");
    let err = Header::from_file_bytes(&f).unwrap_err();
    assert!(matches!(
        err,
        FormatError::HeaderOutOfBounds {
            header_len: 100,
            file_len: 10
        }
    ));
    assert!(
        err.to_string().contains("past the end of the file"),
        "{err}"
    );
}

#[test]
fn read_from_checks_length_before_allocating() {
    // A reader holding only the prefix: a 99 MB header must be refused from the file
    // length alone, before any buffer of that size exists.
    let prefix = 99_000_000u64.to_le_bytes();
    let err = Header::read_from(&mut &prefix[..], 1000).unwrap_err();
    assert!(
        matches!(err, FormatError::HeaderOutOfBounds { .. }),
        "{err}"
    );
    let err = Header::read_from(&mut &prefix[..], 4).unwrap_err();
    assert!(
        matches!(err, FormatError::HeaderTooSmall { len: 4 }),
        "{err}"
    );
}

#[test]
fn read_from_matches_from_file_bytes() {
    let f = file(
        r#"{"a":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}}"#,
        3,
    );
    let h = Header::read_from(&mut &f[..], f.len() as u64).unwrap();
    assert_eq!(h.tensors(), Header::from_file_bytes(&f).unwrap().tensors());
    // A reader that ends early is an I/O error, not a panic.
    let err = Header::read_from(&mut &f[..10], f.len() as u64).unwrap_err();
    assert!(matches!(err, FormatError::Io { .. }), "{err}");
}

#[test]
fn header_not_utf8() {
    let mut f = 4u64.to_le_bytes().to_vec();
    f.extend_from_slice(&[b'{', 0xff, b'}', b' ']);
    let err = Header::from_file_bytes(&f).unwrap_err();
    assert!(
        matches!(err, FormatError::HeaderNotUtf8 { valid_up_to: 1 }),
        "{err}"
    );
}

#[test]
fn header_must_be_a_json_object() {
    for json in ["", "[]", "null", "1", "\"x\"", "{", "{} x", "{\"a\":1}"] {
        let err = parse(json, 0).unwrap_err();
        assert!(
            matches!(err, FormatError::HeaderJson { .. }),
            "{json}: {err}"
        );
    }
    // Whitespace around the object is allowed (writers pad with spaces).
    assert!(parse("  {}   ", 0).unwrap().is_empty());
}

#[test]
fn empty_header_is_an_empty_file() {
    let h = parse("{}", 0).unwrap();
    assert!(h.is_empty());
    assert_eq!(h.data_len(), 0);
    assert_eq!(h.data_start(), PREFIX_LEN + 2);
    assert!(h.metadata().is_none());
}

#[test]
fn metadata_must_map_strings_to_strings() {
    let h = parse(r#"{"__metadata__":{"format":"pt","k":"v"}}"#, 0).unwrap();
    let m = h.metadata().unwrap();
    assert_eq!(m.get("format").map(String::as_str), Some("pt"));
    assert_eq!(m.len(), 2);
    assert!(
        parse(r#"{"__metadata__":null}"#, 0)
            .unwrap()
            .metadata()
            .is_none()
    );
    for bad in [
        r#"{"__metadata__":{"k":1}}"#,
        r#"{"__metadata__":{"k":null}}"#,
        r#"{"__metadata__":{"k":["v"]}}"#,
        r#"{"__metadata__":"v"}"#,
        r#"{"__metadata__":[]}"#,
        r#"{"__metadata__":{},"__metadata__":{}}"#,
    ] {
        let err = parse(bad, 0).unwrap_err();
        assert!(
            matches!(err, FormatError::HeaderJson { .. }),
            "{bad}: {err}"
        );
        assert!(err.to_string().contains("__metadata__"), "{err}");
    }
}

#[test]
fn unknown_dtype_names_the_tensor() {
    let err = parse(
        r#"{"w.0":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}}"#,
        16,
    )
    .unwrap_err();
    assert!(matches!(err, FormatError::HeaderJson { .. }));
    let msg = err.to_string();
    assert!(msg.contains("\"w.0\"") && msg.contains("F128"), "{msg}");
    // Names are case-sensitive, as in the reference.
    assert!(
        parse(
            r#"{"w":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}}"#,
            4
        )
        .is_err()
    );
}

#[test]
fn shape_and_offsets_must_be_unsigned_integers() {
    for bad in [
        r#"{"w":{"dtype":"U8","shape":[-1],"data_offsets":[0,0]}}"#,
        r#"{"w":{"dtype":"U8","shape":[1.0],"data_offsets":[0,1]}}"#,
        r#"{"w":{"dtype":"U8","shape":[18446744073709551616],"data_offsets":[0,1]}}"#,
        r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}}"#,
        r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[1]}}"#,
        r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[-1,0]}}"#,
        r#"{"w":{"dtype":"U8","shape":1,"data_offsets":[0,1]}}"#,
        r#"{"w":{"dtype":"U8","data_offsets":[0,1]}}"#,
        r#"{"w":{"dtype":"U8","shape":[1]}}"#,
        r#"{"w":{"shape":[1],"data_offsets":[0,1]}}"#,
        r#"{"w":{"dtype":"U8","dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#,
        r#"{"w":3}"#,
    ] {
        let err = parse(bad, 1).unwrap_err();
        assert!(
            matches!(err, FormatError::HeaderJson { .. }),
            "{bad}: {err}"
        );
        assert!(err.to_string().contains("\"w\""), "{err}");
    }
}

#[test]
fn unknown_tensor_fields_are_ignored_like_the_reference() {
    let h = parse(
        r#"{"w":{"dtype":"U8","shape":[2],"data_offsets":[0,2],"extra":{"x":[1]}}}"#,
        2,
    )
    .unwrap();
    assert_eq!(h.get("w").unwrap().shape, vec![2]);
}

#[test]
fn duplicate_tensor_is_rejected() {
    let json = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
    let err = parse(json, 1).unwrap_err();
    assert!(
        matches!(&err, FormatError::DuplicateTensor { name } if name == "a"),
        "{err}"
    );
    assert_eq!(err.tensor(), Some("a"));
}

#[test]
fn offsets_must_start_at_zero() {
    let err = parse(
        r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#,
        2,
    )
    .unwrap_err();
    assert!(
        matches!(&err, FormatError::InvalidOffsets { name, start: 1, expected_start: 0, .. } if name == "a"),
        "{err}"
    );
}

#[test]
fn offsets_must_not_leave_gaps_or_overlap() {
    let gap = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"b":{"dtype":"U8","shape":[1],"data_offsets":[2,3]}}"#;
    let err = parse(gap, 3).unwrap_err();
    assert!(
        matches!(&err, FormatError::InvalidOffsets { name, expected_start: 1, .. } if name == "b"),
        "{err}"
    );
    let overlap = r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}"#;
    let err = parse(overlap, 3).unwrap_err();
    assert!(
        matches!(&err, FormatError::InvalidOffsets { name, .. } if name == "b"),
        "{err}"
    );
}

#[test]
fn offsets_must_be_ordered() {
    let err = parse(r#"{"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},"b":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},"c":{"dtype":"U8","shape":[1],"data_offsets":[1,0]}}"#, 1).unwrap_err();
    assert!(matches!(&err, FormatError::InvalidOffsets { .. }), "{err}");
    let err = parse(
        r#"{"c":{"dtype":"U8","shape":[1],"data_offsets":[2,1]}}"#,
        2,
    )
    .unwrap_err();
    assert!(err.to_string().contains("start <= end"), "{err}");
}

#[test]
fn key_order_need_not_match_data_order() {
    let json = r#"{"z":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U16","shape":[2],"data_offsets":[1,5]}}"#;
    let h = parse(json, 5).unwrap();
    let names: Vec<&str> = h.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["z", "a"]);
    let by_name: Vec<&str> = h.tensors_by_name().map(|t| t.name.as_str()).collect();
    assert_eq!(by_name, ["a", "z"]);
    assert_eq!(h.get("a").unwrap().data_offsets, (1, 5));
    assert!(h.get("b").is_none());
}

#[test]
fn size_overflow() {
    let json = r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}}"#;
    let err = parse(json, 4).unwrap_err();
    assert!(
        matches!(&err, FormatError::SizeOverflow { name, .. } if name == "w"),
        "{err}"
    );
    // Element count fits, but times 64 bits does not.
    let json = r#"{"w":{"dtype":"F64","shape":[1152921504606846976],"data_offsets":[0,8]}}"#;
    assert!(matches!(
        parse(json, 8),
        Err(FormatError::SizeOverflow { .. })
    ));
}

#[test]
fn sub_byte_tensors_must_fill_whole_bytes() {
    let err = parse(
        r#"{"w":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}"#,
        2,
    )
    .unwrap_err();
    assert!(
        matches!(
            &err,
            FormatError::PartialByte {
                elements: 3,
                dtype: Dtype::F4,
                ..
            }
        ),
        "{err}"
    );
    let h = parse(
        r#"{"w":{"dtype":"F4","shape":[2,3],"data_offsets":[0,3]}}"#,
        3,
    )
    .unwrap();
    assert_eq!(h.get("w").unwrap().byte_len(), 3);
    let h = parse(
        r#"{"w":{"dtype":"F6_E3M2","shape":[4],"data_offsets":[0,3]}}"#,
        3,
    )
    .unwrap();
    assert_eq!(h.get("w").unwrap().byte_len(), 3);
    assert!(matches!(
        parse(
            r#"{"w":{"dtype":"F6_E2M3","shape":[2],"data_offsets":[0,2]}}"#,
            2
        ),
        Err(FormatError::PartialByte { .. })
    ));
}

#[test]
fn byte_span_must_match_shape() {
    let err = parse(
        r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
        4,
    )
    .unwrap_err();
    assert!(
        matches!(
            &err,
            FormatError::SizeMismatch {
                expected: 8,
                actual: 4,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("needs 8"), "{err}");
}

#[test]
fn data_region_must_be_exactly_covered() {
    let json = r#"{"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#;
    let short = parse(json, 3).unwrap_err();
    assert!(matches!(
        short,
        FormatError::DataLengthMismatch {
            expected: 4,
            actual: 3
        }
    ));
    assert!(short.to_string().contains("truncated"), "{short}");
    let long = parse(json, 5).unwrap_err();
    assert!(matches!(
        long,
        FormatError::DataLengthMismatch {
            expected: 4,
            actual: 5
        }
    ));
    assert!(parse(json, 4).is_ok());
}

#[test]
fn zero_sized_and_zero_dim_tensors() {
    let json = r#"{"empty":{"dtype":"F32","shape":[0,5],"data_offsets":[0,0]},"scalar":{"dtype":"F64","shape":[],"data_offsets":[0,8]},"e2":{"dtype":"BF16","shape":[3,0],"data_offsets":[8,8]}}"#;
    let h = parse(json, 8).unwrap();
    assert_eq!(h.len(), 3);
    let scalar = h.get("scalar").unwrap();
    assert_eq!(scalar.num_elements(), 1);
    assert_eq!(scalar.byte_len(), 8);
    assert_eq!(h.get("empty").unwrap().num_elements(), 0);
    assert_eq!(h.get("e2").unwrap().data_offsets, (8, 8));
}

#[test]
fn every_dtype_parses_with_its_size() {
    for d in Dtype::ALL {
        // 8 elements fill whole bytes for every dtype.
        let bytes = d.bits();
        let json = format!(r#"{{"t":{{"dtype":"{d}","shape":[2,4],"data_offsets":[0,{bytes}]}}}}"#);
        let h = parse(&json, bytes).unwrap_or_else(|e| panic!("{d}: {e}"));
        let t = h.get("t").unwrap();
        assert_eq!(t.dtype, d);
        assert_eq!(t.byte_len() as usize, bytes);
    }
}

#[test]
fn writer_output_parses_and_is_padded() {
    let a = [1u8, 2, 3];
    let b = 7.5f64.to_le_bytes();
    let c = [9u8; 4];
    let mut meta = weightlift_format::Metadata::new();
    meta.insert("format".into(), "pt".into());
    let f = serialize(
        &[
            TensorRef {
                name: "a",
                dtype: Dtype::U8,
                shape: &[3],
                data: &a,
            },
            TensorRef {
                name: "b",
                dtype: Dtype::F64,
                shape: &[],
                data: &b,
            },
            TensorRef {
                name: "c",
                dtype: Dtype::F16,
                shape: &[1, 2],
                data: &c,
            },
        ],
        Some(&meta),
    )
    .unwrap();
    let h = Header::from_file_bytes(&f).unwrap();
    assert_eq!(h.data_start() % 8, 0);
    // Decreasing alignment: F64, then F16, then U8.
    let order: Vec<&str> = h.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(order, ["b", "c", "a"]);
    let data = &f[h.data_start() as usize..];
    let b_info = h.get("b").unwrap();
    assert_eq!(
        &data[b_info.data_offsets.0 as usize..b_info.data_offsets.1 as usize],
        &b
    );
    assert_eq!(h.metadata(), Some(&meta));
}

#[test]
fn writer_rejects_bad_tensors() {
    let err = serialize(
        &[TensorRef {
            name: "a",
            dtype: Dtype::F32,
            shape: &[2],
            data: &[0; 4],
        }],
        None,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            FormatError::WriteSizeMismatch {
                expected: Some(8),
                actual: 4,
                ..
            }
        ),
        "{err}"
    );
    let err = serialize(
        &[
            TensorRef {
                name: "a",
                dtype: Dtype::F32,
                shape: &[1],
                data: &[0; 4],
            },
            TensorRef {
                name: "a",
                dtype: Dtype::U8,
                shape: &[1],
                data: &[0; 1],
            },
        ],
        None,
    )
    .unwrap_err();
    assert!(matches!(err, FormatError::DuplicateTensor { .. }), "{err}");
    let err = serialize(
        &[TensorRef {
            name: "__metadata__",
            dtype: Dtype::U8,
            shape: &[0],
            data: &[],
        }],
        None,
    )
    .unwrap_err();
    assert!(matches!(err, FormatError::ReservedName { .. }), "{err}");
    let err = serialize(
        &[TensorRef {
            name: "f4",
            dtype: Dtype::F4,
            shape: &[3],
            data: &[0; 2],
        }],
        None,
    )
    .unwrap_err();
    assert!(
        matches!(err, FormatError::WriteSizeMismatch { expected: None, .. }),
        "{err}"
    );
}

#[test]
fn write_file_is_atomic_and_replaces() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let data = [5u8; 16];
    let t = [TensorRef {
        name: "w",
        dtype: Dtype::F32,
        shape: &[4],
        data: &data,
    }];
    weightlift_format::write_file(&path, &t, None).unwrap();
    weightlift_format::write_file(&path, &t, None).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes, serialize(&t, None).unwrap());
    // Only the final file remains: no temporary left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    // A failed fill leaves the existing file untouched and no temporary behind.
    let err = weightlift_format::write_file_with(&path, |w| {
        std::io::Write::write_all(w, b"partial")?;
        Err(std::io::Error::other("disk full"))
    })
    .unwrap_err();
    assert!(err.to_string().contains("disk full"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn twenty_thousand_tensor_header() {
    let n = 20_000;
    let names: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "model.layers.{}.mlp.experts.{}.down_proj.weight",
                i / 128,
                i % 128
            )
        })
        .collect();
    let data = vec![0u8; 4];
    let tensors: Vec<TensorRef> = names
        .iter()
        .map(|name| TensorRef {
            name,
            dtype: Dtype::BF16,
            shape: &[2],
            data: &data,
        })
        .collect();
    let f = serialize(&tensors, None).unwrap();
    let h = Header::from_file_bytes(&f).unwrap();
    assert_eq!(h.len(), n);
    assert_eq!(h.data_len(), 4 * n as u64);
    for name in names.iter().step_by(997) {
        assert_eq!(&h.get(name).unwrap().name, name);
    }
}
