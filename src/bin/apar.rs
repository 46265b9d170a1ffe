//! The `apar` command line. Parsing and printing only; the work is in the library.

use apar::cluster::{self, Cluster};
use apar::cost::Calibration;
use apar::engine::memory::{Precision, RuntimeOverhead};
use apar::engine::Engine;
use apar::ir::{self, Env, Graph};
use apar::lower::compile::{CompileError, DEFAULT_MEMORY_RATIO};
use apar::models::{self, Attention};
use apar::passes::{Config, Recompute, RecomputeModules, Schedule};
use apar::report::{self, OomReport};
use apar::train::{self, Stats, TrainOptions};
use apar::{calibrate, ModelSpec, Plan, PlanError, PlanOptions, Session};
use clap::{Parser, Subcommand, ValueEnum};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "apar",
    version,
    about = "Plans data, tensor and pipeline parallel training of transformer models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum AttentionArg {
    Eager,
    Flash,
}

#[derive(clap::Args)]
struct ModelArgs {
    /// Zoo name (see `apar models`), a Hugging Face config.json, or an IR file (.apir/.json).
    #[arg(long)]
    model: String,
    /// Override the attention form of a zoo or config.json model.
    #[arg(long, value_enum)]
    attention: Option<AttentionArg>,
    /// Override the number of layers of a zoo or config.json model.
    #[arg(long)]
    layers: Option<u32>,
}

/// `ModelArgs` where `--model` may be absent (`eval --plan`).
#[derive(clap::Args)]
struct OptModelArgs {
    /// Zoo name (see `apar models`), a Hugging Face config.json, or an IR file (.apir/.json).
    #[arg(long)]
    model: Option<String>,
    /// Override the attention form of a zoo or config.json model.
    #[arg(long, value_enum)]
    attention: Option<AttentionArg>,
    /// Override the number of layers of a zoo or config.json model.
    #[arg(long)]
    layers: Option<u32>,
}

/// `JobArgs` where the fields may be absent (`eval --plan`).
#[derive(clap::Args)]
struct OptJobArgs {
    /// Cluster preset with a node count (`dgx-h100:4`), a flavor (`moai-4xlarge`), or a JSON file.
    #[arg(long)]
    cluster: Option<String>,
    /// Sequences per training step.
    #[arg(long)]
    global_batch: Option<u64>,
    /// Sequence length.
    #[arg(long)]
    seq: Option<u64>,
    /// Fraction of device memory a plan may use.
    #[arg(long, allow_negative_numbers = true)]
    memory_ratio: Option<f64>,
    /// The engine that will run the configuration: megatron (default), deepspeed,
    /// torchtitan, hf.
    #[arg(long)]
    engine: Option<Engine>,
}

