//! DeepSpeed `ds_config` JSON.
//!
//! Keys as DeepSpeed [`super::DEEPSPEED_VERSION`] reads them
//! (`deepspeed/runtime/config.py`, `runtime/pipe/engine.py`, `runtime/pipe/module.py`,
//! `runtime/tensor_parallel/config.py`):
//!
//! - `train_batch_size = train_micro_batch_size_per_gpu × gradient_accumulation_steps ×
//!   dp`, where DeepSpeed takes dp from the `mpu` it is given (the pipeline module's
//!   grid: world / (pp × tp)) and from the world size without one: the job must be
//!   launched on `dp × tp × pp` ranks with the model-parallel groups given to
//!   `deepspeed.initialize`;
//! - the pipeline engine refuses ZeRO-2/3 (`PipelineEngine.__init__`) and runs its own
//!   1F1B `TrainSchedule` (no GPipe, no interleaving); the `pipeline` section's
//!   `activation_checkpoint_interval` is read by the engine, `stages` and `partition`
//!   are the values to give `PipelineModule(num_stages=…, partition_method=…)`, whose
//!   `uniform` and `type:regex` partitions (`runtime/utils.py` `partition_uniform`,
//!   `partition_balanced`) apar reproduces to check that the cut comes out as planned;
//! - tensor parallelism without a pipeline is AutoTP training
//!   (`tensor_parallel.autotp_size`); with a pipeline it is the model code's, through
//!   the `PipelineModule`'s topology;
//! - the section `apar` holds what DeepSpeed leaves to the training script (which layers
//!   to recompute, sequence parallelism, the layer count the partition is checked
//!   with); DeepSpeed does not read it.

use super::{exact_div, Export, ExportError, ExportPlan, ParseError, ParsedConfig, StageLayers};
use crate::engine::memory::Precision;
use crate::engine::Engine;
use crate::passes::{Recompute, Schedule};
use serde_json::{json, Value};

const E: Engine = Engine::DeepSpeed;

/// The layer-class pattern of `partition_method="type:…"` (Megatron-DeepSpeed's
/// `ParallelTransformerLayerPipe` matches it; DeepSpeed searches it case-insensitively).
pub(super) const LAYER_TYPE: &str = "transformer";

/// The most transformer layers [`partition`] is asked about (the largest published
/// dense models have under 200).
const MAX_LAYERS: u32 = 1024;

/// DeepSpeed's `partition_uniform(num_items, num_parts)`: the first `residual` parts
/// one item longer.
fn partition_uniform(items: usize, parts: usize) -> Vec<usize> {
    if items <= parts {
        return (0..=parts).map(|p| p.min(items)).collect();
    }
    let chunk = items / parts;
    let residual = items - chunk * parts;
    (0..=parts).map(|p| p * chunk + p.min(residual)).collect()
}

/// DeepSpeed's `partition_balanced(weights, num_parts)`: the linear partition that
/// minimizes the spread between the heaviest and the lightest part, ties going to the
/// last split point examined (the same dynamic program, the same comparisons).
fn partition_balanced(weights: &[f64], parts: usize) -> Vec<usize> {
    let n = weights.len();
    let m = parts;
    if n <= m {
        return partition_uniform(n, m);
    }
    let inf = f64::INFINITY;
    let mut dp_max = vec![vec![inf; m + 1]; n + 1];
    let mut dp_min = vec![vec![inf; m + 1]; n + 1];
    let mut dp_cost = vec![vec![inf; m + 1]; n + 1];
    let mut position = vec![vec![0usize; m + 1]; n + 1];
    let mut prefix = vec![0.0; n + 1];
    for i in 0..n {
        prefix[i + 1] = prefix[i] + weights[i];
    }
    dp_max[0][0] = 0.0;
    dp_cost[0][0] = 0.0;
    for i in 1..=n {
        for j in 1..=i.min(m) {
            for k in 0..i {
                let part = prefix[i] - prefix[k];
                let max_sum = dp_max[k][j - 1].max(part);
                let min_sum = dp_min[k][j - 1].min(part);
                let cost = max_sum - min_sum;
                if dp_cost[i][j] >= cost {
                    dp_cost[i][j] = cost;
                    dp_max[i][j] = max_sum;
                    dp_min[i][j] = min_sum;
                    position[i][j] = k;
                }
            }
        }
    }
    let mut bounds = vec![n];
    for i in (1..=m).rev() {
        let last = bounds[bounds.len() - 1];
        bounds.push(position[last][i]);
    }
    bounds.reverse();
    bounds
}

