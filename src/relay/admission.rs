//! Who gets a connection slot at the relay, before and right after the TLS handshake.
//!
//! - **Per source address, before authentication**: at most
//!   `max_unauthenticated_per_address` connections from one IP address may be in the
//!   phase before the client certificate is verified (TCP accepted, handshake and Hello
//!   pending). Past it, a new connection from that address is closed at once, so idle
//!   sockets from one host cannot hold every slot of `max_connections` while agents
//!   elsewhere wait. Authenticated connections do not count against it (an agency NAT
//!   carries many agents).
//! - **Past `max_connections`**: a connection is answered at once, not left in the
//!   kernel's accept queue until the agent's connect times out: up to
//!   [`OVERFLOW_SLOTS`] at a time get the TLS handshake and an `Error` frame
//!   (`Unavailable`, "retry in about N s"); beyond those, the socket is closed.
//! - **Identity**: the certificate's identity ([`crate::tls::peer_identity`], already
//!   normalized) must not look like another agent's ([`Identities`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use crate::identity::Identities;
use crate::util::lock;

/// Connections past `max_connections` that are told "busy" over TLS at the same time;
/// beyond these the relay closes the socket without a word.
pub const OVERFLOW_SLOTS: usize = 64;
/// The retry hint sent with "busy" (about the agents' first backoff).
pub const BUSY_RETRY_SECS: u64 = 30;

/// Admission state shared by all listeners of one relay.
pub struct Admission {
    pub identities: Identities,
    max_per_address: usize,
    unauthenticated: Mutex<HashMap<IpAddr, usize>>,
}

/// A connection from `ip` in its unauthenticated phase; counted until dropped.
pub struct Unauthenticated {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Drop for Unauthenticated {
    fn drop(&mut self) {
        let mut m = lock(&self.admission.unauthenticated);
        if let Some(n) = m.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

impl Admission {
    pub fn new(identities: Identities, max_per_address: usize) -> Arc<Admission> {
        Arc::new(Admission {
            identities,
            max_per_address: max_per_address.max(1),
            unauthenticated: Mutex::default(),
        })
    }

    /// A slot for one more unauthenticated connection from `ip`, or `None` when that
    /// address already holds `max_unauthenticated_per_address`.
    pub fn unauthenticated(self: &Arc<Self>, ip: IpAddr) -> Option<Unauthenticated> {
        let mut m = lock(&self.unauthenticated);
        let n = m.entry(ip).or_insert(0);
        if *n >= self.max_per_address {
            return None;
        }
        *n += 1;
        Some(Unauthenticated {
            admission: self.clone(),
            ip,
        })
    }

    /// How many connections from `ip` are before authentication now (tests, status).
    pub fn pending(&self, ip: IpAddr) -> usize {
        lock(&self.unauthenticated).get(&ip).copied().unwrap_or(0)
    }
}

/// Descriptors the relay needs besides its connections (store files, listeners,
/// control socket, metrics).
pub const SPARE_DESCRIPTORS: u64 = 256;

/// Raise the soft descriptor limit to the hard one (systemd's soft default is 1024
/// whatever LimitNOFILE allows) and say so when `max_connections` still does not fit:
/// past the limit accept fails with EMFILE, and agents would wait instead of being
/// answered busy. Returns the soft limit in force.
pub fn fit_descriptors(max_connections: usize) -> Option<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    let soft = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    let need = max_connections as u64 + OVERFLOW_SLOTS as u64 + SPARE_DESCRIPTORS;
    if need > soft {
        tracing::warn!(
            "max_connections = {max_connections} needs about {need} descriptors but the process may open {soft}: raise LimitNOFILE (the unit sets 16384) or lower max_connections"
        );
    }
    Some(soft)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_address_slots_come_back() {
        let a = Admission::new(Identities::default(), 2);
        let ip: IpAddr = "127.0.0.2".parse().unwrap();
        let other: IpAddr = "127.0.0.3".parse().unwrap();
        let s1 = a.unauthenticated(ip).unwrap();
        let _s2 = a.unauthenticated(ip).unwrap();
        assert!(a.unauthenticated(ip).is_none());
        assert!(a.unauthenticated(other).is_some());
        drop(s1);
        assert_eq!(a.pending(ip), 1);
        assert!(a.unauthenticated(ip).is_some());
    }
}