#[derive(Subcommand)]
enum Command {
    /// List the built-in models.
    Models {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the cluster presets.
    Clusters,
    /// Print a model's IR (forward, or the training graph with --train).
    Ir {
        #[command(flatten)]
        model: ModelArgs,
        /// Print the training graph (forward, backward, optimizer).
        #[arg(long)]
        train: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Parse and verify an IR file (.apir text, .json, or binary).
    Check {
        /// The file.
        file: PathBuf,
    },
    /// Parameters, FLOPs and memory of one training step of a model.
    Stats {
        #[command(flatten)]
        model: ModelArgs,
        /// Sequence length.
        #[arg(long)]
        seq: u64,
        /// Micro-batch size (sequences).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
        micro_batch: u64,
        /// Tensor-parallel degree: report per-device numbers of the sharded model.
        #[arg(long, default_value_t = 1)]
        tp: u32,
        /// Sequence parallelism (with --tp > 1).
        #[arg(long)]
        sp: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print one block of the tensor-parallel (per-device) model, with its collectives.
    Shard {
        #[command(flatten)]
        model: ModelArgs,
        /// Tensor-parallel degree.
        #[arg(long)]
        tp: u32,
        /// Sequence parallelism.
        #[arg(long)]
        sp: bool,
        /// Block index in model order: 0 the embedding, 1..=L the layers, L+1 the head.
        #[arg(long, default_value_t = 1)]
        block: u32,
        /// Print the block of the training graph (forward, backward, optimizer).
        #[arg(long)]
        train: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Search every parallel configuration and print the fastest that fits.
    Plan {
        /// Zoo name (see `apar models`), a Hugging Face config.json, or an IR file.
        #[arg(long, default_value = "llama2-13b")]
        model: String,
        /// Override the attention form of a zoo or config.json model.
        #[arg(long, value_enum)]
        attention: Option<AttentionArg>,
        /// Override the number of layers of a zoo or config.json model.
        #[arg(long)]
        layers: Option<u32>,
        /// Cluster preset with a node count, a flavor, or a JSON file.
        #[arg(long, default_value = "moai-4xlarge")]
        cluster: String,
        /// Sequences per training step.
        #[arg(long, default_value_t = 64)]
        global_batch: u64,
        /// Sequence length.
        #[arg(long, default_value_t = 1024)]
        seq: u64,
        /// Fraction of device memory a plan may use.
        #[arg(long, default_value_t = DEFAULT_MEMORY_RATIO, allow_negative_numbers = true)]
        memory_ratio: f64,
        /// The engine that will run the plan: megatron, deepspeed, torchtitan, hf.
        #[arg(long, default_value = "megatron")]
        engine: Engine,
        /// Pin the tensor-parallel degree.
        #[arg(long)]
        tp: Option<u32>,
        /// Pin the number of pipeline stages.
        #[arg(long)]
        pp: Option<u32>,
        /// Pin the data-parallel degree.
        #[arg(long)]
        dp: Option<u32>,
        /// Pin the context-parallel degree (the sequence split over N ranks, ring
        /// attention); without it, degrees above 1 are tried from 16,384 tokens up.
        #[arg(long)]
        cp: Option<u32>,
        /// Bound the context-parallel degree.
        #[arg(long)]
        max_cp: Option<u32>,
        /// Pin the expert-parallel degree (mixture-of-experts models: E/ep experts per
        /// rank, tokens exchanged by all-to-all); without it, every power of two
        /// dividing the experts and tp × cp × dp is tried.
        #[arg(long)]
        ep: Option<u32>,
        /// Bound the expert-parallel degree.
        #[arg(long)]
        max_ep: Option<u32>,
        /// Pin the expert-tensor-parallel degree (1 or the candidate's tp).
        #[arg(long)]
        etp: Option<u32>,
        /// Bound the number of pipeline stages.
        #[arg(long)]
        max_stages: Option<u32>,
        /// Bound the tensor-parallel degree.
        #[arg(long)]
        max_tp: Option<u32>,
        /// Pin the micro-batch size.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        micro_batch: Option<u32>,
        /// Pin sequence parallelism (true/false).
        #[arg(long)]
        sp: Option<bool>,
        /// Pin the recomputation policy.
        #[arg(long, value_enum)]
        recompute: Option<RecomputeArg>,
        /// Recompute only the first K layers of each pipeline stage (with a policy).
        #[arg(long)]
        recompute_layers: Option<u32>,
        /// Pin Megatron-LM's selective recompute modules, comma-separated: core_attn, mlp
        /// (layernorm and the MoE modules are refused); implies --recompute selective.
        #[arg(long, value_parser = parse_recompute_modules)]
        recompute_modules: Option<RecomputeModules>,
        /// Pin the ZeRO stage (0–3).
        #[arg(long, value_parser = clap::value_parser!(u8).range(0..=3))]
        zero: Option<u8>,
        /// Pin low-precision parameter sharding (true/false).
        #[arg(long)]
        low_prec_shard: Option<bool>,
        /// Pin the schedule: gpipe, 1f1b, interleaved:V.
        #[arg(long, value_parser = parse_schedule)]
        schedule: Option<Schedule>,
        /// Compile every candidate fully (no memory lower-bound shortcut).
        #[arg(long)]
        exhaustive: bool,
        /// Write every candidate with its peak memory, step time or rejection reason.
        #[arg(long)]
        detailed_log: Option<PathBuf>,
        #[command(flatten)]
        memory: MemoryArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Fit cost parameters to measured runs and write a calibration file.
    Calibrate {
        /// The runs: files of CSV with a header row, or of a JSON array (fields in the
        /// README, "Calibrating to your cluster"); several files are fitted together.
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// Parameters to fit, comma separated, each once: matmul, attention, memory, link,
        /// overlap_slowdown.
        #[arg(long, default_value = "matmul")]
        fit: String,
        /// Start from this calibration file instead of the device's built-in table.
        #[arg(long)]
        calibration: Option<PathBuf>,
        /// Write the fitted calibration file here (for `--calibration`).
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Print JSON (the fit, its parameters, residuals and warnings).
        #[arg(long)]
        json: bool,
    },
    /// Compile and simulate one parallel configuration.
    Eval {
        /// Re-cost a saved plan (from `--save`, possibly edited) instead of the flags below
        /// (with `--calibration FILE`, at that calibration instead of the plan's).
        #[arg(long, conflicts_with_all = [
            "model", "attention", "layers", "cluster", "global_batch", "seq", "memory_ratio",
            "engine", "dp", "tp", "pp", "cp", "ep", "etp", "micro_batch", "sp", "recompute", "recompute_layers",
            "recompute_modules", "zero", "low_prec_shard", "schedule", "precision", "grad_dtype",
            "optimizer_dtype", "runtime_overhead_gib", "no_overlap_grad_reduce",
            "no_overlap_param_gather", "no_tp_comm_overlap", "moe_imbalance",
        ])]
        plan: Option<PathBuf>,
        #[command(flatten)]
        model: OptModelArgs,
        #[command(flatten)]
        job: OptJobArgs,
        /// Data-parallel degree.
        #[arg(long)]
        dp: Option<u32>,
        /// Tensor-parallel degree.
        #[arg(long, default_value_t = 1)]
        tp: u32,
        /// Pipeline stages.
        #[arg(long, default_value_t = 1)]
        pp: u32,
        /// Context-parallel degree: the sequence split over N ranks (ring attention).
        #[arg(long, default_value_t = 1)]
        cp: u32,
        /// Expert-parallel degree (mixture-of-experts models).
        #[arg(long, default_value_t = 1)]
        ep: u32,
        /// Expert-tensor-parallel degree, 1 or tp (default: tp for a mixture-of-experts
        /// model, Megatron-LM's default; 1 for a dense one).
        #[arg(long)]
        etp: Option<u32>,
        /// Sequences per micro-batch.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        micro_batch: u32,
        /// Sequence parallelism (needs --tp > 1).
        #[arg(long)]
        sp: bool,
        /// Activation recomputation (default: none, or selective with --recompute-modules).
        #[arg(long, value_enum)]
        recompute: Option<RecomputeArg>,
        /// Recompute only the first K layers of each pipeline stage.
        #[arg(long)]
        recompute_layers: Option<u32>,
        /// Megatron-LM's selective recompute modules, comma-separated: core_attn, mlp
        /// (layernorm and the MoE modules are refused); implies --recompute selective.
        #[arg(long, value_parser = parse_recompute_modules)]
        recompute_modules: Option<RecomputeModules>,
        /// ZeRO stage (0–3).
        #[arg(long, default_value_t = 0)]
        zero: u8,
        /// Shard the low-precision parameter copy over data-parallel ranks.
        #[arg(long)]
        low_prec_shard: bool,
        /// Pipeline schedule: gpipe, 1f1b, interleaved:V.
        #[arg(long, default_value = "1f1b", value_parser = parse_schedule)]
        schedule: Schedule,
        #[command(flatten)]
        memory: MemoryArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
}

/// Precision, runtime-memory and cost options of `plan` and `eval`.
#[derive(clap::Args)]
struct MemoryArgs {
    /// Compute precision: bf16 (default), fp16, fp32, or fp8 (bf16 with FP8 GEMMs in the
    /// transformer layers; Megatron-LM and torchtitan, on devices with FP8 tensor cores).
    #[arg(long)]
    precision: Option<Precision>,
    /// Gradient buffer dtype: fp32, bf16, fp16 (default: the engine's; Megatron-LM
    /// keeps fp32 main gradients for bf16).
    #[arg(long, value_parser = parse_float_dtype)]
    grad_dtype: Option<apar::ir::DType>,
    /// Master-parameter and Adam-moment dtype: fp32 (default), bf16 or fp16.
    #[arg(long, value_parser = parse_float_dtype)]
    optimizer_dtype: Option<apar::ir::DType>,
    /// Runtime overhead per device in GiB (CUDA context, NCCL buffers, allocator
    /// reserve), replacing apar's estimate.
    #[arg(long, allow_negative_numbers = true)]
    runtime_overhead_gib: Option<f64>,
    /// Cost parameters from a calibration file (`apar calibrate -o FILE`, or a copy of
    /// a built-in table from `calibration/`) instead of the device's built-in table.
    #[arg(long)]
    calibration: Option<PathBuf>,
    /// Price the job as Megatron-LM runs without `--overlap-grad-reduce`: every
    /// gradient reduction after the step's last backward (implies
    /// --no-overlap-param-gather). For a measured run made at Megatron-LM's defaults;
    /// without it plans are priced and exported with overlap on, with it the export
    /// leaves the flag out.
    #[arg(long)]
    no_overlap_grad_reduce: bool,
    /// Price the job as Megatron-LM runs without `--overlap-param-gather`: the
    /// distributed optimizer's parameter all-gather after the step, exposed.
    #[arg(long)]
    no_overlap_param_gather: bool,
    /// Price the job as Megatron-LM runs without `--tp-comm-overlap`: with sequence
    /// parallelism, every tensor-parallel all-gather and reduce-scatter on the
    /// critical path instead of beside its GEMM (Transformer Engine userbuffers).
    #[arg(long)]
    no_tp_comm_overlap: bool,
    /// Expert load imbalance with expert parallelism: the busiest expert-parallel rank
    /// receives F times the mean routed tokens (default 1, balanced); its expert
    /// GEMMs and all-to-alls take F times as long (at most `ep` times: every routed
    /// token on one rank).
    #[arg(long, allow_negative_numbers = true)]
    moe_imbalance: Option<f64>,
}

impl MemoryArgs {
    fn apply(&self, o: &mut PlanOptions) -> Result<(), String> {
        o.comm_overlap = apar::engine::overlap::CommOverlap {
            grad_reduce: !self.no_overlap_grad_reduce,
            param_gather: !(self.no_overlap_grad_reduce || self.no_overlap_param_gather),
            tp_comm: !self.no_tp_comm_overlap,
        };
        if let Some(p) = self.precision {
            o.precision.compute = p;
        }
        o.precision.grad = self.grad_dtype.or(o.precision.grad);
        o.precision.optimizer = self.optimizer_dtype.or(o.precision.optimizer);
        if let Some(g) = self.runtime_overhead_gib {
            if !(g.is_finite() && (0.0..=1e6).contains(&g)) {
                return Err(format!(
                    "--runtime-overhead-gib {g} must be between 0 and 1e6"
                ));
            }
            o.runtime = Some(RuntimeOverhead::fixed((g * (1u64 << 30) as f64) as u64));
        }
        if let Some(path) = &self.calibration {
            o.calibration = Some(Calibration::from_json_file(path).map_err(|e| e.to_string())?);
        }
        if let Some(f) = self.moe_imbalance {
            if !(f.is_finite() && (1.0..=1e3).contains(&f)) {
                return Err(format!("--moe-imbalance {f} must be between 1 and 1000"));
            }
            o.moe_imbalance = f;
        }
        Ok(())
    }
}

fn parse_float_dtype(s: &str) -> Result<apar::ir::DType, String> {
    apar::engine::memory::parse_float_dtype(s).map_err(|e| e.to_string())
}

#[derive(Clone, Copy, ValueEnum)]
enum RecomputeArg {
    None,
    Selective,
    Full,
}

impl From<RecomputeArg> for Recompute {
    fn from(r: RecomputeArg) -> Recompute {
        match r {
            RecomputeArg::None => Recompute::None,
            RecomputeArg::Selective => Recompute::Selective,
            RecomputeArg::Full => Recompute::Full,
        }
    }
}

fn parse_recompute_modules(s: &str) -> Result<RecomputeModules, String> {
    s.parse()
        .map_err(|e: apar::passes::recompute::ModulesError| e.to_string())
}

/// The policy and module set of `--recompute` and `--recompute-modules`: modules imply
/// selective recomputation, and the engine's own default set is spelled as none.
fn recompute_pins(
    recompute: Option<RecomputeArg>,
    modules: Option<RecomputeModules>,
    engine: Engine,
) -> Result<(Option<Recompute>, Option<RecomputeModules>), String> {
    let recompute: Option<Recompute> = recompute.map(Into::into);
    let Some(m) = modules else {
        return Ok((recompute, None));
    };
    match recompute {
        None | Some(Recompute::Selective) => {}
        Some(r) => {
            return Err(format!(
                "--recompute-modules {m} needs --recompute selective, not {r}"
            ))
        }
    }
    let m = (engine.default_recompute_modules() != Some(m)).then_some(m);
    Ok((Some(Recompute::Selective), m))
}

fn parse_schedule(s: &str) -> Result<Schedule, String> {
    Schedule::parse(s).ok_or_else(|| format!("`{s}` is not gpipe, 1f1b or interleaved:V (V ≥ 2)"))
}

#[derive(clap::Args)]
struct JobArgs {
    /// Cluster preset with a node count (`dgx-h100:4`), a flavor (`moai-4xlarge`), or a JSON file.
    #[arg(long)]
    cluster: String,
    /// Sequences per training step.
    #[arg(long)]
    global_batch: u64,
    /// Sequence length.
    #[arg(long)]
    seq: u64,
    /// Fraction of device memory a plan may use.
    #[arg(long, default_value_t = DEFAULT_MEMORY_RATIO, allow_negative_numbers = true)]
    memory_ratio: f64,
}

#[derive(clap::Args, Clone)]
struct OutputArgs {
    /// Print the plan's engine configuration instead of the report (`--emit`, or
    /// `--emit ENGINE` naming the plan's engine); its environment variables and notes
    /// go to standard error, and a plan the engine cannot run is exit 2.
    #[arg(long, num_args = 0..=1, default_missing_value = "")]
    emit: Option<String>,
    /// Save the plan (JSON, re-costable with `apar eval --plan FILE`).
    #[arg(long)]
    save: Option<PathBuf>,
    /// Print JSON.
    #[arg(long, conflicts_with = "emit")]
    json: bool,
    /// Write a Chrome/Perfetto trace of the simulated step.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Write an SVG plot of the memory timeline.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Leave wall-clock timings out of the output and the saved plan (stable snapshots).
    #[arg(long)]
    no_timings: bool,
}

/// Whether `a` and `b` name one file: the same path, or the same file once their
/// folders are resolved (`./f` and `f`; a file not written yet has no canonical path of
/// its own, its folder does).
fn same_file(a: &Path, b: &Path) -> bool {
    fn resolved(p: &Path, depth: u32) -> Option<PathBuf> {
        if let Ok(c) = std::fs::canonicalize(p) {
            return Some(c);
        }
        let parent = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        // A dangling symbolic link names the file it will create.
        if let (Ok(target), true) = (std::fs::read_link(p), depth < 8) {
            return resolved(&parent.join(target), depth + 1);
        }
        Some(std::fs::canonicalize(parent).ok()?.join(p.file_name()?))
    }
    // Hard links: one file under two names (same device and inode).
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(x), Ok(y)) = (std::fs::metadata(a), std::fs::metadata(b)) {
            if x.dev() == y.dev() && x.ino() == y.ino() {
                return true;
            }
        }
    }
    a == b || matches!((resolved(a, 0), resolved(b, 0)), (Some(x), Some(y)) if x == y)
}

impl OutputArgs {
    /// Refuses two outputs written to one file (the second would overwrite the first),
    /// and an output written over one of the command's `inputs` (model, cluster and
    /// calibration files; names that are not files are skipped). A saved plan may be
    /// re-costed onto itself: it is read whole before anything is written.
    fn check(&self, inputs: &[&str]) -> Result<(), Failure> {
        self.check_with(inputs, None)
    }