/// The stages a partition of the layer specs `[embedding, layer × L, head]` makes.
fn stages_of(bounds: &[usize], layers: u32) -> Vec<StageLayers> {
    let head = layers as usize + 1;
    bounds
        .windows(2)
        .map(|w| {
            let (a, b) = (w[0], w[1]);
            let inner = (a.max(1)..b.min(head)).count();
            StageLayers {
                embedding: a == 0 && b > 0,
                layers: u32::try_from(inner).unwrap_or(u32::MAX),
                head: a <= head && head < b,
            }
        })
        .collect()
}

/// The stages `PipelineModule(partition_method=method)` makes of `layers` transformer
/// layers between an embedding and a head.
pub(super) fn partition(method: &str, layers: u32, pp: u32) -> Option<Vec<StageLayers>> {
    // DeepSpeed's dynamic program is cubic: bound it to models that exist.
    if layers > MAX_LAYERS || pp == 0 || pp > layers + 2 {
        return None;
    }
    let items = layers as usize + 2;
    let bounds = match method {
        "uniform" => partition_uniform(items, pp as usize),
        m if m == format!("type:{LAYER_TYPE}") => {
            let w: Vec<f64> = (0..items)
                .map(|i| if i == 0 || i + 1 == items { 0.0 } else { 1.0 })
                .collect();
            partition_balanced(&w, pp as usize)
        }
        _ => return None,
    };
    Some(stages_of(&bounds, layers))
}

