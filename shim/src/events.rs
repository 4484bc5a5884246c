//! Events to containerd (`/tasks/create`, `/tasks/exit`, …): every part of the shim queues its
//! events on ONE ordered channel ([`EventSender`]); a single forwarder task takes them in order and
//! hands each to the [`Publish`] sink (containerd's event service in production, see
//! [`RemotePublisher`]) with a deadline. Queuing never waits, so a slow or stuck containerd
//! never stalls a Task RPC; a publish that misses its deadline is logged and dropped, and the
//! forwarder goes on with the next event (as runc-shim's `forward` does).

use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim_protos::protobuf::MessageDyn;
use containerd_shim_protos::ttrpc::context;
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// How long one publish may take before the event is dropped (containerd's Go shims and
/// runc-shim use the same bound).
pub const PUBLISH_DEADLINE: Duration = Duration::from_secs(5);

/// One event for containerd: its topic (`containerd_shim_protos::topics`) and message.
pub struct Event {
    /// The topic, e.g. `/tasks/exit`.
    pub topic: String,
    /// The event message (`containerd_shim_protos::events::task::TaskExit`, …).
    pub message: Box<dyn MessageDyn>,
}

/// Where the forwarder delivers events. The namespace is the shim's containerd namespace.
#[async_trait]
pub trait Publish: Send + Sync + 'static {
    /// Delivers one event; `deadline` bounds the call (the forwarder also enforces it).
    async fn publish(
        &self,
        namespace: &str,
        event: Event,
        deadline: Duration,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;
}

#[async_trait]
impl Publish for RemotePublisher {
    async fn publish(
        &self,
        namespace: &str,
        event: Event,
        deadline: Duration,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let ctx = context::with_timeout(deadline.as_nanos().try_into().unwrap_or(i64::MAX));
        RemotePublisher::publish(self, ctx, &event.topic, namespace, event.message)
            .await
            .map_err(Into::into)
    }
}

/// The sending end of the event channel; cheap to clone, never blocks.
#[derive(Clone)]
pub struct EventSender {
    tx: mpsc::UnboundedSender<Event>,
}

impl EventSender {
    /// Queues `message` under `topic`. Events keep the order in which they are queued.
    pub fn send(&self, topic: &str, message: impl MessageDyn) {
        let event = Event {
            topic: topic.to_owned(),
            message: Box::new(message),
        };
        if self.tx.send(event).is_err() {
            // Only after the forwarder's runtime has gone away, i.e. while the shim exits.
            debug!("event {topic} not published: the event forwarder has stopped");
        }
    }
}

/// Starts the forwarder task that publishes to `sink`, in order, every event sent through the
/// returned sender. It runs until every sender is dropped.
pub fn forwarder(namespace: &str, sink: impl Publish) -> EventSender {
    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    let namespace = namespace.to_owned();
    tokio::spawn(async move {
        while let Some(event) = rx.recv().await {
            let topic = event.topic.clone();
            match tokio::time::timeout(
                PUBLISH_DEADLINE,
                sink.publish(&namespace, event, PUBLISH_DEADLINE),
            )
            .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!("publish {topic}: {e}"),
                Err(_) => warn!("publish {topic}: no answer within {PUBLISH_DEADLINE:?}; dropped"),
            }
        }
        debug!("event forwarder ends");
    });
    EventSender { tx }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim_protos::events::task::{TaskExit, TaskStart};
    use std::sync::{Arc, Mutex};

    /// Records topics; the first publish hangs past the deadline.
    struct Slow {
        seen: Arc<Mutex<Vec<String>>>,
        done: mpsc::UnboundedSender<()>,
    }

    #[async_trait]
    impl Publish for Slow {
        async fn publish(
            &self,
            _ns: &str,
            event: Event,
            _deadline: Duration,
        ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
            let first = {
                let mut seen = self.seen.lock().unwrap();
                seen.push(event.topic.clone());
                seen.len() == 1
            };
            if first {
                std::future::pending::<()>().await;
            }
            let _ = self.done.send(());
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stuck_publish_is_dropped_and_order_is_kept() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (done, mut done_rx) = mpsc::unbounded_channel();
        let tx = forwarder(
            "ns",
            Slow {
                seen: seen.clone(),
                done,
            },
        );
        // Queuing returns at once although the sink is stuck.
        tx.send("/tasks/start", TaskStart::default());
        tx.send("/tasks/exit", TaskExit::default());
        tx.send("/tasks/delete", TaskExit::default());
        done_rx.recv().await.unwrap();
        done_rx.recv().await.unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            ["/tasks/start", "/tasks/exit", "/tasks/delete"]
        );
    }
}
