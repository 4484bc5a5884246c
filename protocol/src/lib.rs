//! `moat-protocol`: the wire protocol shared by the shim (host side) and the agent (guest side).
