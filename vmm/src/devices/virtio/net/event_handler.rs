//! Event-loop dispatch of the virtio-net device, by token (the epoll data of each
//! registration), apart from the data path: queue notifications carry their queue index
//! ([`register_queue_events`]), the tap carries [`TAP_TOKEN`].

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use std::os::fd::AsRawFd;

use super::device::{Net, TXQ};
use crate::devices::virtio::{fired_queue, register_queue_events};

/// Token of the tap's registration: after the two queue indices.
const TAP_TOKEN: u32 = 2;

impl MutEventSubscriber for Net {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        // Activation and reset run on a vCPU thread: the tap ioctl they need happens here.
        self.apply_offload();
        if events.data() == TAP_TOKEN {
            // Edge-triggered: remember the readiness until a read would block.
            self.tap_readable = true;
        } else {
            match fired_queue(&self.evts, &events) {
                Some(TXQ) => self.process_tx(),
                // RXQ: the guest posted receive buffers (or activation/reset woke us).
                Some(_) => {}
                None => tracing::warn!("virtio-net: event with unknown token {}", events.data()),
            }
        }
        self.process_rx();
    }

    fn init(&mut self, ops: &mut EventOps) {
        register_queue_events(&self.evts, ops, "virtio-net");
        let tap = Events::with_data_raw(
            self.tap.as_raw_fd(),
            TAP_TOKEN,
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        );
        if let Err(err) = ops.add(tap) {
            tracing::error!("virtio-net: cannot watch tap {}: {err:?}", self.tap.name());
        }
    }
}
