//! Arbitrary values for every annotation we read: parsed or rejected naming the annotation,
//! never a panic; accepted CIDRs have their host bits cleared and a valid prefix length.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use redirect_user::policy::annotations::{self, RangeSelection};

const KEYS: &[&str] = &[
    annotations::EXCLUDE_OUTBOUND_PORTS,
    annotations::INCLUDE_OUTBOUND_PORTS,
    annotations::EXCLUDE_OUTBOUND_RANGES,
    annotations::INCLUDE_OUTBOUND_RANGES,
    annotations::EXCLUDE_INBOUND_PORTS,
    annotations::INCLUDE_INBOUND_PORTS,
    annotations::FAIL_MODE,
    annotations::ACCEL,
];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut ann = BTreeMap::new();
    for (i, part) in text.split('\u{1}').enumerate() {
        ann.insert(KEYS[i % KEYS.len()].to_string(), part.to_string());
    }
    match annotations::parse(&ann) {
        Ok(parsed) => {
            let p = parsed.policy;
            let mut ranges = p.exclude_outbound_ranges.clone();
            if let RangeSelection::Ranges(r) = &p.include_outbound_ranges {
                ranges.extend(r.iter().copied());
            }
            for c in ranges {
                let max = if c.addr.is_ipv4() { 32 } else { 128 };
                assert!(c.prefix_len <= max);
                let again: annotations::Cidr = c.to_string().parse().unwrap();
                assert_eq!(again, c, "host bits not cleared");
            }
        }
        Err(e) => assert!(KEYS.contains(&e.annotation.as_str())),
    }
});
