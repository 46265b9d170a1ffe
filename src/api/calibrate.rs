//! `apar calibrate`: fits the named cost parameters ([`Param`]) of a [`Calibration`]
//! to a user's measured runs.
//!
//! A run file lists training runs measured on one device type (any engines: each run
//! names its engine): the job (model, cluster, engine, sequence, global batch), the
//! configuration and the measured step time (and optionally the peak memory). Each run is compiled once;
//! the fit then re-prices the compiled runs under candidate parameters (keeping the
//! sharding each run was compiled with) and minimizes the sum of squared log errors
//! of the step times with Nelder-Mead (`argmin`), from a fixed start simplex and for
//! a fixed number of iterations: the same file gives the same fit. A free parameter no
//! run's prediction depends on is refused before the fit
//! ([`CalibrateError::Undetermined`]); a run apar predicts does not fit in device
//! memory is fitted with a warning ([`Fit::warnings`]).
//!
//! # Run files
//!
//! JSON: an array of objects; CSV (read by the `csv` crate): a header row naming the
//! same fields, one run per row, `"`-quoted cells (`"core_attn,mlp"`), `#` comment
//! lines, an empty cell for a field's default, a leading UTF-8 byte-order mark
//! ignored. Unknown and repeated fields are errors.
//!
//! | field | meaning |
//! |---|---|
//! | `model` | zoo name or `config.json` path |
//! | `attention` | `eager` or `flash` when the run's attention differs from the model's, as `--attention` (optional) |
//! | `cluster` | preset with node count (`dgx-a100-80g:8`) or cluster JSON file |
//! | `engine` | `megatron` (default), `deepspeed`, `torchtitan`, `hf` |
//! | `seq`, `global_batch` | sequence length and sequences per step |
//! | `dp`, `tp`, `pp`, `micro_batch` | degrees and micro-batch size, each at least 1 (`tp`, `pp`, `micro_batch` default 1) |
//! | `cp`, `ep` | context- and expert-parallel degrees (default 1), as `--cp`, `--ep` |
//! | `etp` | expert-tensor-parallel degree (default: `tp` for a model with routed experts, Megatron-LM's, else 1), as `--etp` |
//! | `moe_imbalance` | the busiest expert-parallel rank's routed tokens over the mean (default 1), as `--moe-imbalance` |
//! | `sp` | sequence parallelism (`false` by default) |
//! | `recompute` | `none` (default), `selective`, `full` |
//! | `recompute_layers` | recompute only the first K layers of each stage (optional) |
//! | `recompute_modules` | Megatron-LM's selective module set: `"core_attn,mlp"` or `["core_attn", "mlp"]`; implies `recompute: selective` |
//! | `precision` | `bf16` (default), `fp16`, `fp32`, `fp8` (as `--precision`) |
//! | `zero` | ZeRO stage 0–3 (default 0) |
//! | `schedule` | `1f1b` (default), `gpipe`, `interleaved:V` |
//! | `step_time_s` | measured seconds per step |
//! | `peak_memory_bytes` | measured peak memory per device (optional; reported, not fitted) |
//! | `overlap_grad_reduce` | Megatron-LM's `--overlap-grad-reduce` was on (`true` by default; `false`: every gradient reduction after the step's backward) |
//! | `overlap_param_gather` | Megatron-LM's `--overlap-param-gather` was on (default: as `overlap_grad_reduce`, which it needs) |
//! | `tp_comm_overlap` | Megatron-LM's `--tp-comm-overlap` was on, with `sp` (`true` by default) |

use super::{ModelSpec, PlanError, PlanOptions, Session};
use crate::cluster::Cluster;
use crate::cost::{Calibration, Param};
use crate::engine::memory::Precision;
use crate::engine::overlap::CommOverlap;
use crate::engine::Engine;
use crate::lower::compile::Compiler;
use crate::models::Attention;
use crate::passes::{Config, Recompute, RecomputeModules, Schedule};
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

/// A free parameter is undetermined when moving it by [`FIT_START_STEP`] changes
/// every run's predicted step time by less than this, relative: no run depends on it
/// and the fit would leave it where it started.
pub const FIT_MIN_SENSITIVITY: f64 = 1e-9;