pub(super) fn export(p: &ExportPlan) -> Result<Export, ExportError> {
    let c = &p.config;
    if c.cp > 1 {
        return Err(ExportError::unsupported(
            E,
            format!("context parallel {}", c.cp),
            "DeepSpeed has no ring attention (DeepSpeed-Ulysses splits the sequence by all-to-all over heads, another scheme)",
        ));
    }
    if c.pp > 1 && c.zero >= 2 {
        return Err(ExportError::unsupported(
            E,
            format!("ZeRO-{} with a pipeline", c.zero),
            "the pipeline engine asserts ZeRO stage < 2 (\"ZeRO-2 and ZeRO-3 are incompatible with pipeline parallelism\")",
        ));
    }
    if c.pp > 1 && c.schedule != Schedule::OneFOneB {
        return Err(ExportError::unsupported(
            E,
            format!("{} schedule", c.schedule),
            "the pipeline engine runs its 1F1B TrainSchedule only (no option selects another)",
        ));
    }
    if c.low_prec_shard && c.zero < 3 {
        return Err(ExportError::unsupported(
            E,
            format!("sharded low-precision parameters with ZeRO-{}", c.zero),
            "zero_optimization shards the 16-bit parameters at stage 3 only",
        ));
    }
    if c.pp == 1 && c.tp > 1 && c.sp {
        return Err(ExportError::unsupported(
            E,
            "sequence parallelism",
            "tensor parallelism without a pipeline is AutoTP (tensor_parallel.autotp_size), which has no sequence-parallel option",
        ));
    }
    if c.pp > 1 && c.recompute == Recompute::Full && c.recompute_layers.is_some() {
        return Err(ExportError::unsupported(
            E,
            "full recomputation of some layers per stage",
            "pipeline.activation_checkpoint_interval checkpoints every layer group of a stage, not the first k layers",
        ));
    }
    let layers = p.layers();
    let mut notes = vec![format!(
        "launch on dp {} x tp {} x pp {} = {} ranks and pass the model-parallel groups to deepspeed.initialize (a PipelineModule's grid, or an mpu): DeepSpeed checks train_batch_size = micro batch x accumulation x dp with dp from them",
        c.dp,
        c.tp,
        c.pp,
        c.devices()
    )];
    let mut v = json!({
        "train_batch_size": p.global_batch,
        "train_micro_batch_size_per_gpu": c.micro_batch,
        "gradient_accumulation_steps": c.num_micro_batches,
        "zero_optimization": {"stage": c.zero},
    });
    match p.precision.compute {
        Precision::Bf16 => v["bf16"] = json!({"enabled": true}),
        Precision::Fp16 => v["fp16"] = json!({"enabled": true}),
        // FP8 was refused by `export` (`Engine::fp8`).
        Precision::Fp32 | Precision::Fp8 => {}
    }
    // The simulation overlaps the gradient reduction with the backward by buckets
    // (`engine::overlap`); DeepSpeed does so for ZeRO-1/2 only with `overlap_comm`
    // (its default is on for stage 3 alone, `zero/config.py`).
    if c.zero >= 1 {
        v["zero_optimization"]["overlap_comm"] = json!(true);
    }
    if c.pp > 1 {
        let method = ["uniform", &format!("type:{LAYER_TYPE}")]
            .into_iter()
            .find(|m| partition(m, layers, c.pp).as_deref() == Some(&p.stages[..]))
            .ok_or_else(|| {
                ExportError::unsupported(
                    E,
                    format!(
                        "pipeline cut ({})",
                        p.stages
                            .iter()
                            .map(|s| s.layers.to_string())
                            .collect::<Vec<_>>()
                            .join("/")
                    ),
                    "PipelineModule's partition_method (uniform, parameters, type:regex) places no such cut",
                )
            })?
            .to_string();
        let interval = u32::from(c.recompute == Recompute::Full);
        v["pipeline"] = json!({
            "stages": c.pp,
            "partition": method,
            "activation_checkpoint_interval": interval,
        });
        notes.push(format!(
            "build PipelineModule(layers=[embedding, {layers} transformer layers, head], num_stages={}, partition_method=\"{method}\", topology=PipeModelDataParallelTopology(num_pp={}, num_mp={}, num_dp={}))",
            c.pp, c.pp, c.tp, c.dp
        ));
    } else if c.tp > 1 {
        v["tensor_parallel"] = json!({"autotp_size": c.tp});
    }
    if c.recompute != Recompute::None && !(c.pp > 1 && c.recompute == Recompute::Full) {
        v["activation_checkpointing"] = json!({
            "partition_activations": false,
            "contiguous_memory_optimization": false,
            "cpu_checkpointing": false,
        });
        notes.push(format!(
            "recomputation ({}) is the model code's: wrap {} with deepspeed.checkpointing.checkpoint",
            c.recompute,
            match (c.recompute, c.recompute_layers) {
                (Recompute::Selective, _) => "each layer's attention core".to_string(),
                (_, Some(k)) => format!("the first {k} layers of each stage"),
                _ => "every layer".to_string(),
            }
        ));
    }
    let mut apar = json!({
        "tensor_parallel_size": c.tp,
        "num_layers": layers,
        "recompute": c.recompute.name(),
    });
    if let Some(k) = c
        .recompute_layers
        .filter(|_| c.recompute != Recompute::None)
    {
        apar["recompute_layers"] = json!(k);
    }
    if c.tp > 1 {
        apar["sequence_parallel"] = json!(c.sp);
        if c.sp {
            notes.push("sequence parallelism is the model code's, with its tensor parallelism (as Megatron-DeepSpeed's --sequence-parallel)".into());
        }
    }
    v["apar"] = apar;
    notes.push(
        "the section \"apar\" is not read by DeepSpeed: it is for the training script".into(),
    );
    Ok(Export {
        engine: E,
        text: serde_json::to_string_pretty(&v).unwrap_or_default() + "\n",
        env: Vec::new(),
        notes,
    })
}

fn u64_at(v: &Value, path: &[&str]) -> Result<Option<u64>, ParseError> {
    let mut x = v;
    for k in path {
        match x.get(k) {
            Some(y) => x = y,
            None => return Ok(None),
        }
    }
    x.as_u64().map(Some).ok_or_else(|| ParseError::BadValue {
        option: path.join("."),
        value: x.to_string(),
    })
}

fn req(v: &Value, path: &[&str]) -> Result<u64, ParseError> {
    u64_at(v, path)?.ok_or_else(|| ParseError::Missing(path.join(".")))
}

