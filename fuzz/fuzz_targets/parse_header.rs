//! Fuzzes header parsing: any bytes must give a header or an error, never a panic, and
//! an accepted header must satisfy the invariants the loader relies on.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weightlift_format::Header;

fuzz_target!(|data: &[u8]| {
    let Ok(header) = Header::from_file_bytes(data) else {
        return;
    };
    // The streaming reader agrees with the in-memory parser.
    let streamed = Header::read_from(&mut &data[..], data.len() as u64).expect("read_from agrees");
    assert_eq!(streamed.tensors(), header.tensors());
    assert_eq!(header.file_len(), data.len() as u64);
    let mut at = 0;
    for t in header.tensors() {
        assert_eq!(t.data_offsets.0, at, "contiguous");
        at = t.data_offsets.1;
        assert!(t.data_offsets.1 <= header.data_len(), "in bounds");
        let bytes = t.dtype.byte_len(t.num_elements()).expect("size checked");
        assert_eq!(bytes as u64, t.byte_len());
        assert_eq!(header.get(&t.name).map(|x| &x.name), Some(&t.name));
    }
    assert_eq!(at, header.data_len());
});
