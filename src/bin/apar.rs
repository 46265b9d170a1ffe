//! The `apar` command line. Parsing and printing only; the work is in the library.

use apar::cluster::{self, Cluster};
use apar::ir::{self, Env, Graph};
use apar::lower::compile::{Compiler, Evaluation, ModelSource, DEFAULT_MEMORY_RATIO};
use apar::models::{self, Attention};
use apar::passes::{Config, Recompute, Schedule};
use apar::report::{self, EvalJson, OomReport};
use apar::train::{self, Stats, TrainOptions};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
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
    #[arg(long)]
    memory_ratio: Option<f64>,
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
        #[arg(long, default_value_t = 1)]
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
        #[arg(long, default_value_t = DEFAULT_MEMORY_RATIO)]
        memory_ratio: f64,
        /// Pin the tensor-parallel degree.
        #[arg(long)]
        tp: Option<u32>,
        /// Pin the number of pipeline stages.
        #[arg(long)]
        pp: Option<u32>,
        /// Pin the data-parallel degree.
        #[arg(long)]
        dp: Option<u32>,
        /// Bound the number of pipeline stages.
        #[arg(long)]
        max_stages: Option<u32>,
        /// Bound the tensor-parallel degree.
        #[arg(long)]
        max_tp: Option<u32>,
        /// Pin the micro-batch size.
        #[arg(long)]
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
        /// Pin the ZeRO stage.
        #[arg(long)]
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
        out: OutputArgs,
    },
    /// Compile and simulate one parallel configuration.
    Eval {
        /// Re-cost a saved plan (from `--save`, possibly edited) instead of the flags below.
        #[arg(long, conflicts_with_all = ["model", "cluster", "dp"])]
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
        /// Sequences per micro-batch.
        #[arg(long, default_value_t = 1)]
        micro_batch: u32,
        /// Sequence parallelism (needs --tp > 1).
        #[arg(long)]
        sp: bool,
        /// Activation recomputation.
        #[arg(long, value_enum, default_value = "none")]
        recompute: RecomputeArg,
        /// Recompute only the first K layers of each pipeline stage.
        #[arg(long)]
        recompute_layers: Option<u32>,
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
        out: OutputArgs,
    },
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
    #[arg(long, default_value_t = DEFAULT_MEMORY_RATIO)]
    memory_ratio: f64,
}

#[derive(Clone, Copy, ValueEnum)]
enum EmitArg {
    Megatron,
    Deepspeed,
    Torchtitan,
}

#[derive(clap::Args)]
struct OutputArgs {
    /// Print the configuration for an engine instead of the report.
    #[arg(long, value_enum)]
    emit: Option<EmitArg>,
    /// Save the plan (JSON, re-costable with `apar eval --plan FILE`).
    #[arg(long)]
    save: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Write a Chrome/Perfetto trace of the simulated step.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Write an SVG plot of the memory timeline.
    #[arg(long)]
    svg: Option<PathBuf>,
}

/// A failure with its exit code: 1 infeasible, 2 bad input.
struct Failure {
    code: u8,
    message: String,
}

fn bad(message: impl ToString) -> Failure {
    Failure {
        code: 2,
        message: message.to_string(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if !f.message.is_empty() {
                eprintln!("error: {}", f.message);
            }
            ExitCode::from(f.code)
        }
    }
}

fn load_model(args: &ModelArgs) -> Result<models::LoadedModel, Failure> {
    let overrides = models::Overrides {
        attention: args.attention.map(|a| match a {
            AttentionArg::Eager => Attention::Eager,
            AttentionArg::Flash => Attention::Flash,
        }),
        layers: args.layers,
    };
    models::load(&args.model, &overrides).map_err(bad)
}

fn model_source(model: &models::LoadedModel) -> Result<ModelSource, Failure> {
    if model.is_training {
        return Err(bad(
            "planning needs a forward graph; this IR file already has backward ops",
        ));
    }
    Ok(match &model.config {
        Some(cfg) => ModelSource::Config(cfg.clone()),
        None => ModelSource::Graph(model.graph.clone()),
    })
}

fn compiler(model: &models::LoadedModel, job: &JobArgs) -> Result<Compiler, Failure> {
    let source = model_source(model)?;
    let cluster = Cluster::resolve(&job.cluster).map_err(bad)?;
    Compiler::new(source, cluster, job.seq, job.global_batch, job.memory_ratio).map_err(bad)
}

