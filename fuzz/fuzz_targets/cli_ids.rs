//! Parsing of what users type: sizes (`vdi create --size`), VDI ids and snapshot ids.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(n) = cli::format::parse_size(s) {
        // A parsed size must round-trip through its exact byte form.
        assert_eq!(cli::format::parse_size(&n.to_string()), Ok(n));
    }
    if let Ok(id) = s.parse::<vdi::VdiId>() {
        assert_eq!(id.to_string().parse::<vdi::VdiId>(), Ok(id));
    }
    if let Ok(id) = s.parse::<vdi::SnapshotId>() {
        assert_eq!(id.to_string().parse::<vdi::SnapshotId>(), Ok(id));
    }
});
