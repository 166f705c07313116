//! What a pod asks for and what it may take: its annotations parsed ([`annotations`] for
//! Istio's, [`linkerd`] for Linkerd's), the meshes' vocabulary ([`mesh`]), the policy compiled into map entries ([`rules`]), each pod's share of the
//! shared maps ([`room`]) and the input limits ([`limits`]).

pub mod annotations;
pub mod limits;
pub mod linkerd;
pub mod mesh;
pub mod room;
pub(crate) mod rules;
#[cfg(test)]
mod rules_in_kernel;
