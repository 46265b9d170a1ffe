//! Partitioning passes: the parallel configuration ([`Config`]), recomputation
//! insertion, ZeRO-style distribution, and the pipeline cut.
//!
//! Passes read a graph and return a new one (or a side table); they never mutate
//! their input. They implement [`manager::Pass`], and the compiler runs them through a
//! [`manager::PassManager`], which verifies every graph a pass returns (in debug and
//! test builds), times the passes and names the pass in failures. The compiler's
//! pipeline reads as the list: `shard` → `precision` → `autodiff` → `recompute` →
//! `distribute`, then the [`pipeline`] cut over the block profiles.

pub mod candidates;
pub mod distribute;
pub mod expert;
pub mod manager;
pub mod pipeline;
pub mod recompute;

pub use recompute::{RecomputeModule, RecomputeModules};

use serde::{Deserialize, Serialize};
use std::fmt;

/// Activation recomputation policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Recompute {
    /// Keep every activation the backward pass reads.
    None,
    /// Recompute the attention core (the `s×s` tensors), as Korthikanti et al. 2022.
    Selective,
    /// Keep only each layer's input; rerun the layer's forward before its backward.
    Full,
}

impl Recompute {
    /// Text spelling (`none`, `selective`, `full`).
    pub fn name(self) -> &'static str {
        match self {
            Recompute::None => "none",
            Recompute::Selective => "selective",
            Recompute::Full => "full",
        }
    }
}

impl fmt::Display for Recompute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Pipeline schedule; serialized as its text spelling (`gpipe`, `1f1b`, `interleaved:3`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Schedule {
    /// All forwards, then all backwards (Huang et al. 2019).
    Gpipe,
    /// One forward, one backward in steady state (PipeDream-flush; Narayanan et al. 2021).
    OneFOneB,
    /// 1F1B with `v` model chunks per device (Narayanan et al. 2021, Sec. 2.2).
    Interleaved(u32),
}

impl Schedule {
    /// Model chunks per device.
    pub fn chunks(self) -> u32 {
        match self {
            Schedule::Interleaved(v) => v.max(1),
            _ => 1,
        }
    }

    /// Parses `gpipe`, `1f1b`, `interleaved:V`.
    pub fn parse(s: &str) -> Option<Schedule> {
        match s {
            "gpipe" => Some(Schedule::Gpipe),
            "1f1b" => Some(Schedule::OneFOneB),
            _ => {
                let v: u32 = s.strip_prefix("interleaved:")?.parse().ok()?;
                (v >= 2).then_some(Schedule::Interleaved(v))
            }
        }
    }
}

impl From<Schedule> for String {
    fn from(s: Schedule) -> String {
        s.to_string()
    }
}

impl TryFrom<String> for Schedule {
    type Error = String;
    fn try_from(s: String) -> Result<Schedule, String> {
        Schedule::parse(&s).ok_or_else(|| {
            format!("unknown schedule `{s}` (gpipe, 1f1b, interleaved:V with V ≥ 2)")
        })
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Schedule::Gpipe => f.write_str("gpipe"),
            Schedule::OneFOneB => f.write_str("1f1b"),
            Schedule::Interleaved(v) => write!(f, "interleaved:{v}"),
        }
    }
}

/// What the recomputation pass applies to a configuration ([`Config::recomputation`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Recomputation {
    /// The policy.
    pub policy: Recompute,
    /// Megatron-LM's modules with selective recomputation (`None`: the engine's own
    /// selective policy, or another policy).
    pub modules: Option<RecomputeModules>,
}

impl Recomputation {
    /// No recomputation.
    pub const NONE: Recomputation = Recomputation {
        policy: Recompute::None,
        modules: None,
    };
}

