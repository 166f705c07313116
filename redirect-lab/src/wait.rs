//! Waiting for a condition, the one way the lab and the tests do it.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// How often [`eventually`] checks.
const EVERY: Duration = Duration::from_millis(10);

/// How much slower than a loaded 2-CPU machine this one runs: `REDIRECT_TIME_SCALE` (a whole
/// number, default 1). `cargo xtask test --kernel` sets it for guests under software
/// emulation, where every step takes several times longer; bounds that assert speed on real
/// hardware are stretched by it, never removed.
pub fn time_scale() -> u32 {
    std::env::var("REDIRECT_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n >= 1)
        .unwrap_or(1)
}

/// `d` stretched by [`time_scale`].
pub fn scaled(d: Duration) -> Duration {
    d * time_scale()
}

/// Checks `condition` every 10 ms until it gives `Some`, for at most `timeout` (stretched by
/// [`time_scale`]); the error names `what` was awaited. Bounds are for a loaded 2-CPU machine:
/// give the time something may take there, not the time it takes on an idle one.
pub fn eventually<T>(
    timeout: Duration,
    what: &str,
    mut condition: impl FnMut() -> Option<T>,
) -> Result<T> {
    let timeout = scaled(timeout);
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = condition() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(EVERY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_value_or_times_out() {
        let mut n = 0;
        let v = eventually(Duration::from_secs(1), "three", || {
            n += 1;
            (n == 3).then_some(n)
        });
        assert_eq!(v.unwrap(), 3);
        let e = eventually(Duration::from_millis(30), "never", || None::<()>).unwrap_err();
        assert!(e.to_string().contains("waiting for never"), "{e}");
    }
}
