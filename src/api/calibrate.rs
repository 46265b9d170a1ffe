//! `apar calibrate`: fits the named cost parameters ([`Param`]) of a [`Calibration`]
//! to a user's measured runs.
//!
//! A run file lists training runs measured on one cluster with one engine: the job
//! (model, cluster, engine, sequence, global batch), the configuration and the
//! measured step time (and optionally the peak memory). Each run is compiled once;
//! the fit then re-prices the compiled runs under candidate parameters (keeping the
//! sharding each run was compiled with) and minimizes the sum of squared log errors
//! of the step times with Nelder-Mead (`argmin`), from a fixed start simplex and for
//! a fixed number of iterations: the same file gives the same fit.
//!
//! # Run files
//!
//! JSON: an array of objects; CSV: a header row naming the same fields, one run per
//! row, no quoting. Fields (unknown fields are errors):
//!
//! | field | meaning |
//! |---|---|
//! | `model` | zoo name or `config.json` path |
//! | `cluster` | preset with node count (`dgx-a100-80g:8`) or cluster JSON file |
//! | `engine` | `megatron` (default), `deepspeed`, `torchtitan`, `hf` |
//! | `seq`, `global_batch` | sequence length and sequences per step |
//! | `dp`, `tp`, `pp`, `micro_batch` | degrees and micro-batch size (`tp`, `pp` default 1) |
//! | `sp` | sequence parallelism (`false` by default) |
//! | `recompute` | `none` (default), `selective`, `full` |
//! | `recompute_layers` | recompute only the first K layers of each stage (optional) |
//! | `zero` | ZeRO stage 0–3 (default 0) |
//! | `schedule` | `1f1b` (default), `gpipe`, `interleaved:V` |
//! | `step_time_s` | measured seconds per step |
//! | `peak_memory_bytes` | measured peak memory per device (optional; reported, not fitted) |

use super::{ModelSpec, PlanError, PlanOptions, Session};
use crate::cluster::Cluster;
use crate::cost::{Calibration, Param};
use crate::engine::Engine;
use crate::lower::compile::Compiler;
use crate::passes::{Config, Recompute, Schedule};
use argmin::core::{CostFunction, Executor};
use argmin::solver::neldermead::NelderMead;
use serde::{Deserialize, Serialize};
use std::path::Path;
use thiserror::Error;

/// Most Nelder-Mead iterations of a fit: enough for four parameters to converge to
/// well below 0.1% on apar's own runs (`tests/calibrate.rs`).
pub const FIT_ITERATIONS: u64 = 400;

/// The fit stops when the standard deviation of the simplex's costs (sums of squared
/// log errors) falls below this.
pub const FIT_COST_TOLERANCE: f64 = 1e-10;

/// Relative size of the start simplex around the starting parameters.
pub const FIT_START_STEP: f64 = 0.1;

/// Bounds a fitted efficiency is kept in.
pub const FIT_BOUNDS: (f64, f64) = (0.01, 1.0);

/// One measured run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Run {
    /// Zoo name or `config.json` path.
    pub model: String,
    /// Cluster preset with a node count, or a cluster JSON file.
    pub cluster: String,
    /// The engine that ran it.
    #[serde(default)]
    pub engine: Engine,
    /// Sequence length.
    pub seq: u64,
    /// Sequences per step.
    pub global_batch: u64,
    /// Data-parallel degree.
    pub dp: u32,
    /// Tensor-parallel degree.
    #[serde(default = "one")]
    pub tp: u32,
    /// Pipeline stages.
    #[serde(default = "one")]
    pub pp: u32,
    /// Sequences per micro-batch.
    #[serde(default = "one")]
    pub micro_batch: u32,
    /// Sequence parallelism.
    #[serde(default)]
    pub sp: bool,
    /// Recomputation policy.
    #[serde(default = "no_recompute")]
    pub recompute: Recompute,
    /// Recompute only the first K layers of each stage.
    #[serde(default)]
    pub recompute_layers: Option<u32>,
    /// Megatron-LM's selective-recompute module set (`mlp`, `core_attn,mlp`; with
    /// `recompute: selective`), when not the engine's default.
    #[serde(default)]
    pub recompute_modules: Option<crate::passes::RecomputeModules>,
    /// ZeRO stage.
    #[serde(default)]
    pub zero: u8,
    /// Pipeline schedule.
    #[serde(default = "one_f_one_b")]
    pub schedule: Schedule,
    /// Measured seconds per step.
    pub step_time_s: f64,
    /// Measured peak memory per device, bytes.
    #[serde(default)]
    pub peak_memory_bytes: Option<u64>,
}