fn write_outputs(e: &Evaluation, out: &OutputArgs) -> Result<(), Failure> {
    let write = |path: &PathBuf, text: String| {
        std::fs::write(path, text).map_err(|err| bad(format!("{}: {err}", path.display())))
    };
    if let Some(p) = &out.trace {
        write(p, pretty(&report::trace::chrome_trace(e))?)?;
    }
    if let Some(p) = &out.svg {
        write(p, report::trace::memory_svg(e))?;
    }
    Ok(())
}

fn saved_plan(
    c: &Compiler,
    e: &Evaluation,
    model: &str,
    search: apar::search::SearchStats,
) -> apar::Plan {
    apar::Plan {
        model: model.to_string(),
        cluster: c.cluster.clone(),
        seq: c.seq,
        global_batch: c.global_batch,
        memory_ratio: c.memory_ratio,
        config: e.config,
        evaluation: EvalJson::new(e),
        search,
    }
}

/// Writes the trace/SVG and the saved plan of a fitting evaluation, and prints the
/// engine configuration if `--emit` asked for one (returning true: nothing else to print).
fn save_and_emit(
    c: &Compiler,
    e: &Evaluation,
    out: &OutputArgs,
    model: &str,
    config: Option<&models::ModelConfig>,
    search: apar::search::SearchStats,
) -> Result<bool, Failure> {
    write_outputs(e, out)?;
    if let Some(path) = &out.save {
        let plan = saved_plan(c, e, model, search);
        std::fs::write(path, pretty(&plan)?)
            .map_err(|err| bad(format!("{}: {err}", path.display())))?;
    }
    let Some(engine) = out.emit else {
        return Ok(false);
    };
    let engine = match engine {
        EmitArg::Megatron => report::engines::Engine::Megatron,
        EmitArg::Deepspeed => report::engines::Engine::DeepSpeed,
        EmitArg::Torchtitan => report::engines::Engine::Torchtitan,
    };
    print!(
        "{}",
        report::engines::emit(engine, &e.config, config, c.seq, c.global_batch)
    );
    Ok(true)
}

/// Prints an evaluation; an out-of-memory one becomes exit 1 with its report.
fn print_evaluation(
    c: &Compiler,
    e: &Evaluation,
    out: &OutputArgs,
    model: &str,
    config: Option<&models::ModelConfig>,
) -> Result<(), Failure> {
    if e.fits && save_and_emit(c, e, out, model, config, Default::default())? {
        return Ok(());
    }
    write_outputs(e, out)?;
    if !e.fits {
        let oom = OomReport::new(e, apar::search::suggestions(c, &e.config));
        let message = if out.json { pretty(&oom)? } else { oom.text() };
        println!("{}", message.trim_end());
        // The report is the message; exit 1 says infeasible.
        return Err(Failure {
            code: 1,
            message: String::new(),
        });
    }
    if out.json {
        println!("{}", pretty(&EvalJson::new(e))?);
    } else {
        print!("{}", report::eval_text(e));
    }
    Ok(())
}

/// Draws a progress bar on standard error (only on a terminal), every 1/64 of the work.
fn progress_bar(done: usize, total: usize) {
    let step = (total / 64).max(1);
    if done % step == 0 || done == total {
        let filled = 40 * done / total.max(1);
        eprint!(
            "\r[{}{}] {done}/{total} compile steps",
            "#".repeat(filled),
            " ".repeat(40 - filled)
        );
    }
}

fn training(fwd: &Graph) -> Result<Graph, Failure> {
    train::training_graph(fwd, &TrainOptions::default()).map_err(bad)
}

