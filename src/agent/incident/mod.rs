//! The agent's side of incidents: the outbox that ships records, bundles and reports
//! through the priority spool, the evidence bundle builder, and the host facts it
//! gathers. The record itself and the bundle verifier are shared ([`crate::incident`]).

pub mod bundle;
pub mod hostfacts;
pub mod outbox;