/// One parallelization candidate: everything the lowering needs besides the model,
/// the cluster and the global batch.
///
/// Serialized with its fields in declaration order; `cp`, `ep` and `etp` are left out
/// of human-readable formats (JSON) when 1 and `recompute_modules` when `None`, so
/// configurations from before they existed print and read the same, and always written
/// in binary ones (bincode has no optional fields).
///
/// Experts are laid out over the same ranks as the rest of the model, as Megatron-Core
/// folds them (`RankGenerator(tp=etp, ep=ep, dp=edp, pp=pp, order="tp-ep-dp-pp")`,
/// `megatron/core/parallel_state.py`): attention and dense layers see
/// `tp × cp × dp × pp`, the experts `etp × ep × edp × pp` with `ep · etp · edp = tp ·
/// cp · dp` ([`Config::expert_dp`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Data-parallel degree.
    pub dp: u32,
    /// Tensor-parallel degree (inside one node).
    pub tp: u32,
    /// Pipeline stages (devices in a pipeline).
    pub pp: u32,
    /// Context-parallel degree: the sequence is split over `cp` ranks (ring attention,
    /// Megatron-LM's `--context-parallel-size`); 1 for none. Left out of JSON when 1,
    /// so configurations written before it existed read and print the same.
    #[serde(default = "one")]
    pub cp: u32,
    /// Expert-parallel degree: the routed experts of each MoE layer are split over `ep`
    /// ranks (`E / ep` each), tokens reach them by all-to-all (Megatron-LM's
    /// `--expert-model-parallel-size`); 1 for none (and for dense models). Left out of
    /// JSON when 1.
    #[serde(default = "one")]
    pub ep: u32,
    /// Expert-tensor-parallel degree: each expert's weights are split over `etp` ranks
    /// (1 or `tp`; Megatron-LM's `--expert-tensor-parallel-size`, whose default is
    /// `tp`); 1 for none. Left out of JSON when 1 without expert parallelism.
    #[serde(default = "one")]
    pub etp: u32,
    /// Sequences per micro-batch `b`.
    pub micro_batch: u32,
    /// Micro-batches per step per pipeline `m` (global batch = dp·m·b).
    pub num_micro_batches: u32,
    /// Sequence parallelism on the tensor-parallel group.
    pub sp: bool,
    /// Recomputation policy.
    pub recompute: Recompute,
    /// Apply the policy to only the first `k` layers of each pipeline stage (Megatron's
    /// `--recompute-method block --recompute-num-layers k`); `None`: every layer.
    #[serde(default)]
    pub recompute_layers: Option<u32>,
    /// With selective recomputation, Megatron-LM's `--recompute-modules` (which
    /// submodules of each layer are recomputed); `None`: the engine's own selective
    /// policy (Megatron-LM's default, `core_attn`). Left out of JSON when `None`, so
    /// configurations written before it existed read and print the same.
    #[serde(default)]
    pub recompute_modules: Option<RecomputeModules>,
    /// ZeRO stage: 0 none, 1 optimizer states, 2 + gradients, 3 + parameters.
    pub zero: u8,
    /// Shard the low-precision parameter copy over data parallel ranks (implied by ZeRO-3).
    pub low_prec_shard: bool,
    /// Pipeline schedule.
    pub schedule: Schedule,
}

/// Serde's default for a missing `cp`: no context parallelism.
fn one() -> u32 {
    1
}

impl Serialize for Config {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let skip = s.is_human_readable() && self.recompute_modules.is_none();
        let skip_cp = s.is_human_readable() && self.cp == 1;
        let skip_ep = s.is_human_readable() && self.ep == 1;
        // With expert parallelism `etp` is always written: its command-line default
        // for a mixture of experts is `tp` (Megatron-LM's), so a missing 1 would read
        // as a different configuration to a person.
        let skip_etp = s.is_human_readable() && self.etp == 1 && self.ep == 1;
        let fields = 15
            - usize::from(skip)
            - usize::from(skip_cp)
            - usize::from(skip_ep)
            - usize::from(skip_etp);
        let mut st = s.serialize_struct("Config", fields)?;
        st.serialize_field("dp", &self.dp)?;
        st.serialize_field("tp", &self.tp)?;
        st.serialize_field("pp", &self.pp)?;
        if skip_cp {
            st.skip_field("cp")?;
        } else {
            st.serialize_field("cp", &self.cp)?;
        }
        if skip_ep {
            st.skip_field("ep")?;
        } else {
            st.serialize_field("ep", &self.ep)?;
        }
        if skip_etp {
            st.skip_field("etp")?;
        } else {
            st.serialize_field("etp", &self.etp)?;
        }
        st.serialize_field("micro_batch", &self.micro_batch)?;
        st.serialize_field("num_micro_batches", &self.num_micro_batches)?;
        st.serialize_field("sp", &self.sp)?;
        st.serialize_field("recompute", &self.recompute)?;
        st.serialize_field("recompute_layers", &self.recompute_layers)?;
        if skip {
            st.skip_field("recompute_modules")?;
        } else {
            st.serialize_field("recompute_modules", &self.recompute_modules)?;
        }
        st.serialize_field("zero", &self.zero)?;
        st.serialize_field("low_prec_shard", &self.low_prec_shard)?;
        st.serialize_field("schedule", &self.schedule)?;
        st.end()
    }
}

