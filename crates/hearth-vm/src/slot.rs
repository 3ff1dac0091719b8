//! A warm pool slot ([`Prewarmed`]): what the driver hands the server's pool
//! and takes back at launch. Its own module so the `Driver` trait, the QEMU
//! driver and the pool all depend on it without depending on each other.

use crate::agent::AgentClient;
use crate::qmp::Qmp;
use crate::record::VmRecord;

/// A VM restored ahead of time under a slot name, its agent greeted, one
/// command run and then paused: what the server's warm pool holds
/// ([`Driver::prewarm`], [`Driver::launch_prewarmed`]).
#[derive(Debug)]
pub struct Prewarmed {
    /// The slot's record (named `.pool-ID`); its directory keeps that name
    /// when launched (QEMU reopens its disk by path).
    pub vm: VmRecord,
    pub(crate) agent: AgentClient,
    /// Kept open: QEMU serves one QMP client at a time, and a launch should
    /// not pay for the handshake.
    pub(crate) qmp: Qmp,
}
