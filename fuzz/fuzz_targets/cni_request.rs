//! Arbitrary request lines on the CNI plugin's socket: a request or a refusal naming why,
//! never a panic; an accepted request survives a round trip through its own encoding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use redirect_user::cni::server;

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else { return };
    match server::parse_request(line) {
        Ok(r) => {
            let again = serde_json::to_string(&r).unwrap();
            assert_eq!(server::parse_request(&again).unwrap(), r);
        }
        Err(reason) => assert!(!reason.is_empty()),
    }
});
