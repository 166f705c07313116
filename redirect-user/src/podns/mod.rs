//! A pod's network namespace: finding it ([`netns`], [`netns_by_route`]), entering it and naming it
//! ([`nsenter`]), talking rtnetlink in it ([`rtnl`]), what it shows ([`interfaces`], [`userns`],
//! [`listeners`], [`procfs`]) and what is set up in it ([`tproxy`], [`vm_ifaces`]).

pub mod interfaces;
pub(crate) mod listeners;
pub(crate) mod netns;
pub(crate) mod netns_by_route;
pub(crate) mod nsenter;
pub(crate) mod procfs;
pub(crate) mod rtnl;
pub(crate) mod tproxy;
pub(crate) mod userns;
pub(crate) mod vm_ifaces;
