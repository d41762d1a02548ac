//! soclink: a log collection agent and SOC relay.
//!
//! Data flows one way through these modules:
//!
//! - [`config`]: the agent's and relay's TOML configuration, defaults and validation.
//! - [`event`]: the Event record and its NDJSON encoding (one JSON object per line).
//! - [`batch`]: groups encoded events into batches, gzip-compresses each once, and
//!   describes it with a [`batch::BatchMeta`] that travels with it.
//! - [`sources`]: where events come from (files today).
//! - [`spool`]: the durable, segmented on-disk queue; the one durability boundary.
//! - [`agent`]: wires sources → batcher → spool → shipper together.
//! - [`reload`]: `soclink agent` as generations: SIGHUP applies a changed config.
//! - [`protocol`]: the wire frames between agent and relay, with hard limits.
//! - [`tls`]: rustls configurations from PEM files; identity from certificates.
//! - [`identity`]: the identity rule (NFC, lower-case ASCII, no invisible characters)
//!   and the registry that keeps two agents from looking alike.
//! - [`certs`]: throwaway development certificates (`soclink certs dev`).
//! - [`ship`]: the agent side of the link: window, acknowledgements, reconnects.
//! - [`relay`]: the receiving end: TLS server, dedupe, durable store.
//! - [`incident`]: incident records and deadlines, evidence bundles, bundle verification.
//! - [`control`]: the local control socket (Unix, JSON) the CLI talks to.
//! - [`status`]: `soclink status`: snapshots of live counters and their rendering.
//! - [`metrics`]: the same snapshots as a Prometheus `GET /metrics` endpoint.
//! - [`service`]: sd_notify and the watchdog when run as a systemd service.
//!
//! `fuzzing` (hidden) holds the fuzz target bodies shared by `fuzz/` and `tests/fuzz_targets.rs`.
//! - [`pool`]: reused batch buffers and deflate states (bounded agent memory).
#![forbid(unsafe_code)]

pub mod agent;
pub mod batch;
pub mod certs;
pub mod cli;
pub mod clock;
pub mod config;
pub mod event;
pub mod fs;
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
pub mod incident;
pub mod intel;
pub mod ops;
pub mod pool;
pub mod protocol;
pub mod relay;
pub mod ship;
pub mod spool;
pub mod tls;
pub mod util;
