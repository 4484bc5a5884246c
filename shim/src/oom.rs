//! The OOM watcher of a pod VM: long-polls the agent's `GetOomEvent` and turns each answer into a
//! `/tasks/oom` event, until the agent connection ends (the VM stopped).

use containerd_shim_protos::events::task as ev;
use containerd_shim_protos::topics;
use moat_protocol::agent as pb;
use moat_protocol::agent_ttrpc_async::AgentClient;
use moat_protocol::ttrpc::context;
use tracing::{debug, info};

use crate::events::EventSender;

/// Starts watching `agent` for OOM kills; each becomes a `TaskOOM` event on `events`.
pub fn spawn_watcher(agent: AgentClient, events: EventSender) {
    tokio::spawn(async move {
        loop {
            let res = agent
                .get_oom_event(context::Context::default(), &pb::GetOomEventRequest::new())
                .await;
            match res {
                Ok(e) => {
                    info!("OOM in container {}", e.container_id);
                    events.send(
                        topics::TASK_OOM_EVENT_TOPIC,
                        ev::TaskOOM {
                            container_id: e.container_id,
                            ..Default::default()
                        },
                    );
                }
                Err(e) => {
                    debug!("OOM watcher ends: {e}");
                    break;
                }
            }
        }
    });
}
