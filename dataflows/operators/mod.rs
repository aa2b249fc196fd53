//! Operators shared by the dataflows.

pub mod batch;
pub mod durable_sink;
pub mod from_first_worker;