fn one() -> u32 {
    1
}

fn no_recompute() -> Recompute {
    Recompute::None
}

fn one_f_one_b() -> Schedule {
    Schedule::OneFOneB
}

impl Run {
    /// The configuration of the run, or why it is not one.
    ///
    /// # Errors
    ///
    /// What is wrong when `dp × micro_batch` does not divide the global batch.
    pub fn config(&self) -> Result<Config, String> {
        let per = u64::from(self.dp) * u64::from(self.micro_batch);
        if per == 0 || self.global_batch % per != 0 {
            return Err(format!(
                "global batch {} is not a multiple of dp × micro_batch = {per}",
                self.global_batch
            ));
        }
        let m = u32::try_from(self.global_batch / per).map_err(|e| e.to_string())?;
        Ok(Config {
            dp: self.dp,
            tp: self.tp,
            pp: self.pp,
            micro_batch: self.micro_batch,
            num_micro_batches: m,
            sp: self.sp,
            recompute: self.recompute,
            recompute_layers: self.recompute_layers,
            recompute_modules: self.recompute_modules,
            zero: self.zero,
            low_prec_shard: self.zero >= 3,
            schedule: self.schedule,
        })
    }
}

/// A problem with a calibration.
#[derive(Debug, Error)]
pub enum CalibrateError {
    /// The run file could not be read or parsed.
    #[error("{file}: {why}")]
    File {
        /// The file.
        file: String,
        /// What is wrong.
        why: String,
    },
    /// A run cannot be compiled.
    #[error("run {index} ({model} on {cluster}): {why}")]
    Run {
        /// 1-based position in the file.
        index: usize,
        /// Its model.
        model: String,
        /// Its cluster.
        cluster: String,
        /// What is wrong.
        why: String,
    },
    /// Fewer runs than free parameters.
    #[error("{runs} run(s) cannot determine {params} free parameter(s) ({names}): give at least {params} runs or fit fewer parameters (--fit)")]
    TooFewRuns {
        /// Runs given.
        runs: usize,
        /// Free parameters.
        params: usize,
        /// Their names.
        names: String,
    },
    /// Runs on different devices (a calibration is for one device type).
    #[error("runs use different devices ({0}); a calibration is for one device type")]
    MixedDevices(String),
    /// No parameter to fit.
    #[error("nothing to fit: name parameters with --fit ({})", Param::ALL.map(Param::name).join(", "))]
    NoParams,
    /// The optimizer failed.
    #[error("the fit failed: {0}")]
    Solver(String),
}

/// Reads a run file: JSON (an array of runs) when it starts with `[`, CSV otherwise.
///
/// # Errors
///
/// [`CalibrateError::File`] naming the file, and the row or field at fault.
pub fn read_runs(path: &Path) -> Result<Vec<Run>, CalibrateError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| CalibrateError::File {
        file: file.clone(),
        why: e.to_string(),
    })?;
    parse_runs(&text).map_err(|why| CalibrateError::File { file, why })
}

