//! Shared helpers of the end-to-end benchmark harnesses.

pub mod site;
pub mod target;
