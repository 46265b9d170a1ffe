//! apar plans data, tensor and pipeline parallel training of deep-learning models.
#![deny(missing_docs)]

pub mod cluster;
pub mod cost;
pub mod ir;
pub mod models;
pub mod passes;
pub mod shard;
pub mod train;
pub mod lower;
pub mod report;
pub mod search;