/// One measured run.
///
/// As read from a file: `recompute_modules` implies selective recomputation and the
/// engine's own default module set is spelled as none, as `--recompute-modules` does
/// on the command line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RunFields")]
pub struct Run {
    /// Zoo name or `config.json` path.
    pub model: String,
    /// The attention form, when the run's differs from the model's (`--attention`):
    /// a zoo model listed as `eager` that ran with FlashAttention is `flash`.
    pub attention: Option<Attention>,
    /// Cluster preset with a node count, or a cluster JSON file.
    pub cluster: String,
    /// The engine that ran it.
    pub engine: Engine,
    /// Sequence length.
    pub seq: u64,
    /// Sequences per step.
    pub global_batch: u64,
    /// Data-parallel degree.
    pub dp: u32,
    /// Tensor-parallel degree.
    pub tp: u32,
    /// Pipeline stages.
    pub pp: u32,
    /// Sequences per micro-batch.
    pub micro_batch: u32,
    /// Context-parallel degree.
    pub cp: u32,
    /// Expert-parallel degree.
    pub ep: u32,
    /// Expert-tensor-parallel degree; `None`: the engine's default for the model
    /// ([`crate::Session::default_etp`]).
    pub etp: Option<u32>,
    /// Expert load imbalance (`--moe-imbalance`; 1 = balanced).
    pub moe_imbalance: f64,
    /// Sequence parallelism.
    pub sp: bool,
    /// Recomputation policy.
    pub recompute: Recompute,
    /// Recompute only the first K layers of each stage.
    pub recompute_layers: Option<u32>,
    /// Megatron-LM's selective-recompute module set (`mlp`, `core_attn,mlp`; with
    /// `recompute: selective`), when not the engine's default.
    pub recompute_modules: Option<RecomputeModules>,
    /// Compute precision (`bf16` unless given; `fp8` for FP8 GEMMs).
    pub precision: Precision,
    /// ZeRO stage.
    pub zero: u8,
    /// Pipeline schedule.
    pub schedule: Schedule,
    /// Measured seconds per step.
    pub step_time_s: f64,
    /// Measured peak memory per device, bytes.
    pub peak_memory_bytes: Option<u64>,
    /// Megatron-LM's `--overlap-grad-reduce` was on (see [`Run::comm_overlap`]).
    pub overlap_grad_reduce: bool,
    /// Megatron-LM's `--overlap-param-gather` was on.
    pub overlap_param_gather: bool,
    /// Megatron-LM's `--tp-comm-overlap` was on.
    pub tp_comm_overlap: bool,
}

/// A run as a file spells it: optional fields not yet defaulted, `recompute` not yet
/// implied by `recompute_modules`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunFields {
    model: String,
    #[serde(default)]
    attention: Option<Attention>,
    cluster: String,
    #[serde(default)]
    engine: Engine,
    seq: u64,
    global_batch: u64,
    dp: u32,
    #[serde(default = "one")]
    tp: u32,
    #[serde(default = "one")]
    pp: u32,
    #[serde(default = "one")]
    micro_batch: u32,
    #[serde(default = "one")]
    cp: u32,
    #[serde(default = "one")]
    ep: u32,
    #[serde(default)]
    etp: Option<u32>,
    #[serde(default = "balanced")]
    moe_imbalance: f64,
    #[serde(default)]
    sp: bool,
    #[serde(default)]
    recompute: Option<Recompute>,
    #[serde(default)]
    recompute_layers: Option<u32>,
    #[serde(default, deserialize_with = "modules_text_or_list")]
    recompute_modules: Option<RecomputeModules>,
    #[serde(default)]
    precision: Precision,
    #[serde(default)]
    zero: u8,
    #[serde(default = "one_f_one_b")]
    schedule: Schedule,
    step_time_s: f64,
    #[serde(default)]
    peak_memory_bytes: Option<u64>,
    #[serde(default)]
    overlap_grad_reduce: Option<bool>,
    #[serde(default)]
    overlap_param_gather: Option<bool>,
    #[serde(default)]
    tp_comm_overlap: Option<bool>,
}

fn one() -> u32 {
    1
}

fn balanced() -> f64 {
    1.0
}

fn one_f_one_b() -> Schedule {
    Schedule::OneFOneB
}

