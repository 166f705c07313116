//! Any bytes as a pods file: the parser must return (a desired set or an error), never panic,
//! and every accepted pod must satisfy the invariants the reconciler relies on.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(desired) = redirect_user::pods::parse_file(data) {
        let mut keys = std::collections::BTreeSet::new();
        for pod in &desired.pods {
            assert!(!pod.key.name.is_empty() && pod.key.name.len() <= 253);
            assert!(keys.insert(pod.key.clone()), "duplicate pod accepted");
            for p in &pod.policy.exclude_outbound_ports {
                assert_ne!(*p, 0);
            }
        }
        for e in &desired.rejected {
            assert!(!e.pod.is_empty() && !e.field.is_empty() && !e.reason.is_empty());
        }
    }
});
