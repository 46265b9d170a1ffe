//! Reports: the JSON plan/evaluation, human-readable text, the out-of-memory report,
//! a Chrome/Perfetto trace and an SVG memory timeline. Nothing here computes plans.

pub mod trace;

use crate::engine::Engine;
use crate::lower::compile::Evaluation;
use crate::lower::{StageMemory, StepTrace, TimeBreakdown};
use crate::passes::Config;
use crate::search::SearchStats;
pub use crate::search::Suggestion;
use serde::Serialize;
use std::fmt::Write;

/// `{"stage", "blocks": [first, last], "time_s"}` of the JSON contract.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct StageJson {
    /// Virtual stage index (model order).
    pub stage: usize,
    /// Pipeline device running it.
    pub device_stage: u32,
    /// First and last block (0 = embedding, last = head).
    pub blocks: [usize; 2],
    /// Forward plus backward time of one micro-batch.
    pub time_s: f64,
}

/// `memory` of the JSON contract.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct MemoryJson {
    /// Budget per device.
    pub budget_bytes: u64,
    /// Largest peak.
    pub peak_bytes: u64,
    /// Per pipeline device.
    pub per_stage: Vec<StageMemory>,
}

/// The evaluation as the JSON contract spells it.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct EvalJson {
    /// The configuration.
    pub config: Config,
    /// Seconds per step.
    pub step_time_s: f64,
    /// Tokens per second.
    pub tokens_per_s: f64,
    /// Model TFLOP/s per device (the model FLOPs of MFU per second).
    pub tflops_per_device: f64,
    /// Model FLOPs utilization (PaLM's `6·N + 12·L·H·Q·T` per token; see
    /// [`crate::lower::compile::Compiler::model_flops_per_step`]).
    pub mfu: f64,
    /// Hardware FLOPs utilization: executed FLOPs, recomputation and tensor-parallel
    /// replication included, causal attention at the half its kernels run (0 in
    /// summaries saved before it existed).
    #[serde(default)]
    pub hfu: f64,
    /// Memory.
    pub memory: MemoryJson,
    /// Stages.
    pub stages: Vec<StageJson>,
    /// Step-time breakdown of the slowest device.
    pub breakdown: TimeBreakdown,
}

impl EvalJson {
    /// Builds the JSON view of an evaluation.
    pub fn new(e: &Evaluation) -> EvalJson {
        let pp = e.config.pp.max(1);
        EvalJson {
            config: e.config,
            step_time_s: e.step_time_s,
            tokens_per_s: e.tokens_per_s,
            tflops_per_device: e.tflops_per_device,
            mfu: e.mfu,
            hfu: e.hfu,
            memory: MemoryJson {
                budget_bytes: e.budget_bytes,
                peak_bytes: e.peak_bytes,
                per_stage: e.sim.memory.clone(),
            },
            stages: e
                .stages
                .iter()
                .enumerate()
                .map(|(i, s)| StageJson {
                    stage: i,
                    device_stage: i as u32 % pp,
                    blocks: [s.first, s.last],
                    time_s: e.sim.stage_time_s[i],
                })
                .collect(),
            breakdown: e.sim.breakdown,
        }
    }
}

/// Bytes as GiB with two decimals.
pub fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Which part of a stage's memory is largest.
pub fn dominant(m: &StageMemory) -> &'static str {
    let parts = [
        (m.params, "parameters"),
        (m.grads, "gradients"),
        (m.optimizer, "optimizer states"),
        (m.activations, "activations"),
        (m.temporary, "temporaries"),
        (m.buffers, "engine buffers"),
        (m.runtime, "runtime overheads"),
    ];
    parts.iter().max_by_key(|p| p.0).map_or("nothing", |p| p.1)
}

/// Human-readable evaluation.
pub fn eval_text(e: &Evaluation) -> String {
    let j = EvalJson::new(e);
    summary_text(&j, &j.stages)
}

/// Human-readable evaluation of a summary: configuration, step time and its
/// breakdown, memory per pipeline stage with the blocks it runs.
pub fn summary_text(e: &EvalJson, stages: &[StageJson]) -> String {
    let mut s = String::new();
    let c = &e.config;
    let _ = writeln!(s, "configuration: {c}");
    let _ = writeln!(
        s,
        "step time {:.3} s, {:.0} tokens/s, {:.1} TFLOP/s per device, MFU {:.1}%, HFU {:.1}%",
        e.step_time_s,
        e.tokens_per_s,
        e.tflops_per_device,
        100.0 * e.mfu,
        100.0 * e.hfu
    );
    let b = &e.breakdown;
    let _ = writeln!(
        s,
        "  slowest device: compute {:.3} s, TP comm {:.3} s,{} DP comm (exposed) {:.3} s, PP comm {:.3} s, bubble {:.3} s, recompute {:.3} s, optimizer {:.3} s",
        b.compute_s, b.tp_comm_s, ep_part(b, " EP comm"), b.dp_comm_s, b.pp_comm_s, b.bubble_s, b.recompute_s, b.optimizer_s
    );
    let m = &e.memory;
    let _ = writeln!(
        s,
        "memory budget {} per device, peak {}{}",
        gib(m.budget_bytes),
        gib(m.peak_bytes),
        if m.peak_bytes <= m.budget_bytes {
            ""
        } else {
            "  (OUT OF MEMORY)"
        }
    );
    for m in &m.per_stage {
        let spans: Vec<String> = stages
            .iter()
            .filter(|sp| sp.device_stage == m.stage)
            .map(|sp| format!("blocks {}..={}", sp.blocks[0], sp.blocks[1]))
            .collect();
        let _ = writeln!(
            s,
            "  stage {}: {}  peak {} = params {} + grads {} + optimizer {} + activations {} + temporaries {} + engine buffers {} + runtime {}",
            m.stage,
            spans.join(", "),
            gib(m.peak_bytes),
            gib(m.params),
            gib(m.grads),
            gib(m.optimizer),
            gib(m.activations),
            gib(m.temporary),
            gib(m.buffers),
            gib(m.runtime)
        );
    }
    s
}