/// A module set written as text (`"core_attn,mlp"`, as in a CSV cell or on the
/// command line) or as a list of names (`["core_attn", "mlp"]`); `null` is none.
fn modules_text_or_list<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<RecomputeModules>, D::Error> {
    struct Modules;
    impl<'de> serde::de::Visitor<'de> for Modules {
        type Value = Option<RecomputeModules>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("module names, as text (\"core_attn,mlp\") or a list")
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Self::Value, E> {
            s.parse().map(Some).map_err(E::custom)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut names = Vec::new();
            while let Some(name) = seq.next_element::<String>()? {
                names.push(name);
            }
            self.visit_str(&names.join(","))
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    d.deserialize_any(Modules)
}

impl TryFrom<RunFields> for Run {
    type Error = String;

    /// The rules of `--recompute-modules`: a module set needs selective
    /// recomputation and implies it when `recompute` is absent; the engine's default
    /// set is none.
    fn try_from(f: RunFields) -> Result<Run, String> {
        let recompute = match (f.recompute, f.recompute_modules) {
            (r, None) => r.unwrap_or(Recompute::None),
            (None | Some(Recompute::Selective), Some(_)) => Recompute::Selective,
            (Some(r), Some(m)) => {
                return Err(format!(
                    "recompute_modules {m} needs recompute selective, not {}",
                    r.name()
                ))
            }
        };
        let recompute_modules = f
            .recompute_modules
            .filter(|&m| f.engine.default_recompute_modules() != Some(m));
        Ok(Run {
            model: f.model,
            attention: f.attention,
            cluster: f.cluster,
            engine: f.engine,
            seq: f.seq,
            global_batch: f.global_batch,
            dp: f.dp,
            tp: f.tp,
            pp: f.pp,
            micro_batch: f.micro_batch,
            cp: f.cp,
            ep: f.ep,
            etp: f.etp,
            moe_imbalance: f.moe_imbalance,
            sp: f.sp,
            recompute,
            recompute_layers: f.recompute_layers,
            recompute_modules,
            precision: f.precision,
            zero: f.zero,
            schedule: f.schedule,
            step_time_s: f.step_time_s,
            peak_memory_bytes: f.peak_memory_bytes,
            overlap_grad_reduce: f.overlap_grad_reduce.unwrap_or(true),
            overlap_param_gather: f
                .overlap_param_gather
                .unwrap_or(f.overlap_grad_reduce.unwrap_or(true)),
            tp_comm_overlap: f.tp_comm_overlap.unwrap_or(true),
        })
        .and_then(|run: Run| {
            run.comm_overlap()
                .check(run.engine)
                .map_err(|e| e.to_string())?;
            Ok(run)
        })
    }
}

impl Run {
    /// The model as a report names it: a model file by its file name (the path the
    /// run file resolved is long), a zoo name as it is.
    pub fn model_name(&self) -> &str {
        Path::new(&self.model)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or(&self.model)
    }

    /// The communication overlap switches the run had (on unless the file says
    /// otherwise; the parameter gather's default follows the gradient reduction's).
    pub fn comm_overlap(&self) -> CommOverlap {
        CommOverlap {
            grad_reduce: self.overlap_grad_reduce,
            param_gather: self.overlap_param_gather,
            tp_comm: self.tp_comm_overlap,
        }
    }

    /// Whether the run's numbers are usable: degrees and micro-batch at least 1, a
    /// measured step time in [[`MIN_STEP_TIME_S`], [`MAX_STEP_TIME_S`]].
    ///
    /// # Errors
    ///
    /// What is wrong, naming the field.
    pub fn check(&self) -> Result<(), String> {
        for (name, v) in [
            ("dp", self.dp),
            ("tp", self.tp),
            ("pp", self.pp),
            ("micro_batch", self.micro_batch),
            ("cp", self.cp),
            ("ep", self.ep),
            ("etp", self.etp.unwrap_or(1)),
        ] {
            if v == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        // A step takes time: zero, negative or absurd measurements are typos, and the
        // log errors the fit minimizes are undefined for them.
        if !(MIN_STEP_TIME_S..=MAX_STEP_TIME_S).contains(&self.step_time_s) {
            return Err(format!(
                "step_time_s {:?} is not in [{MIN_STEP_TIME_S:e}, {MAX_STEP_TIME_S}] seconds",
                self.step_time_s
            ));
        }
        Ok(())
    }

    /// The configuration of the run, or why it is not one.
    ///
    /// # Errors
    ///
    /// What is wrong when a degree or the micro-batch is 0 ([`Run::check`]) or
    /// `dp × micro_batch` does not divide the global batch. An unset `etp` is 1 here;
    /// [`compile_runs`] gives it the engine's default for the model.
    pub fn config(&self) -> Result<Config, String> {
        self.check()?;
        let per = u64::from(self.dp) * u64::from(self.micro_batch);
        if self.global_batch % per != 0 {
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
            cp: self.cp,
            ep: self.ep,
            etp: self.etp.unwrap_or(1),
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
    /// Fewer runs (of distinct configurations) than free parameters.
    #[error("{runs} run(s) of distinct configurations cannot determine {params} free parameter(s) ({names}): give at least {params} runs of different configurations or fit fewer parameters (--fit)")]
    TooFewRuns {
        /// Runs of distinct configurations given.
        runs: usize,
        /// Free parameters.
        params: usize,
        /// Their names.
        names: String,
    },
    /// No runs at all (a file with a header and nothing else).
    #[error("no runs to fit: the run file(s) hold a header and no run")]
    NoRuns,
    /// Runs on different devices (a calibration is for one device type).
    #[error("runs use different devices ({0}); a calibration is for one device type")]
    MixedDevices(String),
    /// No parameter to fit.
    #[error("nothing to fit: name parameters with --fit ({})", Param::ALL.map(Param::name).join(", "))]
    NoParams,
    /// A `--fit` list that does not name parameters once each.
    #[error("--fit `{list}`: {why}")]
    FitList {
        /// The list as given.
        list: String,
        /// What is wrong.
        why: String,
    },
    /// A free parameter no run's predicted step time depends on: the fit cannot move
    /// it (see [`FIT_MIN_SENSITIVITY`]).
    #[error("the runs cannot determine `{param}`: changing it by {:.0}% changes no run's predicted step time (by less than {FIT_MIN_SENSITIVITY:e} relative); {hint}, or leave it out of --fit", 100.0 * FIT_START_STEP)]
    Undetermined {
        /// The parameter.
        param: Param,
        /// Which runs would determine it.
        hint: &'static str,
    },
    /// The optimizer failed.
    #[error("the fit failed: {0}")]
    Solver(String),
}

/// Parses a `--fit` list: parameter names separated by commas, each once.
///
/// # Errors
///
/// [`CalibrateError::NoParams`] for an empty list, [`CalibrateError::FitList`] for an
/// empty item, an unknown name or a name given twice.
pub fn parse_params(list: &str) -> Result<Vec<Param>, CalibrateError> {
    if list.trim().is_empty() {
        return Err(CalibrateError::NoParams);
    }
    let refuse = |why: String| CalibrateError::FitList {
        list: list.to_string(),
        why,
    };
    let mut params = Vec::new();
    for (i, item) in list.split(',').map(str::trim).enumerate() {
        if item.is_empty() {
            return Err(refuse(format!("item {} is empty", i + 1)));
        }
        let p = Param::parse(item).ok_or_else(|| {
            refuse(format!(
                "`{item}` is not one of {}",
                Param::ALL.map(Param::name).join(", ")
            ))
        })?;
        if params.contains(&p) {
            return Err(refuse(format!("`{p}` is named twice")));
        }
        params.push(p);
    }
    Ok(params)
}

/// Which runs move a parameter's predictions (for [`CalibrateError::Undetermined`]).
fn sensitivity_hint(p: Param) -> &'static str {
    match p {
        Param::Matmul => "add runs whose step time is spent in matmuls",
        Param::Attention => "add runs with fused (flash) attention at longer sequences, whose attention kernels take time (eager attention does not use this value)",
        Param::Memory => "add runs whose memory-bound kernels (norms, activations, optimizer) take time",
        Param::Link => "add runs with communication on the critical path (tp, pp, or dp > 1)",
        Param::Overlap => {
            "add runs whose collectives overlap compute (dp > 1 with the engine's overlap on: Megatron-LM's --overlap-grad-reduce, the run columns overlap_grad_reduce / overlap_param_gather; or ZeRO-3)"
        }
    }
}

/// Reads a run file: JSON (an array of runs) when it starts with `[`, CSV otherwise. A
/// model or cluster given as a relative path of a file beside the run file (a
/// `config.json`, a cluster JSON) is read from there.
///
/// # Errors
///
/// [`CalibrateError::File`] naming the file, and the row or field at fault.
pub fn read_runs(path: &Path) -> Result<Vec<Run>, CalibrateError> {
    let file = path.display().to_string();
    let text = crate::input::read_text(path).map_err(|e| CalibrateError::File {
        file: file.clone(),
        why: e.to_string(),
    })?;
    let mut runs = parse_runs(&text).map_err(|why| CalibrateError::File { file, why })?;
    // A model or cluster file named relative to the run file is read from beside it
    // (as a CSV of one's own runs next to its cluster file would be written).
    let dir = path.parent().unwrap_or(Path::new(""));
    let beside = |name: &mut String| {
        let p = Path::new(name.as_str());
        let file_like = name.ends_with(".json") || name.contains(std::path::MAIN_SEPARATOR);
        if file_like && p.is_relative() && !dir.as_os_str().is_empty() {
            let q = dir.join(p);
            if q.is_file() {
                *name = q.display().to_string();
            }
        }
    };
    for r in &mut runs {
        beside(&mut r.model);
        beside(&mut r.cluster);
    }
    Ok(runs)
}

/// Parses run text, JSON or CSV (see the module doc), and checks each run
/// ([`Run::check`]).
///
/// # Errors
///
/// What is wrong, naming the line and column for CSV and the run for a check.
pub fn parse_runs(text: &str) -> Result<Vec<Run>, String> {
    let runs = parse_rows(text)?;
    for (i, r) in runs.iter().enumerate() {
        r.check().map_err(|why| format!("run {}: {why}", i + 1))?;
    }
    Ok(runs)
}

/// The longest accepted measured step, seconds: one day.
pub const MAX_STEP_TIME_S: f64 = 86_400.0;

/// The shortest accepted measured step, seconds: 1 µs, a few kernel launches
/// (`crate::cost::overhead::KERNEL_LAUNCH_S` is 5 µs); a training step is never
/// shorter, and a log error against a vanishing time is no measurement.
pub const MIN_STEP_TIME_S: f64 = 1e-6;

fn parse_rows(text: &str) -> Result<Vec<Run>, String> {
    // Spreadsheet programs save UTF-8 with a byte-order mark.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if text.trim_start().starts_with('[') {
        // The path names the run and field at fault (`[2].attention`), which serde_json's
        // own message leaves out for a value of the wrong type.
        let mut de = serde_json::Deserializer::from_str(text);
        let runs = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            use serde_path_to_error::Segment;
            let at: Vec<String> = e
                .path()
                .iter()
                .filter_map(|s| match s {
                    Segment::Seq { index } => Some(format!("run {}", index + 1)),
                    Segment::Map { key } => Some(format!("`{key}`")),
                    Segment::Enum { .. } | Segment::Unknown => None,
                })
                .collect();
            let inner = e.into_inner();
            if at.is_empty() {
                inner.to_string()
            } else {
                format!("{}: {inner}", at.join(", "))
            }
        })?;
        de.end().map_err(|e| e.to_string())?;
        return Ok(runs);
    }
    if text.trim_start().starts_with('{') {
        return Err("a JSON run file is an array of runs ([{...}, ...])".into());
    }
    let mut reader = csv::ReaderBuilder::new()
        .comment(Some(b'#'))
        .trim(csv::Trim::All)
        // Rows of the wrong length are reported below with their line.
        .flexible(true)
        .from_reader(text.as_bytes());
    let names = reader.headers().map_err(|e| e.to_string())?.clone();
    if names.iter().all(str::is_empty) {
        return Err("no header row".into());
    }
    for (i, name) in names.iter().enumerate() {
        if name.is_empty() {
            return Err(format!("header: column {} has no name", i + 1));
        }
        if names.iter().take(i).any(|n| n == name) {
            return Err(format!("header: column `{name}` appears twice"));
        }
    }
    let mut runs = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| e.to_string())?;
        let line = record.position().map_or(0, |p| record_line(text, p.byte()));
        if record.iter().all(str::is_empty) {
            continue;
        }
        if record.len() != names.len() {
            return Err(format!(
                "line {line}: {} cells for {} columns",
                record.len(),
                names.len()
            ));
        }
        // An empty cell takes the field's default: leave the field out.
        let (columns, cells): (csv::StringRecord, csv::StringRecord) = names
            .iter()
            .zip(&record)
            .filter(|(_, cell)| !cell.is_empty())
            .unzip();
        let run = cells.deserialize::<Run>(Some(&columns)).map_err(|e| {
            let why = match e.kind() {
                csv::ErrorKind::Deserialize { err, .. } => {
                    match err
                        .field()
                        .and_then(|f| columns.get(f as usize))
                        .or_else(|| culprit(&columns, &cells))
                    {
                        Some(column) => format!("`{column}`: {}", err.kind()),
                        None => err.kind().to_string(),
                    }
                }
                _ => e.to_string(),
            };
            // A column no run has is the header's fault, not the row's.
            if why.contains("unknown field `") {
                let header = names.position().map_or(1, |p| record_line(text, p.byte()));
                return format!("line {header} (header): {why}");
            }
            format!("line {line}: {why}")
        })?;
        runs.push(run);
    }
    Ok(runs)
}