impl Config {
    /// `dp × tp × pp` devices, `num_micro_batches` micro-batches of `micro_batch`
    /// sequences, and nothing else on: no sequence parallelism, recomputation or ZeRO,
    /// the 1F1B schedule.
    pub fn new(dp: u32, tp: u32, pp: u32, micro_batch: u32, num_micro_batches: u32) -> Config {
        Config {
            dp,
            tp,
            pp,
            cp: 1,
            ep: 1,
            etp: 1,
            micro_batch,
            num_micro_batches,
            sp: false,
            recompute: Recompute::None,
            recompute_layers: None,
            recompute_modules: None,
            zero: 0,
            low_prec_shard: false,
            schedule: Schedule::OneFOneB,
        }
    }

    /// Devices used: `dp · cp · tp · pp`.
    pub fn devices(&self) -> u64 {
        u64::from(self.dp) * u64::from(self.cp) * u64::from(self.tp) * u64::from(self.pp)
    }

    /// Ranks a gradient is reduced over: `dp · cp` (Megatron-LM reduces gradients and
    /// shards its distributed optimizer over the data-parallel group with context
    /// parallelism, `get_data_parallel_group(with_context_parallel=True)`).
    pub fn grad_ranks(&self) -> u32 {
        self.dp.saturating_mul(self.cp)
    }

    /// The expert-data-parallel degree `edp = tp · cp · dp / (ep · etp)`: the ranks that
    /// hold the same expert shard, over which expert gradients are reduced and ZeRO
    /// shards expert optimizer states (Megatron-Core's `expert_data_parallel_size`).
    /// 0 when `ep · etp` does not divide `tp · cp · dp` (an invalid configuration).
    pub fn expert_dp(&self) -> u32 {
        let ranks = u64::from(self.tp) * u64::from(self.cp) * u64::from(self.dp);
        let expert = u64::from(self.ep) * u64::from(self.etp);
        if expert == 0 || ranks % expert != 0 {
            return 0;
        }
        u32::try_from(ranks / expert).unwrap_or(0)
    }

    /// Sequences per step.
    pub fn global_batch(&self) -> u64 {
        u64::from(self.dp) * u64::from(self.num_micro_batches) * u64::from(self.micro_batch)
    }

    /// The recomputation the compiler applies: the policy, and the module set only
    /// with selective recomputation (another policy ignores it).
    pub fn recomputation(&self) -> Recomputation {
        Recomputation {
            policy: self.recompute,
            modules: self
                .recompute_modules
                .filter(|_| self.recompute == Recompute::Selective),
        }
    }

    /// Whether the low-precision parameters are sharded (ZeRO-3 or the explicit flag).
    pub fn shards_low_prec(&self) -> bool {
        self.zero >= 3 || self.low_prec_shard
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "dp {} tp {} pp {}{}{}{} b {} m {}{} recompute {}{}{} zero {}{} {}",
            self.dp,
            self.tp,
            self.pp,
            if self.cp > 1 {
                format!(" cp {}", self.cp)
            } else {
                String::new()
            },
            if self.ep > 1 {
                format!(" ep {}", self.ep)
            } else {
                String::new()
            },
            // With experts split, the expert tensor-parallel degree always (`eval`'s
            // `--etp` defaults to `tp`, Megatron-LM's default, so `etp 1` must show).
            if self.etp > 1 || self.ep > 1 {
                format!(" etp {}", self.etp)
            } else {
                String::new()
            },
            self.micro_batch,
            self.num_micro_batches,
            if self.sp { " sp" } else { "" },
            self.recompute,
            match self.recompute_modules {
                Some(m) => format!(" [{m}]"),
                None => String::new(),
            },
            match self.recompute_layers {
                Some(k) if self.recompute != Recompute::None => format!(" ({k} layers/stage)"),
                _ => String::new(),
            },
            self.zero,
            if self.low_prec_shard { " lps" } else { "" },
            self.schedule
        )
    }
}
