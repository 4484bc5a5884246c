//! Event-loop dispatch of the vsock device, by token (the epoll data of each registration),
//! apart from the data path: queue notifications carry their queue index
//! ([`register_queue_events`]), every host socket the muxer watches carries
//! [`muxer::EVENT_TOKEN`](super::muxer::EVENT_TOKEN) and is handed to the muxer.

use event_manager::{EventOps, Events, MutEventSubscriber};

use super::muxer::EVENT_TOKEN;
use super::{Vsock, TXQ};
use crate::devices::virtio::{fired_queue, register_queue_events};

impl MutEventSubscriber for Vsock {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if self.reset_pending {
            self.reset_pending = false;
            self.muxer.close_all(ops);
        }
        if events.data() == EVENT_TOKEN {
            let fd = events.fd();
            if self.muxer.owns(fd) {
                self.muxer.handle_event(fd, events.event_set(), ops);
            } else {
                // A socket closed (and its registration removed) by an earlier event of the
                // same epoll batch.
                tracing::warn!("vsock: event for unknown fd {fd}");
                let _ = ops.remove(events);
            }
        } else {
            match fired_queue(&self.evts, &events) {
                Some(TXQ) => self.process_tx(ops),
                // RXQ: the guest posted buffers; EVQ: a reset woke us (handled above).
                Some(_) => {}
                None => {
                    tracing::warn!("vsock: event with unknown token {}", events.data());
                    let _ = ops.remove(events);
                }
            }
        }
        self.process_rx(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        register_queue_events(&self.evts, ops, "vsock");
        self.muxer.init(ops);
    }
}