/// The column at fault in a row the reader could not deserialize without saying where
/// (an unknown name in an enumerated column such as `engine` or `attention`): the first
/// whose cell, left empty (its default), lets the row read.
fn culprit<'a>(columns: &'a csv::StringRecord, cells: &csv::StringRecord) -> Option<&'a str> {
    (0..cells.len()).find_map(|i| {
        let blanked: csv::StringRecord = cells
            .iter()
            .enumerate()
            .map(|(j, c)| if j == i { "" } else { c })
            .collect();
        let (cols, vals): (csv::StringRecord, csv::StringRecord) = columns
            .iter()
            .zip(&blanked)
            .filter(|(_, v)| !v.is_empty())
            .unzip();
        vals.deserialize::<Run>(Some(&cols))
            .is_ok()
            .then(|| columns.get(i))
            .flatten()
    })
}

/// The 1-based line of the CSV record the reader placed at `byte`: the reader's
/// positions count neither comment nor blank lines and start where the previous
/// record ended, before the comments and blank lines above this one.
fn record_line(text: &str, byte: u64) -> usize {
    let at = usize::try_from(byte).map_or(text.len(), |b| b.min(text.len()));
    let mut line = 1 + text.as_bytes()[..at]
        .iter()
        .filter(|&&b| b == b'\n')
        .count();
    // Skip what the CSV reader skips: empty lines and lines starting with `#` (an
    // indented `#` is a record to it, and so here).
    for l in text[at..].lines() {
        if !(l.is_empty() || l.starts_with('#')) {
            break;
        }
        line += 1;
    }
    line
}