/// Parses run text, JSON or CSV (see the module doc).
///
/// # Errors
///
/// What is wrong, naming the row for CSV.
pub fn parse_runs(text: &str) -> Result<Vec<Run>, String> {
    let runs = parse_rows(text)?;
    for (i, r) in runs.iter().enumerate() {
        // A step takes time: zero, negative or absurd measurements are typos, and the
        // log errors the fit minimizes are undefined for them.
        if !(r.step_time_s > 0.0 && r.step_time_s <= MAX_STEP_TIME_S) {
            return Err(format!(
                "run {}: step_time_s {} is not in (0, {MAX_STEP_TIME_S}] seconds",
                i + 1,
                r.step_time_s
            ));
        }
    }
    Ok(runs)
}

/// The longest accepted measured step, seconds: one day.
pub const MAX_STEP_TIME_S: f64 = 86_400.0;

fn parse_rows(text: &str) -> Result<Vec<Run>, String> {
    if text.trim_start().starts_with('[') {
        return serde_json::from_str(text).map_err(|e| e.to_string());
    }
    if text.trim_start().starts_with('{') {
        return Err("a JSON run file is an array of runs ([{...}, ...])".into());
    }
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
    let Some((_, header)) = lines.next() else {
        return Err("no header row".into());
    };
    let names: Vec<&str> = header.split(',').map(str::trim).collect();
    lines
        .map(|(i, line)| {
            let cells: Vec<&str> = line.split(',').map(str::trim).collect();
            if cells.len() != names.len() {
                return Err(format!(
                    "line {}: {} cells for {} columns",
                    i + 1,
                    cells.len(),
                    names.len()
                ));
            }
            let mut obj = serde_json::Map::new();
            for (name, cell) in names.iter().zip(&cells) {
                if cell.is_empty() {
                    continue;
                }
                let v = if let Ok(n) = cell.parse::<u64>() {
                    serde_json::Value::from(n)
                } else if let Ok(x) = cell.parse::<f64>() {
                    serde_json::Value::from(x)
                } else if let Ok(b) = cell.parse::<bool>() {
                    serde_json::Value::from(b)
                } else {
                    serde_json::Value::from(*cell)
                };
                obj.insert((*name).to_string(), v);
            }
            serde_json::from_value(serde_json::Value::Object(obj))
                .map_err(|e| format!("line {}: {e}", i + 1))
        })
        .collect()
}

/// A run as compiled for the fit.
pub struct CompiledRun {
    /// The run.
    pub run: Run,
    /// Its configuration.
    pub config: Config,
    /// Its compiler (graphs built under the starting calibration).
    pub compiler: Compiler,
}

/// Compiles every run under `start` (the device's built-in table when `None`).
///
/// # Errors
///
/// [`CalibrateError::Run`] for a run that cannot be compiled,
/// [`CalibrateError::MixedDevices`] for runs on different devices.
pub fn compile_runs(
    runs: &[Run],
    start: Option<&Calibration>,
) -> Result<Vec<CompiledRun>, CalibrateError> {
    let mut out = Vec::with_capacity(runs.len());
    for (i, run) in runs.iter().enumerate() {
        let err = |why: String| CalibrateError::Run {
            index: i + 1,
            model: run.model.clone(),
            cluster: run.cluster.clone(),
            why,
        };
        let cluster = Cluster::resolve(&run.cluster).map_err(|e| err(e.to_string()))?;
        let mut options = PlanOptions::new(run.seq, run.global_batch);
        options.engine = run.engine;
        options.calibration = start.cloned();
        // The run ran: all of the device memory was usable (a budget below it could
        // move the pipeline cuts away from the ones the run had).
        options.memory_ratio = 1.0;
        let session = Session::for_spec(&ModelSpec::parse(&run.model), &cluster, &options)
            .map_err(|e: PlanError| err(e.to_string()))?;
        let config = run.config().map_err(err)?;
        let compiler = session.into_compiler();
        compiler.evaluate(&config).map_err(|e| err(e.to_string()))?;
        out.push(CompiledRun {
            run: run.clone(),
            config,
            compiler,
        });
    }
    let mut devices: Vec<&str> = out
        .iter()
        .map(|r| r.compiler.cluster.device.name.as_str())
        .collect();
    devices.sort_unstable();
    devices.dedup();
    if devices.len() > 1 {
        return Err(CalibrateError::MixedDevices(devices.join(", ")));
    }
    Ok(out)
}

