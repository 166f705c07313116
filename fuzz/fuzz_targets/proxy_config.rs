//! Arbitrary `proxy.istio.io/config` annotations: parsed or refused, never a panic, and
//! never slow (the size and nesting bounds are checked before the YAML parser sees them).
#![no_main]

use libfuzzer_sys::fuzz_target;
use redirect_user::{policy::limits, sources::kube};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let started = std::time::Instant::now();
    if kube::proxy_config(text).is_ok() {
        assert!(limits::check_pod_document(text).is_ok());
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(2), "slow: {} bytes", text.len());
});