/// A run as compiled for the fit.
pub struct CompiledRun {
    /// The run, its `attention` resolved to the attention the model runs with (the
    /// file's, else the model's own; `None` for an IR model).
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
        options.precision.compute = run.precision;
        options.comm_overlap = run.comm_overlap();
        options.moe_imbalance = run.moe_imbalance;
        options.calibration = start.cloned();
        // The run ran: all of the device memory was usable (a budget below it could
        // move the pipeline cuts away from the ones the run had).
        options.memory_ratio = 1.0;
        let mut spec = ModelSpec::parse(&run.model);
        spec.attention = run.attention;
        let session = Session::for_spec(&spec, &cluster, &options)
            .map_err(|e: PlanError| err(e.to_string()))?;
        let mut config = run.config().map_err(err)?;
        config.etp = run.etp.unwrap_or_else(|| session.default_etp(run.tp));
        let mut run = run.clone();
        run.attention = session.model_config().map(|c| c.attention);
        let compiler = session.into_compiler();
        compiler.evaluate(&config).map_err(|e| err(e.to_string()))?;
        out.push(CompiledRun {
            run,
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
    /// Runs whose description apar does not believe (a predicted peak above the
    /// device memory of a run that ran), one line each; fitted all the same.
    pub warnings: Vec<String>,
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
    /// Device memory, bytes (the budget at memory ratio 1).
    pub device_memory_bytes: u64,
}

impl Residual {
    /// `predicted / measured - 1`.
    pub fn error(&self) -> f64 {
        self.predicted_s / self.measured_s - 1.0
    }
}

/// Minimizes `cost(calibration)` over the `free` parameters of `start` by
/// Nelder-Mead, deterministically. Values are kept inside each parameter's
/// [`Param::bounds`] at `start`.
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
            let outside = self.free.iter().zip(x).any(|(p, v)| {
                let (lo, hi) = p.bounds(self.start);
                !(lo..=hi).contains(v)
            });
            if outside {
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
        // Step down (towards the inside of the bounds) by the start step; up from 0.
        x[i] = if x[i] > 0.0 {
            x[i] * (1.0 - FIT_START_STEP)
        } else {
            FIT_START_STEP
        };
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
/// that fails to evaluate, and for every run under a calibration
/// [`Calibration::validate`] refuses). The runs are re-priced in place
/// ([`Compiler::reprice`]).
pub fn predict(runs: &mut [CompiledRun], calibration: &Calibration) -> Vec<f64> {
    use rayon::prelude::*;
    runs.par_iter_mut()
        .map(|r| {
            if r.compiler.reprice(calibration.clone()).is_err() {
                return f64::INFINITY;
            }
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
    if let Some(p) = free
        .iter()
        .find(|p| free.iter().filter(|q| q == p).count() > 1)
    {
        return Err(CalibrateError::FitList {
            list: free.iter().map(|p| p.name()).collect::<Vec<_>>().join(","),
            why: format!("`{p}` is named twice"),
        });
    }
    if runs.is_empty() {
        return Err(CalibrateError::NoRuns);
    }
    let compiled = compile_runs(runs, start)?;
    // Runs of one configuration (repeats of a measurement) count once: they pin
    // one step time, not one parameter each. (Compiled: an attention a run spells out
    // is the same run as the model's own left unsaid.)
    let keys: Vec<Run> = compiled
        .iter()
        .map(|r| Run {
            step_time_s: 0.0,
            peak_memory_bytes: None,
            ..r.run.clone()
        })
        .collect();
    let mut repeats = Vec::new();
    let mut distinct = 0;
    for (i, k) in keys.iter().enumerate() {
        match keys[..i].iter().position(|e| e == k) {
            Some(j) => repeats.push((j + 1, i + 1)),
            None => distinct += 1,
        }
    }
    if distinct < free.len() {
        return Err(CalibrateError::TooFewRuns {
            runs: distinct,
            params: free.len(),
            names: free.iter().map(|p| p.name()).collect::<Vec<_>>().join(", "),
        });
    }
    let compiled = std::sync::Mutex::new(compiled);
    let start = compiled.lock().expect("runs lock")[0]
        .compiler
        .cost
        .eff
        .clone();
    check_sensitivity(&mut compiled.lock().expect("runs lock"), &start, free)?;
    let measured: Vec<f64> = runs.iter().map(|r| r.step_time_s).collect();
    let cost = |c: &Calibration| -> f64 {
        predict(&mut compiled.lock().expect("runs lock"), c)
            .iter()
            .zip(&measured)
            .map(|(p, m)| (p / m).ln().powi(2))
            .sum()
    };
    let (mut fitted, iterations) = minimize_counted(&start, free, cost)?;
    // Six decimals: far below what the runs determine, and a written file without the
    // solver's binary noise (0.8999999914 → 0.9).
    for &p in free {
        let (lo, hi) = p.bounds(&start);
        let v = (p.get(&fitted) * 1e6).round() / 1e6;
        let mut rounded = fitted.clone();
        p.set(&mut rounded, v.clamp(lo, hi));
        // Not where rounding would take a value out of range (attention's backward
        // value at the bottom of its range).
        if rounded.validate().is_ok() {
            fitted = rounded;
        }
    }
    // The fit is for the runs' device (one device type, `compile_runs`), whatever
    // table it started from.
    let device = compiled.lock().expect("runs lock")[0]
        .compiler
        .cluster
        .device
        .name
        .clone();
    let start_for_other = !start.devices.is_empty() && !start.devices.contains(&device);
    fitted.devices = vec![device.clone()];
    let mut compiled = compiled.into_inner().expect("runs lock");
    let residuals: Vec<Residual> = compiled
        .iter_mut()
        .map(|r| {
            // The fit keeps every value inside its bounds, which `validate` accepts.
            let e = r
                .compiler
                .reprice(fitted.clone())
                .and_then(|()| r.compiler.evaluate(&r.config));
            let (t, peak) = e.map_or((f64::INFINITY, 0), |e| (e.step_time_s, e.peak_bytes));
            Residual {
                measured_s: r.run.step_time_s,
                predicted_s: t,
                measured_peak_bytes: r.run.peak_memory_bytes,
                predicted_peak_bytes: peak,
                device_memory_bytes: r.compiler.budget_bytes,
            }
        })
        .collect();
    let mut warnings: Vec<String> = residuals
        .iter()
        .enumerate()
        .filter(|(_, r)| r.predicted_peak_bytes > r.device_memory_bytes)
        .map(|(i, r)| {
            format!(
                "run {}: apar predicts {} GiB on {} GiB devices, but it ran: apar's memory model or the run's description is wrong",
                i + 1,
                gib(r.predicted_peak_bytes),
                gib(r.device_memory_bytes)
            )
        })
        .collect();
    if start_for_other {
        warnings.push(format!(
            "the starting calibration is for {}, the runs ran on {device}: its values other than the fitted ones are another device's",
            start.devices.join(", ")
        ));
    }
    if iterations >= FIT_ITERATIONS {
        warnings.push(format!(
            "the fit stopped after {FIT_ITERATIONS} iterations without converging: the values may not be the best"
        ));
    }
    for (first, again) in &repeats {
        warnings.push(format!(
            "run {again} repeats the configuration of run {first}: it weighs that configuration twice and does not help tell the parameters apart"
        ));
    }
    if distinct == free.len() && repeats.is_empty() {
        warnings.push(format!(
            "{} run(s) for {} parameter(s): the fit can pass through every run, so its residuals cannot show whether the parameters are right; add runs to check it",
            runs.len(),
            free.len()
        ));
    } else if distinct == free.len() {
        warnings.push(format!(
            "{distinct} distinct configuration(s) for {} parameter(s): the residuals cannot show whether the parameters are right; add runs of other configurations to check it",
            free.len()
        ));
    }
    for p in free {
        let (lo, hi) = p.bounds(&start);
        let v = p.get(&fitted);
        let edge = FIT_START_STEP * 1e-3;
        if v - lo <= edge * hi.max(1e-9) || hi - v <= edge * hi.max(1e-9) {
            warnings.push(format!(
                "`{p}` stopped at the end of its range [{lo}, {hi}] ({v:.4}): the runs ask for a value it cannot take, so what they measure is not (only) what it prices"
            ));
        }
    }
    if free.contains(&Param::Overlap)
        && fitted.overlap_slowdown > crate::cost::calibration::MEASURED_MAX_OVERLAP_SLOWDOWN
    {
        warnings.push(format!(
            "`overlap_slowdown` fitted to {:.3}, above the largest slowdown measured beside a collective ({:.2}, Agrawal et al. 2024, arXiv 2412.14335): the runs are slower than their compute and collectives for another reason (an unstated network, model code, host overhead), which this value then stands for",
            fitted.overlap_slowdown,
            crate::cost::calibration::MEASURED_MAX_OVERLAP_SLOWDOWN
        ));
    }
    let rms_log_error = (residuals
        .iter()
        .map(|r| (r.predicted_s / r.measured_s).ln().powi(2))
        .sum::<f64>()
        / residuals.len() as f64)
        .sqrt();
    if !rms_log_error.is_finite() {
        return Err(CalibrateError::Solver(
            "a run's predicted step time is not finite at the fitted values".into(),
        ));
    }
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
        fitted.sources.insert(
            "attention_bwd".into(),
            format!(
                "scaled with attention (fitted by `apar calibrate` to {} measured run(s)), from {:.4}",
                runs.len(),
                start.attention_bwd
            ),
        );
    }
    let params = free
        .iter()
        .map(|p| (p.name().to_string(), p.get(&start), p.get(&fitted)))
        .collect();
    Ok(Fit {
        iterations,
        warnings,
        params,
        calibration: fitted,
        residuals,
        rms_log_error,
    })
}

/// Refuses a free parameter that no run's prediction depends on
/// ([`FIT_MIN_SENSITIVITY`]): each is moved by [`FIT_START_STEP`] (down, as the start
/// simplex moves it; up from 0) and the runs re-priced.
fn check_sensitivity(
    runs: &mut [CompiledRun],
    start: &Calibration,
    free: &[Param],
) -> Result<(), CalibrateError> {
    let base = predict(runs, start);
    for &p in free {
        let v = p.get(start);
        let mut moved = start.clone();
        p.set(
            &mut moved,
            if v > 0.0 {
                v * (1.0 - FIT_START_STEP)
            } else {
                FIT_START_STEP
            },
        );
        let change = predict(runs, &moved)
            .iter()
            .zip(&base)
            .map(|(m, b)| (m / b - 1.0).abs())
            .filter(|c| !c.is_nan())
            .fold(0.0, f64::max);
        if change < FIT_MIN_SENSITIVITY {
            return Err(CalibrateError::Undetermined {
                param: p,
                hint: sensitivity_hint(p),
            });
        }
    }
    Ok(())
}

/// Bytes as GiB for a message: whole numbers without decimals (`80`), others with
/// one (`159.4`).
fn gib(bytes: u64) -> String {
    let g = bytes as f64 / f64::from(1u32 << 30);
    if g.fract() == 0.0 {
        format!("{g:.0}")
    } else {
        format!("{g:.1}")
    }
}
