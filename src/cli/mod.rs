//! The command groups of `soclink`, one file each; `main.rs` parses and dispatches.

pub mod bench;
pub mod demo;
pub mod incident;
