//! What the daemon shows: `redirectd status` ([`status`]) and the Prometheus metrics with
//! `/healthz` and `/readyz` ([`metrics`]).

pub(crate) mod metrics;
pub mod status;
