//! apar plans how to train one deep-learning model on many accelerators.
//!
//! Given a forward graph (or a model configuration), a cluster, a global batch and a
//! sequence length, apar enumerates parallel configurations — data, tensor and
//! pipeline parallel degrees, micro-batching, sequence parallelism, ZeRO-style
//! distribution, activation recomputation, pipeline schedule — compiles each one into
//! per-device schedules with memory timelines, drops those that do not fit, prices
//! the rest and returns the fastest plan, or an out-of-memory report with changes that
//! would fit.
//!
//! ```
//! use apar::cluster::Cluster;
//! use apar::models::{build_forward, zoo};
//!
//! let model = zoo::lookup("tiny-gpt")?;
//! let graph = build_forward(&model)?;
//! let cluster = Cluster::resolve("dgx-a100-80g:1")?;
//! let plan = apar::plan(&graph, &cluster, &apar::PlanOptions::new(128, 16))?;
//! assert_eq!(plan.config.dp * plan.config.tp * plan.config.pp, 8);
//! assert!(plan.memory.peak_bytes <= plan.memory.budget_bytes);
//! println!("{}", plan.config);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The pieces, in data-flow order: [`ir`] (operator graph, verifier, formats),
//! [`models`] (zoo, Hugging Face configs, graph builder), [`train`] (autodiff, mixed
//! precision, AdamW), [`shard`] (tensor/sequence parallelism by e-graph rewriting),
//! [`passes`] (configurations, recomputation, ZeRO distribution, pipeline cut),
//! [`cluster`] and [`cost`] (hardware and prices), [`lower`] (schedules, simulation,
//! memory timelines), [`search`] (the candidate search), [`report`] (logs, JSON,
//! traces) and [`engine`] (what each training engine runs, allocates and accepts).
#![deny(missing_docs)]

pub mod cluster;
pub mod cost;
pub mod engine;
pub mod ir;
pub mod lower;
pub mod models;
pub mod passes;
pub mod report;
pub mod search;
pub mod shard;
pub mod train;

mod api;
mod input;

pub use api::{
    calibrate, plan, plan_model, Axis, BlockProgram, Coordinates, EmptySpace, Mesh, ModelOrigin,
    ModelSpec, OpStep, Plan, PlanError, PlanOptions, Session, TensorKind, TensorPlacement,
    TpLayout, Warning,
};
