//! Operating a running agent or relay: `soclink status` snapshots and their
//! rendering, the Prometheus endpoint, the service manager (sd_notify, watchdog) and
//! the local control socket.

pub mod control;
pub mod metrics;
pub mod service;
pub mod status;
