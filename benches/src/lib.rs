//! Shared helpers of the end-to-end benchmark harnesses.

pub mod dr;
pub mod netns;
pub mod relay_transport;
pub mod site;
pub mod target;
