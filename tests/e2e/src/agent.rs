//! E2E trials for the agent area (owned by its engineer; placeholder until they land).

use moat_e2e::Trial;

pub fn trials() -> Vec<Trial> {
    Vec::new()
}
