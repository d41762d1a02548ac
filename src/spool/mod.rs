//! TEMPORARY interface stand-in; replaced by the real spool.
use std::path::Path;
use std::time::Duration;
#[derive(Debug, thiserror::Error)]
pub enum SpoolError { #[error("x")] X }
#[derive(Default, Clone, Copy)]
pub struct SpoolOptions { pub max_size: u64, pub segment_size: u64 }
#[derive(Clone)]
pub struct Spool;
pub struct Record { pub seq: u64, pub meta: Vec<u8>, pub payload: Vec<u8> }
pub struct Recovery { pub messages: Vec<String> }
pub struct SpoolStats { pub first_unacked: u64, pub next_seq: u64, pub durable_seq: u64, pub bytes: u64, pub segments: usize, pub oldest_unacked_age: Option<Duration> }
impl Spool {
    pub fn open(_d: &Path, _o: SpoolOptions) -> Result<(Spool, Recovery), SpoolError> { todo!() }
    pub fn append(&self, _m: &[u8], _p: &[u8]) -> Result<u64, SpoolError> { todo!() }
    pub fn commit(&self) -> Result<u64, SpoolError> { todo!() }
    pub fn read(&self, _s: u64) -> Result<Option<Record>, SpoolError> { todo!() }
    pub fn ack(&self, _s: u64) -> Result<(), SpoolError> { todo!() }
    pub fn set_checkpointed(&self, _s: u64) -> Result<(), SpoolError> { todo!() }
    pub fn acked(&self) -> u64 { todo!() }
    pub fn stats(&self) -> SpoolStats { todo!() }
    pub fn is_full(&self) -> bool { todo!() }
    pub fn watch_durable(&self) -> tokio::sync::watch::Receiver<u64> { todo!() }
    pub fn watch_acked(&self) -> tokio::sync::watch::Receiver<u64> { todo!() }
    pub fn records_from(&self, _s: u64) -> Result<Vec<Result<Record, SpoolError>>, SpoolError> { todo!() }
}
