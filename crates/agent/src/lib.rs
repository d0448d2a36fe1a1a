//! ferryd, the host agent.