    /// As [`OutputArgs::check`], with one more output of the command (`plan
    /// --detailed-log`).
    fn check_with(&self, inputs: &[&str], extra: Option<(&str, &PathBuf)>) -> Result<(), Failure> {
        let extra = extra.map(|(flag, p)| (flag, Some(p.clone())));
        let mut files = vec![
            ("--save", &self.save),
            ("--trace", &self.trace),
            ("--svg", &self.svg),
        ];
        if let Some((flag, p)) = &extra {
            files.push((*flag, p));
        }
        for (i, (a, pa)) in files.iter().enumerate() {
            for (b, pb) in &files[i + 1..] {
                if let (Some(x), Some(y)) = (pa, pb) {
                    if same_file(x, y) {
                        return Err(bad(format!(
                            "{a} and {b} both write {}: give them different files",
                            x.display()
                        )));
                    }
                }
            }
            if let Some(x) = pa {
                if let Some(p) = overwritten(x, inputs.iter().map(Path::new)) {
                    return Err(bad(format!(
                        "{a} {} is one of the command's input files: writing it would overwrite {}",
                        x.display(),
                        p.display()
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Refuses a tensor-parallel degree `tp` that does not divide `cfg`'s heads, key/value
/// heads or feed-forward channels, with `eval`'s message
/// ([`models::ModelConfig::tp_indivisible`]).
fn check_tp_divides(cfg: &models::ModelConfig, tp: u32) -> Result<(), Failure> {
    match cfg.tp_indivisible(tp) {
        Some((what, count)) => Err(bad(CompileError::TpNotDividingHeads {
            model: cfg.name.clone(),
            tp,
            what,
            count,
        })),
        None => Ok(()),
    }
}

/// The first of `inputs` that is an existing file `out` would overwrite.
fn overwritten<'a>(out: &Path, inputs: impl IntoIterator<Item = &'a Path>) -> Option<&'a Path> {
    inputs
        .into_iter()
        .find(|p| p.is_file() && same_file(out, p))
}

/// A failure with its exit code (1 infeasible, 2 bad input), its message for standard
/// error, and what standard output still gets (the out-of-memory report).
struct Failure {
    code: u8,
    message: String,
    stdout: String,
}

fn bad(message: impl ToString) -> Failure {
    Failure {
        code: 2,
        message: message.to_string(),
        stdout: String::new(),
    }
}

/// Writes `text` to standard output. A closed pipe (`| head`) ends quietly; any other
/// write error (`> /dev/full`) is exit 2 with its message.
fn emit_stdout(text: &str) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(bad(format!("cannot write the output: {e}"))),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (code, stdout, message) = match run(cli) {
        Ok(text) => (0, text, String::new()),
        Err(f) => (f.code, f.stdout, f.message),
    };
    let code = match emit_stdout(&stdout) {
        Ok(()) => code,
        Err(f) => {
            let _ = writeln!(std::io::stderr(), "error: {}", f.message);
            return ExitCode::from(2);
        }
    };
    if !message.is_empty() {
        let _ = writeln!(std::io::stderr(), "error: {message}");
    }
    ExitCode::from(code)
}

/// A step time for the fit's table: four decimals, or four significant digits below a
/// millisecond (where four decimals would print zero).
fn seconds(t: f64) -> String {
    if t >= 1e-3 {
        format!("{t:.4}")
    } else {
        format!("{t:.3e}")
    }
}

/// The fitted parameters and the residual of every run.
fn fit_text(fit: &calibrate::Fit, runs: &[calibrate::Run]) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "parameter            start    fitted");
    for (name, start, value) in &fit.params {
        let _ = writeln!(o, "{name:<17} {start:8.4}  {value:8.4}");
    }
    // A model file by its name, and the attention when the run names one.
    let models: Vec<String> = runs
        .iter()
        .map(|run| {
            let file = run.model_name();
            match run.attention {
                Some(Attention::Flash) => format!("{file} (flash)"),
                Some(Attention::Eager) => format!("{file} (eager)"),
                None => file.to_string(),
            }
        })
        .collect();
    let w = models
        .iter()
        .map(|m| m.chars().count())
        .max()
        .unwrap_or(0)
        .max(5);
    let _ = writeln!(
        o,
        "\n run  {:<w$}  dp  tp  pp   b  recompute   measured s  predicted s   error  peak GiB (measured / apar)",
        "model"
    );
    for (i, ((run, r), model)) in runs.iter().zip(&fit.residuals).zip(&models).enumerate() {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let peak = match r.measured_peak_bytes {
            Some(m) => format!("{:.1} / {:.1}", gib(m), gib(r.predicted_peak_bytes)),
            None => format!("- / {:.1}", gib(r.predicted_peak_bytes)),
        };
        let _ = writeln!(
            o,
            "{:>4}  {model:<w$} {:>3} {:>3} {:>3} {:>3}  {:<10} {:>11} {:>12} {:>+6.1}%  {peak}",
            i + 1,
            run.dp,
            run.tp,
            run.pp,
            run.micro_batch,
            run.recompute.name(),
            seconds(r.measured_s),
            seconds(r.predicted_s),
            100.0 * r.error(),
        );
    }
    let _ = writeln!(
        o,
        "rms log error {:.2}% ({} Nelder-Mead iterations)",
        100.0 * fit.rms_log_error,
        fit.iterations
    );
    o
}

fn spec(model: &str, attention: Option<AttentionArg>, layers: Option<u32>) -> ModelSpec {
    let mut spec = ModelSpec::parse(model);
    spec.attention = attention.map(|a| match a {
        AttentionArg::Eager => Attention::Eager,
        AttentionArg::Flash => Attention::Flash,
    });
    spec.layers = layers;
    spec
}

fn load_model(args: &ModelArgs) -> Result<models::LoadedModel, Failure> {
    spec(&args.model, args.attention, args.layers)
        .load()
        .map_err(bad)
}

/// The failure of a library call: the out-of-memory report on standard output with
/// exit 1 (its trace and plot written if asked; on standard error under `--emit`, whose
/// standard output is the engine configuration a script captures), anything else
/// exit 2.
fn failure(e: PlanError, out: &OutputArgs) -> Failure {
    match e {
        PlanError::OutOfMemory(oom) => match oom_output(&oom, out) {
            Ok(report) if out.emit.is_some() => Failure {
                code: 1,
                message: format!(
                    "out of memory, nothing to emit; the out-of-memory report:\n{}",
                    report.trim_end()
                ),
                stdout: String::new(),
            },
            Ok(stdout) => Failure {
                code: 1,
                message: String::new(),
                stdout,
            },
            Err(f) => f,
        },
        other => bad(other),
    }
}

fn oom_output(oom: &OomReport, out: &OutputArgs) -> Result<String, Failure> {
    if let Some(memory) = &oom.memory {
        write_files(
            out,
            || report::trace::chrome_trace(&oom.trace, oom.config.pp),
            || report::trace::memory_svg(&oom.trace, memory, oom.step_time_s),
        )?;
    }
    let text = if out.json { pretty(oom)? } else { oom.text() };
    Ok(format!("{}\n", text.trim_end()))
}

fn write_file(path: &PathBuf, text: &str) -> Result<(), Failure> {
    std::fs::write(path, text).map_err(|err| bad(format!("{}: {err}", path.display())))
}

fn write_files(
    out: &OutputArgs,
    trace: impl FnOnce() -> serde_json::Value,
    svg: impl FnOnce() -> String,
) -> Result<(), Failure> {
    if let Some(p) = &out.trace {
        write_file(p, &pretty(&trace())?)?;
    }
    if let Some(p) = &out.svg {
        write_file(p, &svg())?;
    }
    Ok(())
}

/// Everything a fitting plan prints and writes: trace, plot, saved plan, then the
/// engine configuration, the JSON document or the log.
fn plan_output(plan: Plan, out: &OutputArgs) -> Result<String, Failure> {
    let plan = if out.no_timings {
        plan.without_timings()
    } else {
        plan
    };
    write_files(out, || plan.chrome_trace(), || plan.memory_svg())?;
    if let Some(path) = &out.save {
        write_file(path, &pretty(&plan)?)?;
    }
    if let Some(name) = &out.emit {
        let engine = if name.is_empty() {
            plan.engine
        } else {
            name.parse::<Engine>().map_err(bad)?
        };
        if engine != plan.engine {
            return Err(bad(format!(
                "the plan is for {}; plan with --engine {engine} to export for {engine}",
                plan.engine
            )));
        }
        let export = plan.export(engine).map_err(bad)?;
        // The text goes to standard output as the engine reads it; the environment
        // and the notes go to standard error.
        let mut err = std::io::stderr().lock();
        for w in &plan.warnings {
            let _ = writeln!(err, "warning: {w}");
        }
        if !export.env.is_empty() {
            let _ = writeln!(err, "env: {}", export.env_prefix());
        }
        for n in &export.notes {
            let _ = writeln!(err, "note: {n}");
        }
        return Ok(export.text);
    }
    if out.json {
        let text =
            serde_json::to_string(&plan).map_err(|e| bad(format!("cannot write JSON: {e}")))?;
        return Ok(text + "\n");
    }
    let mut text = plan.log();
    for w in &plan.warnings {
        let _ = writeln!(text, "warning: {w}");
    }
    Ok(text)
}

/// Draws a progress bar on standard error (only on a terminal), every 1/64 of the work.
fn progress_bar(done: usize, total: usize) {
    let step = (total / 64).max(1);
    if done % step == 0 || done == total {
        let filled = 40 * done / total.max(1);
        let _ = write!(
            std::io::stderr(),
            "\r[{}{}] {done}/{total} compile steps",
            "#".repeat(filled),
            " ".repeat(40 - filled)
        );
    }
}

fn training(fwd: &Graph) -> Result<Graph, Failure> {
    train::training_graph(fwd, &TrainOptions::default()).map_err(bad)
}

fn run(cli: Cli) -> Result<String, Failure> {
    let mut o = String::new();
    match cli.command {
        Command::Models { json } => {
            let rows = models::zoo::ZOO
                .iter()
                .map(|e| {
                    let cfg = (e.config)();
                    (e, cfg.param_count(), cfg)
                })
                .collect::<Vec<_>>();
            if json {
                let list: Vec<_> = rows
                    .iter()
                    .map(|(e, params, cfg)| {
                        serde_json::json!({
                            "name": e.name, "params": params, "layers": cfg.layers,
                            "hidden": cfg.hidden, "heads": cfg.heads, "kv_heads": cfg.kv_heads,
                            "vocab": cfg.vocab, "attention": cfg.attention, "about": e.about,
                        })
                    })
                    .collect();
                let _ = writeln!(o, "{}", pretty(&list)?);
            } else {
                let _ = writeln!(
                    o,
                    "{:<18} {:>17} {:>6} {:>6} {:>5} {:>4} {:>7}  about",
                    "model", "params", "layers", "hidden", "heads", "kv", "attn"
                );
                for (e, params, cfg) in rows {
                    let attn = match cfg.attention {
                        Attention::Eager => "eager",
                        Attention::Flash => "flash",
                    };
                    let _ = writeln!(
                        o,
                        "{:<18} {:>17} {:>6} {:>6} {:>5} {:>4} {:>7}  {}",
                        e.name,
                        group(params),
                        cfg.layers,
                        cfg.hidden,
                        cfg.heads,
                        cfg.kv_heads,
                        attn,
                        e.about
                    );
                }
            }
        }
        Command::Plan {
            model,
            attention,
            layers,
            cluster,
            global_batch,
            seq,
            memory_ratio,
            engine,
            tp,
            pp,
            dp,
            cp,
            max_cp,
            ep,
            max_ep,
            etp,
            max_stages,
            max_tp,
            micro_batch,
            sp,
            recompute,
            recompute_layers,
            recompute_modules,
            zero,
            low_prec_shard,
            schedule,
            exhaustive,
            detailed_log,
            memory,
            out,
        } => {
            let calibration_path = memory
                .calibration
                .as_ref()
                .map(|p| p.to_string_lossy().into_owned());
            let mut inputs = vec![model.as_str(), cluster.as_str()];
            inputs.extend(calibration_path.as_deref());
            out.check_with(
                &inputs,
                detailed_log.as_ref().map(|p| ("--detailed-log", p)),
            )?;
            // The pinned set goes to the search as given (`enumerate_for` spells the
            // engine's default set as none).
            let (recompute, _) =
                recompute_pins(recompute, recompute_modules, engine).map_err(bad)?;
            let mut options = PlanOptions {
                seq,
                global_batch,
                memory_ratio,
                engine,
                search: apar::search::SearchOptions {
                    constraints: apar::passes::candidates::Constraints {
                        tp,
                        pp,
                        dp,
                        cp,
                        max_cp,
                        ep,
                        max_ep,
                        etp,
                        max_stages,
                        max_tp,
                        micro_batch,
                        sp,
                        recompute,
                        recompute_layers,
                        recompute_modules,
                        zero,
                        low_prec_shard,
                        schedule,
                        max_chunks: None,
                    },
                    exhaustive,
                    runners_up: 3,
                },
                ..PlanOptions::new(seq, global_batch)
            };
            memory.apply(&mut options).map_err(bad)?;
            let cluster = Cluster::resolve(&cluster).map_err(bad)?;
            let session = Session::for_spec(&spec(&model, attention, layers), &cluster, &options)
                .map_err(bad)?;
            let r = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                let r = session.search(&progress_bar);
                let _ = write!(std::io::stderr(), "\r{:60}\r", "");
                r
            } else {
                session.search(&|_, _| {})
            };
            if let Some(path) = &detailed_log {
                write_file(path, &report::detailed_log(&r.outcomes))?;
            }
            match session.conclude(&r) {
                Ok(plan) => o.push_str(&plan_output(plan, &out)?),
                Err(e @ PlanError::OutOfMemory(_)) => {
                    let mut f = failure(e, &out);
                    if out.emit.is_some() {
                        // Standard output stays the (absent) engine configuration; the
                        // search log goes after the message's first line.
                        let (head, rest) = f.message.split_once('\n').unwrap_or((&f.message, ""));
                        f.message = format!("{head}\n{}{rest}", report::search_log(&r.stats));
                    } else if !out.json {
                        f.stdout = report::search_log(&r.stats) + &f.stdout;
                    }
                    return Err(f);
                }
                Err(e) => return Err(failure(e, &out)),
            }
        }
        Command::Shard {
            model,
            tp,
            sp,
            block,
            train,
            json,
        } => {
            if tp == 0 {
                return Err(bad("--tp must be positive"));
            }
            let m = load_model(&model)?;
            if m.is_training {
                return Err(bad("shard a forward model, not a training graph"));
            }
            if let Some(cfg) = &m.config {
                check_tp_divides(cfg, tp)?;
            }
            let blocks: std::collections::BTreeSet<ir::Block> =
                m.graph.ops().map(|o| m.graph.node(o).block).collect();
            let Some(&b) = blocks.iter().nth(block as usize) else {
                return Err(bad(format!(
                    "--block {block}: the model has blocks 0..={}",
                    blocks.len().saturating_sub(1)
                )));
            };
            // Priced as the planner prices it: a model with a configuration has its
            // projection, embedding and output weights split, as every engine's tensor
            // parallelism does.
            let price = apar::shard::ModelCost {
                min_split_dim: m.config.as_ref().map(models::ModelConfig::tp_split_dim),
                ..apar::shard::ModelCost::tensor_parallel(
                    apar::shard::cost::default_cost_model(),
                    tp,
                )
            };
            let sharded =
                apar::shard::Sharder::with_cost(apar::shard::ShardOptions::new(tp, sp), &price)
                    .shard_model(&m.graph)
                    .map_err(bad)?;
            let g = if train {
                sharded.training_block(b, &TrainOptions::default())
            } else {
                sharded.block_graph(b)
            }
            .map_err(bad)?;
            if json {
                let _ = writeln!(o, "{}", ir::json::to_json(&g));
            } else {
                if let Some(r) = sharded.report(b) {
                    let _ =
                        writeln!(o,
                        "# {b} at tp {tp}{}: {} iterations, {} e-nodes, {} e-classes, stop: {:?}",
                        if sp { " with sp" } else { "" },
                        r.iterations,
                        r.enodes,
                        r.eclasses,
                        r.stop
                    );
                }
                o.push_str(&ir::text::print(&g));
            }
        }
        Command::Clusters => {
            let _ = writeln!(o, "{:<16}  about", "cluster");
            for (name, about) in cluster::presets() {
                let _ = writeln!(o, "{name:<16}  {about}");
            }
            let _ = writeln!(
                o,
                "\nor a JSON file with the fields of `apar::cluster::Cluster`"
            );
        }
        Command::Eval {
            plan,
            model,
            job,
            dp,
            tp,
            pp,
            cp,
            ep,
            etp,
            micro_batch,
            sp,
            recompute,
            recompute_layers,
            recompute_modules,
            zero,
            low_prec_shard,
            schedule,
            memory,
            out,
        } => {
            let calibration_path = memory
                .calibration
                .as_ref()
                .map(|p| p.to_string_lossy().into_owned());
            let mut inputs: Vec<&str> = Vec::new();
            inputs.extend(model.model.as_deref());
            inputs.extend(job.cluster.as_deref());
            inputs.extend(calibration_path.as_deref());
            out.check(&inputs)?;
            if let Some(path) = plan {
                let mut saved = Session::read_plan(&path).map_err(bad)?;
                // The saved plan may be re-saved onto itself (it is read whole first),
                // but a trace or plot over it, or any output over the model file it
                // loads, would lose an input.
                let no_save = OutputArgs {
                    save: None,
                    ..out.clone()
                };
                let path_text = path.to_string_lossy().into_owned();
                no_save.check(&[path_text.as_str()])?;
                out.check(&[saved.model.name.as_str()])?;
                if let Some(c) = &memory.calibration {
                    saved.calibration = Some(Calibration::from_json_file(c).map_err(bad)?);
                }
                let plan = Session::recost(&saved).map_err(|e| failure(e, &out))?;
                o.push_str(&plan_output(plan, &out)?);
                return Ok(o);
            }
            let need = |what: &str| bad(format!("eval needs --{what} (or --plan FILE)"));
            let mut options = PlanOptions {
                memory_ratio: job.memory_ratio.unwrap_or(DEFAULT_MEMORY_RATIO),
                engine: job.engine.unwrap_or_default(),
                ..PlanOptions::new(
                    job.seq.ok_or_else(|| need("seq"))?,
                    job.global_batch.ok_or_else(|| need("global-batch"))?,
                )
            };
            memory.apply(&mut options).map_err(bad)?;
            let spec = spec(
                &model.model.ok_or_else(|| need("model"))?,
                model.attention,
                model.layers,
            );
            let cluster =
                Cluster::resolve(&job.cluster.ok_or_else(|| need("cluster"))?).map_err(bad)?;
            let dp = dp.ok_or_else(|| need("dp"))?;
            let (recompute, recompute_modules) =
                recompute_pins(recompute, recompute_modules, options.engine).map_err(bad)?;
            let recompute = recompute.unwrap_or(Recompute::None);
            let session = Session::for_spec(&spec, &cluster, &options).map_err(bad)?;
            let etp = etp.unwrap_or_else(|| session.default_etp(tp));
            let config = session
                .with_micro_batches(Config {
                    dp,
                    tp,
                    pp,
                    cp,
                    ep,
                    etp,
                    micro_batch,
                    num_micro_batches: 0,
                    sp,
                    recompute,
                    recompute_layers,
                    recompute_modules,
                    zero,
                    low_prec_shard,
                    schedule,
                })
                .map_err(bad)?;
            let plan = session.evaluate(&config).map_err(|e| failure(e, &out))?;
            o.push_str(&plan_output(plan, &out)?);
        }
        Command::Calibrate {
            runs,
            fit,
            calibration,
            output,
            json,
        } => {
            let free = calibrate::parse_params(&fit).map_err(bad)?;
            // Writing the calibration over a run file would destroy the measurements.
            if let Some(out) = &output {
                if let Some(p) =
                    overwritten(out, runs.iter().chain(&calibration).map(PathBuf::as_path))
                {
                    return Err(bad(format!(
                        "-o {} is one of the input files: the calibration would overwrite it",
                        p.display()
                    )));
                }
                // A folder that is not there fails before the fit, not after it.
                let dir = out.parent().filter(|d| !d.as_os_str().is_empty());
                if let Some(d) = dir.filter(|d| !d.is_dir()) {
                    return Err(bad(format!(
                        "-o {}: the folder {} does not exist",
                        out.display(),
                        d.display()
                    )));
                }
            }
            let start = calibration
                .map(|p| Calibration::from_json_file(&p))
                .transpose()
                .map_err(bad)?;
            let mut all = Vec::new();
            for file in &runs {
                all.extend(calibrate::read_runs(file).map_err(bad)?);
            }
            let runs = all;
            // Nor over a model or cluster file the runs name.
            if let Some(out) = &output {
                let named = runs
                    .iter()
                    .flat_map(|r| [r.model.as_str(), r.cluster.as_str()])
                    .map(Path::new);
                if let Some(p) = overwritten(out, named) {
                    return Err(bad(format!(
                        "-o {} is a file the runs read: the calibration would overwrite {}",
                        out.display(),
                        p.display()
                    )));
                }
            }
            let t0 = std::time::Instant::now();
            let fit = calibrate::fit(&runs, start.as_ref(), &free).map_err(bad)?;
            let _ = writeln!(
                std::io::stderr(),
                "fitted {} parameter(s) to {} run(s) in {:.0} ms",
                free.len(),
                runs.len(),
                t0.elapsed().as_secs_f64() * 1e3
            );
            for w in &fit.warnings {
                let _ = writeln!(std::io::stderr(), "warning: {w}");
            }
            if json {
                let _ = writeln!(
                    o,
                    "{}",
                    serde_json::to_string_pretty(&fit).expect("a fit serializes")
                );
            } else {
                o.push_str(&fit_text(&fit, &runs));
            }
            if let Some(path) = &output {
                // The fit is printed even when its file cannot be written.
                if let Err(mut f) = write_file(path, &fit.calibration.to_json()) {
                    f.stdout = std::mem::take(&mut o);
                    return Err(f);
                }
            }
        }
        Command::Ir { model, train, json } => {
            let m = load_model(&model)?;
            let g = if train && !m.is_training {
                training(&m.graph)?
            } else {
                m.graph
            };
            if json {
                let _ = writeln!(o, "{}", ir::json::to_json(&g));
            } else {
                o.push_str(&ir::text::print(&g));
            }
        }
        Command::Check { file } => {
            let g = models::load_ir_file(&file).map_err(bad)?;
            ir::verify(&g).map_err(|e| bad(format!("{}: {e}", file.display())))?;
            let _ = writeln!(
                o,
                "{}: ok ({} ops, {} tensors)",
                file.display(),
                g.op_count(),
                g.tensor_count()
            );
        }
        Command::Stats {
            model,
            seq,
            micro_batch,
            tp,
            sp,
            json,
        } => {
            if seq == 0 || micro_batch == 0 || tp == 0 {
                return Err(bad("--seq, --micro-batch and --tp must be positive"));
            }
            if sp && tp == 1 {
                return Err(bad("--sp needs --tp > 1"));
            }
            let m = load_model(&model)?;
            // The checks and warnings `plan` and `eval` give for the same model.
            if let Some(max_positions) = apar::lower::compile::learned_positions(&m.graph) {
                if seq > max_positions {
                    return Err(bad(CompileError::SequenceTooLong {
                        model: m.graph.name().to_string(),
                        seq,
                        max_positions,
                    }));
                }
            }
            if let Some(cfg) = &m.config {
                check_tp_divides(cfg, tp)?;
                let rotary = matches!(cfg.position, models::Position::Rotary { .. });
                if let Some(trained) = m.notes.trained_positions.filter(|&p| rotary && seq > p) {
                    let w = apar::Warning::SequenceBeyondTrained {
                        seq,
                        trained_positions: trained,
                    };
                    let _ = writeln!(std::io::stderr(), "warning: {w}");
                }
            }
            for (kind, keys) in &m.notes.ignored {
                let w = apar::Warning::ConfigKeysIgnored {
                    kind: *kind,
                    keys: keys.clone(),
                };
                let _ = writeln!(std::io::stderr(), "warning: {w}");
            }
            let env = Env::new(micro_batch, seq);
            let stats = if tp > 1 {
                if m.is_training {
                    return Err(bad("--tp needs a forward model, not a training graph"));
                }
                let opts = apar::shard::ShardOptions::new(tp, sp);
                apar::shard::per_device_stats(&m.graph, &opts, &TrainOptions::default(), env)
                    .map_err(bad)?
            } else {
                let g = if m.is_training {
                    m.graph
                } else {
                    training(&m.graph)?
                };
                Stats::of_training_graph(&g, env).map_err(bad)?
            };
            if json {
                let _ = writeln!(o, "{}", pretty(&stats)?);
            } else {
                o.push_str(&stats_text(&model.model, &stats, env));
            }
        }
    }
    Ok(o)
}

fn pretty<T: serde::Serialize>(v: &T) -> Result<String, Failure> {
    serde_json::to_string_pretty(v).map_err(|e| bad(format!("cannot write JSON: {e}")))
}

fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

fn stats_text(name: &str, s: &Stats, env: Env) -> String {
    let mut o = String::new();
    let m = &s.model_state_bytes;
    let _ = writeln!(
        o,
        "model {name}: {} layers, {} parameters",
        s.layers,
        group(s.params)
    );
    let _ = writeln!(
        o,
        "one micro-batch of {} sequences of {} tokens:",
        env.batch, env.seq
    );
    let _ = writeln!(
        o,
        "  FLOPs per step (forward + backward + optimizer): {:.4e}",
        s.flops_per_step as f64
    );
    let _ = writeln!(
        o,
        "  activations saved per layer: {} ({} bytes)",
        gib(s.activation_bytes_per_layer),
        group(s.activation_bytes_per_layer)
    );
    let _ =
        writeln!(o,
        "  model states: {} = low-precision params {} + fp32 params {} + grads {} + optimizer {}",
        gib(m.total()),
        gib(m.low_prec_params),
        gib(m.params_fp32),
        gib(m.grads),
        gib(m.optimizer)
    );
    o
}