fn run(cli: Cli) -> Result<(), Failure> {
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
                println!("{}", pretty(&list)?);
            } else {
                println!(
                    "{:<18} {:>17} {:>6} {:>6} {:>5} {:>4} {:>7}  about",
                    "model", "params", "layers", "hidden", "heads", "kv", "attn"
                );
                for (e, params, cfg) in rows {
                    let attn = match cfg.attention {
                        Attention::Eager => "eager",
                        Attention::Flash => "flash",
                    };
                    println!(
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
            tp,
            pp,
            dp,
            max_stages,
            max_tp,
            micro_batch,
            sp,
            recompute,
            recompute_layers,
            zero,
            low_prec_shard,
            schedule,
            exhaustive,
            detailed_log,
            out,
        } => {
            let model_spec = model.clone();
            let m = load_model(&ModelArgs {
                model,
                attention,
                layers,
            })?;
            let job = JobArgs {
                cluster,
                global_batch,
                seq,
                memory_ratio,
            };
            let c = compiler(&m, &job)?;
            let opts = apar::search::SearchOptions {
                constraints: apar::passes::candidates::Constraints {
                    tp,
                    pp,
                    dp,
                    max_stages,
                    max_tp,
                    micro_batch,
                    sp,
                    recompute: recompute.map(Into::into),
                    recompute_layers,
                    zero,
                    low_prec_shard,
                    schedule,
                    max_chunks: None,
                },
                exhaustive,
                runners_up: 3,
            };
            let r = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                let r = apar::search::plan_with_progress(&c, &opts, &progress_bar);
                eprint!("\r{:60}\r", "");
                r
            } else {
                apar::search::plan_with(&c, &opts)
            };
            if let Some(path) = &detailed_log {
                let mut text = String::new();
                for o in &r.outcomes {
                    text.push_str(&format!(
                        "{}\t{}\n",
                        o.config,
                        serde_json::to_string(&o.outcome).unwrap_or_default()
                    ));
                }
                std::fs::write(path, text).map_err(|e| bad(format!("{}: {e}", path.display())))?;
            }
            if r.stats.candidates == 0 {
                return Err(bad("no configuration satisfies the pins and bounds"));
            }
            let model_name = model_spec.clone();
            match &r.best {
                Some(best) => {
                    let emitted =
                        save_and_emit(&c, best, &out, &model_name, m.config.as_ref(), r.stats)?;
                    if emitted {
                        // The engine configuration was the output.
                    } else if out.json {
                        let mut v = serde_json::to_value(EvalJson::new(best))
                            .map_err(|e| bad(e.to_string()))?;
                        v["search"] =
                            serde_json::to_value(r.stats).map_err(|e| bad(e.to_string()))?;
                        let runners: Vec<EvalJson> =
                            r.runners_up.iter().map(EvalJson::new).collect();
                        v["runners_up"] =
                            serde_json::to_value(runners).map_err(|e| bad(e.to_string()))?;
                        println!("{}", pretty(&v)?);
                    } else {
                        print!("{}", report::plan_log(&r));
                    }
                }
                None => {
                    if !out.json {
                        print!("{}", report::plan_log(&r));
                    }
                    match &r.closest {
                        Some(closest) => {
                            let suggestions =
                                apar::search::plan_suggestions(&c, &opts, Some(&closest.config));
                            let oom = OomReport::new(closest, suggestions);
                            write_outputs(closest, &out)?;
                            let text = if out.json { pretty(&oom)? } else { oom.text() };
                            println!("{}", text.trim_end());
                            return Err(Failure {
                                code: 1,
                                message: String::new(),
                            });
                        }
                        None => {
                            // Name the first candidate's reason (often shared by all,
                            // such as a pinned tp that does not divide the heads).
                            let first = r.outcomes.iter().find_map(|o| match &o.outcome {
                                apar::search::Outcome::Rejected { reason } => {
                                    Some(format!(" (first: {}: {reason})", o.config))
                                }
                                _ => None,
                            });
                            return Err(bad(format!(
                                "no candidate could be compiled{}; see --detailed-log",
                                first.unwrap_or_default()
                            )));
                        }
                    }
                }
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
            let blocks: std::collections::BTreeSet<ir::Block> =
                m.graph.ops().map(|o| m.graph.node(o).block).collect();
            let Some(&b) = blocks.iter().nth(block as usize) else {
                return Err(bad(format!(
                    "--block {block}: the model has blocks 0..={}",
                    blocks.len().saturating_sub(1)
                )));
            };
            let sharded =
                apar::shard::shard_model(&m.graph, &apar::shard::ShardOptions::new(tp, sp))
                    .map_err(bad)?;
            let g = if train {
                sharded.training_block(b, &TrainOptions::default())
            } else {
                sharded.block_graph(b)
            }
            .map_err(bad)?;
            if json {
                println!("{}", ir::json::to_json(&g));
            } else {
                if let Some(r) = sharded.report(b) {
                    println!(
                        "# {b} at tp {tp}{}: {} iterations, {} e-nodes, {} e-classes, stop: {:?}",
                        if sp { " with sp" } else { "" },
                        r.iterations,
                        r.enodes,
                        r.eclasses,
                        r.stop
                    );
                }
                print!("{}", ir::text::print(&g));
            }
        }
        Command::Clusters => {
            println!("{:<16}  about", "cluster");
            for (name, about) in cluster::presets() {
                println!("{name:<16}  {about}");
            }
            println!("\nor a JSON file with the fields of `apar::cluster::Cluster`");
        }
        Command::Eval {
            plan,
            model,
            job,
            dp,
            tp,
            pp,
            micro_batch,
            sp,
            recompute,
            recompute_layers,
            zero,
            low_prec_shard,
            schedule,
            out,
        } => {
            if let Some(path) = plan {
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| bad(format!("{}: {e}", path.display())))?;
                let saved: apar::Plan = serde_json::from_str(&text)
                    .map_err(|e| bad(format!("{}: not a saved plan: {e}", path.display())))?;
                let m = load_model(&ModelArgs {
                    model: saved.model.clone(),
                    attention: None,
                    layers: None,
                })?;
                let c = Compiler::new(
                    model_source(&m)?,
                    saved.cluster.clone(),
                    saved.seq,
                    saved.global_batch,
                    saved.memory_ratio,
                )
                .map_err(bad)?;
                let e = c.evaluate(&saved.config).map_err(bad)?;
                return print_evaluation(&c, &e, &out, &saved.model, m.config.as_ref());
            }
            let need = |what: &str| bad(format!("eval needs --{what} (or --plan FILE)"));
            let model = ModelArgs {
                model: model.model.ok_or_else(|| need("model"))?,
                attention: model.attention,
                layers: model.layers,
            };
            let job = JobArgs {
                cluster: job.cluster.ok_or_else(|| need("cluster"))?,
                global_batch: job.global_batch.ok_or_else(|| need("global-batch"))?,
                seq: job.seq.ok_or_else(|| need("seq"))?,
                memory_ratio: job.memory_ratio.unwrap_or(DEFAULT_MEMORY_RATIO),
            };
            let dp = dp.ok_or_else(|| need("dp"))?;
            let m = load_model(&model)?;
            let c = compiler(&m, &job)?;
            let per_step = u64::from(dp) * u64::from(micro_batch);
            if per_step == 0 || job.global_batch % per_step != 0 {
                return Err(bad(format!(
                    "global batch {} is not divisible by dp {dp} × micro-batch {micro_batch}",
                    job.global_batch
                )));
            }
            let num_micro_batches = u32::try_from(job.global_batch / per_step)
                .map_err(|_| bad("too many micro-batches"))?;
            let config = Config {
                dp,
                tp,
                pp,
                micro_batch,
                num_micro_batches,
                sp,
                recompute: recompute.into(),
                recompute_layers,
                zero,
                low_prec_shard,
                schedule,
            };
            let e = c.evaluate(&config).map_err(bad)?;
            print_evaluation(&c, &e, &out, &model.model, m.config.as_ref())?;
        }
        Command::Ir { model, train, json } => {
            let m = load_model(&model)?;
            let g = if train && !m.is_training {
                training(&m.graph)?
            } else {
                m.graph
            };
            if json {
                println!("{}", ir::json::to_json(&g));
            } else {
                print!("{}", ir::text::print(&g));
            }
        }
        Command::Check { file } => {
            let g = models::load_ir_file(&file).map_err(bad)?;
            ir::verify(&g).map_err(|e| bad(format!("{}: {e}", file.display())))?;
            println!(
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
                println!("{}", pretty(&stats)?);
            } else {
                print_stats(&model.model, &stats, env);
            }
        }
    }
    Ok(())
}

fn pretty<T: serde::Serialize>(v: &T) -> Result<String, Failure> {
    serde_json::to_string_pretty(v).map_err(|e| Failure {
        code: 2,
        message: format!("cannot write JSON: {e}"),
    })
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

fn print_stats(name: &str, s: &Stats, env: Env) {
    let m = &s.model_state_bytes;
    println!(
        "model {name}: {} layers, {} parameters",
        s.layers,
        group(s.params)
    );
    println!(
        "one micro-batch of {} sequences of {} tokens:",
        env.batch, env.seq
    );
    println!(
        "  FLOPs per step (forward + backward + optimizer): {:.4e}",
        s.flops_per_step as f64
    );
    println!(
        "  activations saved per layer: {} ({} bytes)",
        gib(s.activation_bytes_per_layer),
        group(s.activation_bytes_per_layer)
    );
    println!(
        "  model states: {} = low-precision params {} + fp32 params {} + grads {} + optimizer {}",
        gib(m.total()),
        gib(m.low_prec_params),
        gib(m.params_fp32),
        gib(m.grads),
        gib(m.optimizer)
    );
}