/// The out-of-memory report (exit code 1).
#[derive(Clone, Debug, Serialize)]
pub struct OomReport {
    /// Always `"out_of_memory"`.
    pub error: &'static str,
    /// Peak bytes of the worst device.
    pub requested_bytes: u64,
    /// Budget per device.
    pub available_bytes: u64,
    /// The worst pipeline stage.
    pub stage: u32,
    /// What dominates its memory.
    pub dominant: &'static str,
    /// Its breakdown.
    pub breakdown: StageMemory,
    /// The configuration.
    pub config: Config,
    /// The engine whose memory and rules were applied.
    pub engine: Engine,
    /// Changes that fit, each checked by compiling it.
    pub suggestions: Vec<Suggestion>,
    /// The candidate's step time, seconds (not in the JSON report).
    #[serde(skip)]
    pub step_time_s: f64,
    /// The candidate's memory by stage (not in the JSON report).
    #[serde(skip)]
    pub memory: Option<MemoryJson>,
    /// The candidate's simulated step, for a trace or plot (not in the JSON report).
    #[serde(skip)]
    pub trace: StepTrace,
}

impl OomReport {
    /// Builds the report of an evaluation that does not fit.
    pub fn new(e: &Evaluation, engine: Engine, suggestions: Vec<Suggestion>) -> OomReport {
        let worst = e
            .sim
            .memory
            .iter()
            .max_by_key(|m| m.peak_bytes)
            .cloned()
            .unwrap_or(StageMemory {
                stage: 0,
                peak_bytes: 0,
                params: 0,
                grads: 0,
                optimizer: 0,
                activations: 0,
                temporary: 0,
                buffers: 0,
                runtime: 0,
            });
        OomReport {
            error: "out_of_memory",
            requested_bytes: worst.peak_bytes,
            available_bytes: e.budget_bytes,
            stage: worst.stage,
            dominant: dominant(&worst),
            breakdown: worst,
            config: e.config,
            engine,
            suggestions,
            step_time_s: e.step_time_s,
            memory: Some(EvalJson::new(e).memory),
            trace: e.sim.trace(),
        }
    }

    /// Human-readable report.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let m = &self.breakdown;
        let _ = writeln!(
            s,
            "OUT_OF_MEMORY: Memory requested: {} bytes, Memory available: {} bytes (stage {})",
            self.requested_bytes, self.available_bytes, self.stage
        );
        let _ = writeln!(
            s,
            "  configuration: {} (engine {})",
            self.config, self.engine
        );
        let _ = writeln!(
            s,
            "  {} dominate: params {}, grads {}, optimizer {}, activations {}, temporaries {}, engine buffers {}, runtime {}",
            self.dominant,
            gib(m.params),
            gib(m.grads),
            gib(m.optimizer),
            gib(m.activations),
            gib(m.temporary),
            gib(m.buffers),
            gib(m.runtime)
        );
        if self.suggestions.is_empty() {
            let _ = writeln!(s, "  no single change tried fits");
        } else {
            let _ = writeln!(s, "  changes that fit:");
            for sg in &self.suggestions {
                let _ = writeln!(
                    s,
                    "    - {}: peak {}, step {:.3} s",
                    sg.change,
                    gib(sg.peak_bytes),
                    sg.step_time_s
                );
            }
        }
        s
    }
}

/// The configuration line the reference platform prints after selection.
pub fn selected_line(c: &Config) -> String {
    let tp = if c.tp == 1 {
        "No TP".to_string()
    } else {
        format!(
            "TP : {}{}",
            c.tp,
            if c.sp { " (sequence parallel)" } else { "" }
        )
    };
    let recompute = match c.recompute {
        crate::passes::Recompute::None => 0,
        crate::passes::Recompute::Selective => 1,
        crate::passes::Recompute::Full => 2,
    };
    format!(
        "num_stages : {}, num_micro_batches : {}, batch_per_device : {}, {tp}, recomputation : {recompute}, distribute_param : {}, distribute_low_prec_param : {}, data_parallel : {}{}, zero_stage : {}, schedule : {}",
        c.pp,
        c.num_micro_batches,
        c.micro_batch,
        c.zero >= 1,
        c.shards_low_prec(),
        c.dp,
        // Printed only when on, so that logs without them read as before.
        if c.cp > 1 {
            format!(", context_parallel : {}", c.cp)
        } else {
            String::new()
        } + &if c.ep > 1 || c.etp > 1 {
            format!(", expert_parallel : {}, expert_tensor_parallel : {}", c.ep, c.etp)
        } else {
            String::new()
        },
        c.zero,
        c.schedule
    )
}