/// The outcome of a fit.
#[derive(Clone, Debug, Serialize)]
pub struct Fit {
    /// The fitted calibration.
    pub calibration: Calibration,
    /// The free parameters with their start and fitted values.
    pub params: Vec<(String, f64, f64)>,
    /// Per run: measured and predicted step time, seconds.
    pub residuals: Vec<Residual>,
    /// Root mean square of the log errors at the fit.
    pub rms_log_error: f64,
    /// Nelder-Mead iterations taken.
    pub iterations: u64,
}

/// One run's measured and predicted step time (and peak memory when measured).
#[derive(Clone, Debug, Serialize)]
pub struct Residual {
    /// Measured step time, seconds.
    pub measured_s: f64,
    /// Predicted step time at the fit, seconds.
    pub predicted_s: f64,
    /// Measured peak memory, bytes.
    pub measured_peak_bytes: Option<u64>,
    /// Predicted peak memory, bytes.
    pub predicted_peak_bytes: u64,
}

impl Residual {
    /// `predicted / measured - 1`.
    pub fn error(&self) -> f64 {
        self.predicted_s / self.measured_s - 1.0
    }
}

/// Minimizes `cost(calibration)` over the `free` parameters of `start` by
/// Nelder-Mead, deterministically. Values are kept inside [`FIT_BOUNDS`].
///
/// # Errors
///
/// [`CalibrateError::NoParams`] for an empty `free`, [`CalibrateError::Solver`] when
/// the optimizer fails.
pub fn minimize(
    start: &Calibration,
    free: &[Param],
    cost: impl Fn(&Calibration) -> f64,
) -> Result<Calibration, CalibrateError> {
    minimize_counted(start, free, cost).map(|(c, _)| c)
}

/// [`minimize`], with the number of iterations it took.
///
/// # Errors
///
/// As [`minimize`].
pub fn minimize_counted(
    start: &Calibration,
    free: &[Param],
    cost: impl Fn(&Calibration) -> f64,
) -> Result<(Calibration, u64), CalibrateError> {
    if free.is_empty() {
        return Err(CalibrateError::NoParams);
    }
    struct Problem<'a, F> {
        start: &'a Calibration,
        free: &'a [Param],
        cost: F,
    }
    impl<F: Fn(&Calibration) -> f64> CostFunction for Problem<'_, F> {
        type Param = Vec<f64>;
        type Output = f64;
        fn cost(&self, x: &Vec<f64>) -> Result<f64, argmin::core::Error> {
            let (lo, hi) = FIT_BOUNDS;
            if x.iter().any(|v| !(lo..=hi).contains(v)) {
                return Ok(f64::MAX);
            }
            let c = with_values(self.start, self.free, x);
            let v = (self.cost)(&c);
            Ok(if v.is_finite() { v } else { f64::MAX })
        }
    }
    let x0: Vec<f64> = free.iter().map(|p| p.get(start)).collect();
    let mut simplex = vec![x0.clone()];
    for i in 0..x0.len() {
        let mut x = x0.clone();
        // Step down (towards the inside of the bounds) by the start step.
        x[i] *= 1.0 - FIT_START_STEP;
        simplex.push(x);
    }
    let solver = NelderMead::new(simplex)
        .with_sd_tolerance(FIT_COST_TOLERANCE)
        .map_err(|e| CalibrateError::Solver(e.to_string()))?;
    let problem = Problem { start, free, cost };
    let res = Executor::new(problem, solver)
        .configure(|s| s.max_iters(FIT_ITERATIONS))
        .run()
        .map_err(|e| CalibrateError::Solver(e.to_string()))?;
    let best = res
        .state
        .best_param
        .clone()
        .ok_or_else(|| CalibrateError::Solver("no best point".into()))?;
    Ok((with_values(start, free, &best), res.state.iter))
}

