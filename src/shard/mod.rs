//! Tensor and sequence parallelism discovered by e-graph rewrites (in progress).