/// The search log: the reference platform's story with apar's numbers (when a search
/// ran), then the plan and its runners-up with why each lost.
pub fn plan_log(
    best: &EvalJson,
    engine: Engine,
    search: Option<&SearchStats>,
    runners_up: &[EvalJson],
) -> String {
    let mut s = String::new();
    if let Some(st) = search {
        s.push_str(&search_log(st));
        let _ = writeln!(s, "[info] Configuration for parallelism is selected.");
        let _ = writeln!(s, "[info] {}", selected_line(&best.config));
        s.push('\n');
    }
    let _ = writeln!(s, "engine: {engine} ({})", engine.version());
    s.push_str(&summary_text(best, &best.stages));
    if !runners_up.is_empty() {
        let _ = writeln!(s, "runners-up (why they lost):");
        for e in runners_up {
            let _ = writeln!(
                s,
                "  {:>8.3} s (+{:.1}%)  {}  — {}",
                e.step_time_s,
                100.0 * (e.step_time_s / best.step_time_s - 1.0),
                e.config,
                why_slower(&best.breakdown, &e.breakdown)
            );
            let b = &e.breakdown;
            let _ = writeln!(
                s,
                "             compute {:.3} s, TP {:.3} s,{} DP {:.3} s, PP {:.3} s, bubble {:.3} s, recompute {:.3} s, optimizer {:.3} s; peak {}",
                b.compute_s,
                b.tp_comm_s,
                ep_part(b, " EP"),
                b.dp_comm_s,
                b.pp_comm_s,
                b.bubble_s,
                b.recompute_s,
                b.optimizer_s,
                gib(e.memory.peak_bytes)
            );
        }
    }
    s
}

/// The reference platform's search lines: candidates, compile time, feasible count,
/// selection time.
pub fn search_log(st: &SearchStats) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "[info] The number of candidates is {}.", st.candidates);
    let _ = writeln!(s, "[info] Parallel Graph Compile start...");
    let _ = writeln!(
        s,
        "[info] Elapsed Time to compile all candidates = {:.0} [ms]",
        st.compile_ms
    );
    let _ = writeln!(s, "[info] Parallel Graph Compile finished.");
    let _ = writeln!(
        s,
        "[info] The number of possible candidates is {}.",
        st.feasible
    );
    if st.pruned > 0 {
        let _ = writeln!(
            s,
            "[info] {} more were not simulated: their compute alone exceeds the step time of the plans kept (--exhaustive simulates them).",
            st.pruned
        );
    }
    let _ = writeln!(s, "[info] SelectBestGraphFromCandidates start...");
    let _ = writeln!(
        s,
        "[info] Elapsed Time to compute cost for survived candidates = {:.0} [ms]",
        st.cost_ms
    );
    let _ = writeln!(s, "[info] SelectBestGraphFromCandidates finished.");
    s
}

/// `"{label} X.XXX s,"` for a breakdown with expert-parallel all-to-all time, else
/// nothing (dense plans print as before).
fn ep_part(b: &TimeBreakdown, label: &str) -> String {
    if b.ep_comm_s > 0.0 {
        format!("{label} {:.3} s,", b.ep_comm_s)
    } else {
        String::new()
    }
}

/// The largest difference in the step-time breakdown between a runner-up and the winner.
pub fn why_slower(a: &TimeBreakdown, b: &TimeBreakdown) -> String {
    let parts = [
        ("compute", b.compute_s - a.compute_s),
        ("TP communication", b.tp_comm_s - a.tp_comm_s),
        ("EP communication", b.ep_comm_s - a.ep_comm_s),
        ("exposed DP communication", b.dp_comm_s - a.dp_comm_s),
        ("PP communication", b.pp_comm_s - a.pp_comm_s),
        ("pipeline bubble", b.bubble_s - a.bubble_s),
        ("recomputation", b.recompute_s - a.recompute_s),
        ("optimizer", b.optimizer_s - a.optimizer_s),
    ];
    let (name, d) = parts
        .iter()
        .copied()
        .fold(("compute", f64::NEG_INFINITY), |acc, p| {
            if p.1 > acc.1 {
                p
            } else {
                acc
            }
        });
    format!("{name} +{d:.3} s")
}

/// The `--detailed-log` file: every candidate with its outcome (peak memory, step
/// time or the reason it was rejected or skipped), one per line, in enumeration order.
pub fn detailed_log(outcomes: &[crate::search::CandidateOutcome]) -> String {
    let mut text = String::new();
    for o in outcomes {
        let outcome = serde_json::to_string(&o.outcome).unwrap_or_default();
        let _ = writeln!(text, "{}\t{outcome}", o.config);
    }
    text
}
