//! Per-pod counters in `POD_COUNTERS`.

use redirect_common::PodCounters;

use crate::maps::POD_COUNTERS;

/// Applies `f` to this CPU's counters of pod `pod_id` (no-op for an out-of-range id).
#[inline(always)]
pub fn count(pod_id: u32, f: impl FnOnce(&mut PodCounters)) {
    if let Some(c) = POD_COUNTERS.get_ptr_mut(pod_id) {
        // SAFETY: a per-CPU slot, only this CPU writes it while the program runs.
        unsafe { f(&mut *c) }
    }
}