/// `start` with the `free` parameters set to `x`.
fn with_values(start: &Calibration, free: &[Param], x: &[f64]) -> Calibration {
    let mut c = start.clone();
    for (p, v) in free.iter().zip(x) {
        p.set(&mut c, *v);
    }
    c
}

/// Step times of the compiled runs under `calibration`, seconds (infinite for a run
/// that fails to evaluate). The runs are re-priced in place
/// ([`Compiler::reprice`]).
pub fn predict(runs: &mut [CompiledRun], calibration: &Calibration) -> Vec<f64> {
    use rayon::prelude::*;
    runs.par_iter_mut()
        .map(|r| {
            r.compiler.reprice(calibration.clone());
            r.compiler
                .evaluate(&r.config)
                .map_or(f64::INFINITY, |e| e.step_time_s)
        })
        .collect()
}

/// Fits the `free` parameters to the runs, starting from `start` (the runs' device's
/// built-in table when `None`).
///
/// # Errors
///
/// [`CalibrateError::TooFewRuns`] with fewer runs than free parameters, and as
/// [`compile_runs`] and [`minimize`].
pub fn fit(
    runs: &[Run],
    start: Option<&Calibration>,
    free: &[Param],
) -> Result<Fit, CalibrateError> {
    if free.is_empty() {
        return Err(CalibrateError::NoParams);
    }
    if runs.len() < free.len() {
        return Err(CalibrateError::TooFewRuns {
            runs: runs.len(),
            params: free.len(),
            names: free.iter().map(|p| p.name()).collect::<Vec<_>>().join(", "),
        });
    }
    let compiled = std::sync::Mutex::new(compile_runs(runs, start)?);
    let start = compiled.lock().expect("runs lock")[0]
        .compiler
        .cost
        .eff
        .clone();
    let measured: Vec<f64> = runs.iter().map(|r| r.step_time_s).collect();
    let cost = |c: &Calibration| -> f64 {
        predict(&mut compiled.lock().expect("runs lock"), c)
            .iter()
            .zip(&measured)
            .map(|(p, m)| (p / m).ln().powi(2))
            .sum()
    };
    let (mut fitted, iterations) = minimize_counted(&start, free, cost)?;
    let mut compiled = compiled.into_inner().expect("runs lock");
    let residuals: Vec<Residual> = compiled
        .iter_mut()
        .map(|r| {
            r.compiler.reprice(fitted.clone());
            let e = r.compiler.evaluate(&r.config);
            let (t, peak) = e.map_or((f64::INFINITY, 0), |e| (e.step_time_s, e.peak_bytes));
            Residual {
                measured_s: r.run.step_time_s,
                predicted_s: t,
                measured_peak_bytes: r.run.peak_memory_bytes,
                predicted_peak_bytes: peak,
            }
        })
        .collect();
    let rms_log_error = (residuals
        .iter()
        .map(|r| (r.predicted_s / r.measured_s).ln().powi(2))
        .sum::<f64>()
        / residuals.len() as f64)
        .sqrt();
    for p in free {
        fitted.sources.insert(
            p.name().to_string(),
            format!(
                "fitted by `apar calibrate` to {} measured run(s) (rms log error of the step times {:.2}%), from {:.4}",
                runs.len(),
                100.0 * rms_log_error,
                p.get(&start)
            ),
        );
    }
    if free.contains(&Param::Attention) {
        if let Some(s) = fitted.sources.get("attention").cloned() {
            fitted.sources.insert(
                "attention_bwd".into(),
                format!("{s} (scaled with attention)"),
            );
        }
    }
    let params = free
        .iter()
        .map(|p| (p.name().to_string(), p.get(&start), p.get(&fitted)))
        .collect();
    Ok(Fit {
        iterations,
        params,
        calibration: fitted,
        residuals,
        rms_log_error,
    })
}
