//! Connecting a frontend's ring: map the ring grants, bind the event channel and build the
//! grant table that requests will use. [`Connector`] hides how, so the handshake runs against
//! real Xen ([`XenConnector`]) or simulated pieces in tests.

use std::sync::Arc;

use super::evtchn::XenEventChannel;
use super::gntdev::XenGrantTable;
use crate::Result;
use crate::abi::Abi;
use crate::event::EventChannel;
use crate::grant::GrantTable;
use crate::ring::BackRing;

/// What the frontend asked to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingSpec {
    /// The frontend domain.
    pub frontend_id: u32,
    /// Grant references of the ring pages, in order.
    pub ring_refs: Vec<u32>,
    /// The frontend's event channel port.
    pub event_channel: u32,
    /// The ABI of the ring slots.
    pub protocol: Abi,
}

/// A connected ring: everything a [`crate::server::RingServer`] needs.
#[derive(Debug)]
pub struct Connection<G, E> {
    /// The backend half of the ring.
    pub ring: BackRing,
    /// The frontend's grants, for the data pages of requests.
    pub grants: G,
    /// The event channel to the frontend.
    pub events: E,
}

/// Builds the connection of a ring from what the frontend published.
pub trait Connector {
    /// The grant table of a connected ring.
    type Grants: GrantTable + Send + Sync + 'static;
    /// The event channel of a connected ring.
    type Events: EventChannel + 'static;
    /// Maps the ring, binds the event channel and opens the grant table for `spec`.
    fn connect(&self, spec: &RingSpec) -> Result<Connection<Self::Grants, Self::Events>>;
}

/// The real connector: `/dev/xen/gntdev` and `/dev/xen/evtchn`.
#[derive(Debug, Clone, Copy, Default)]
pub struct XenConnector;

impl Connector for XenConnector {
    type Grants = XenGrantTable;
    type Events = XenEventChannel;

    fn connect(&self, spec: &RingSpec) -> Result<Connection<XenGrantTable, XenEventChannel>> {
        let grants = XenGrantTable::open(spec.frontend_id)?;
        let mem = grants.map_ring(&spec.ring_refs)?;
        let ring = BackRing::new(Arc::new(mem), spec.protocol)?;
        let events = XenEventChannel::bind(spec.frontend_id, spec.event_channel)?;
        Ok(Connection { ring, grants, events })
    }
}