fn small(x: u64, what: &str) -> Result<u32, ParseError> {
    u32::try_from(x).map_err(|_| ParseError::BadValue {
        option: what.into(),
        value: x.to_string(),
    })
}

pub(super) fn parse(text: &str, devices: u64) -> Result<ParsedConfig, ParseError> {
    let v: Value = serde_json::from_str(text).map_err(|e| ParseError::Json(e.to_string()))?;
    let train = req(&v, &["train_batch_size"])?;
    let micro_batch = small(req(&v, &["train_micro_batch_size_per_gpu"])?, "micro batch")?;
    let num_micro_batches = small(req(&v, &["gradient_accumulation_steps"])?, "accumulation")?;
    let pp = small(
        u64_at(&v, &["pipeline", "stages"])?.unwrap_or(1),
        "pipeline.stages",
    )?;
    let tp = match u64_at(&v, &["tensor_parallel", "autotp_size"])? {
        Some(t) => small(t, "tensor_parallel.autotp_size")?,
        None => small(
            u64_at(&v, &["apar", "tensor_parallel_size"])?.unwrap_or(1),
            "tp",
        )?,
    };
    let dp = exact_div(
        devices,
        u64::from(tp) * u64::from(pp),
        "world size over tp × pp",
    )?;
    if u128::from(train) != u128::from(dp) * u128::from(micro_batch) * u128::from(num_micro_batches)
    {
        return Err(ParseError::Inconsistent(format!(
            "train_batch_size {train} is not micro batch × accumulation × dp ({micro_batch} × {num_micro_batches} × {dp})"
        )));
    }
    let zero = u8::try_from(u64_at(&v, &["zero_optimization", "stage"])?.unwrap_or(0))
        .map_err(|_| ParseError::Inconsistent("zero stage".into()))?;
    let recompute = match v["apar"]["recompute"].as_str() {
        Some("selective") => Recompute::Selective,
        Some("full") => Recompute::Full,
        _ if u64_at(&v, &["pipeline", "activation_checkpoint_interval"])?.unwrap_or(0) > 0 => {
            Recompute::Full
        }
        _ => Recompute::None,
    };
    let recompute_layers = match u64_at(&v, &["apar", "recompute_layers"])? {
        Some(k) if recompute != Recompute::None => Some(small(k, "apar.recompute_layers")?),
        _ => None,
    };
    let stages = if pp > 1 {
        let method = v["pipeline"]["partition"]
            .as_str()
            .ok_or_else(|| ParseError::Missing("pipeline.partition".into()))?;
        let layers = small(req(&v, &["apar", "num_layers"])?, "apar.num_layers")?;
        partition(method, layers, pp).ok_or_else(|| ParseError::BadValue {
            option: "pipeline.partition".into(),
            value: method.into(),
        })?
    } else {
        Vec::new()
    };
    Ok(ParsedConfig {
        dp,
        tp,
        pp,
        cp: 1,
        ep: 1,
        etp: 1,
        micro_batch,
        num_micro_batches,
        sp: tp > 1 && v["apar"]["sequence_parallel"].as_bool() == Some(true),
        recompute,
        recompute_layers,
        recompute_modules: None,
        zero,
        low_prec_shard: zero >= 3,
        schedule: (pp > 1).then_some(Schedule::OneFOneB),
        stages,
        fp8: false,
        moe: None,
        mla: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `partition_uniform(10, 4)` in DeepSpeed's `runtime/utils.py` gives
    /// `[0, 3, 6, 8, 10]` (chunk 2, residual 2 added to the first two parts).
    #[test]
    fn uniform_partition_adds_the_residual_to_the_first_parts() {
        assert_eq!(partition_uniform(10, 4), vec![0, 3, 6, 8, 10]);
        assert_eq!(partition_uniform(2, 4), vec![0, 1, 2, 2, 2]);
    }

    /// Equal weights split evenly; a part's weight never exceeds the optimum.
    #[test]
    fn balanced_partition_of_equal_weights_is_even() {
        let b = partition_balanced(&[1.0; 8], 4);
        assert_eq!(b, vec![0, 2, 4, 6, 8]);
    }
}
