//! `apar._apar`: the Rust side of the Python package (see `python/README.md`).
//!
//! A thin layer: every function takes and returns JSON text in the library's own serde
//! forms ([`apar::Plan`], [`apar::PlanOptions`], [`apar::report::OomReport`],
//! [`apar::engine::export::Export`], [`apar::ir::json::GraphDoc`]), and the Python
//! modules wrap the documents in typed dataclasses. Errors are raised as the exception
//! classes of `apar.errors`, built from `(message, kind, detail)` where `kind` names the
//! library's error variant and `detail` is a JSON document (the OOM report for
//! `out_of_memory`) or `None`. Nothing here panics on bad input.

use apar::calibrate;
use apar::cluster::Cluster;
use apar::engine::Engine;
use apar::passes::Config;
use apar::{ModelSpec, Plan, PlanError, PlanOptions, Session};
use pyo3::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Raises `apar.errors.<class>(message, kind, detail)`.
fn raise(
    py: Python<'_>,
    class: &str,
    message: String,
    kind: &str,
    detail: Option<String>,
) -> PyErr {
    let made = py
        .import("apar.errors")
        .and_then(|m| m.getattr(class))
        .and_then(|c| c.call1((message.clone(), kind, detail)));
    match made {
        Ok(e) => PyErr::from_value(e),
        Err(e) => e,
    }
}

fn to_json<T: serde::Serialize>(py: Python<'_>, v: &T) -> PyResult<String> {
    serde_json::to_string(v).map_err(|e| {
        raise(
            py,
            "ApError",
            format!("cannot serialize: {e}"),
            "internal",
            None,
        )
    })
}

fn bad_json(py: Python<'_>, what: &str, e: serde_json::Error) -> PyErr {
    raise(py, "ConfigError", format!("{what}: {e}"), "bad_json", None)
}

/// The exception class and kind of a [`PlanError`].
fn plan_error(py: Python<'_>, e: PlanError) -> PyErr {
    let message = e.to_string();
    let (class, kind, detail) = match &e {
        PlanError::OutOfMemory(oom) => (
            "OutOfMemory",
            "out_of_memory",
            serde_json::to_value(oom.as_ref()).ok().map(|mut v| {
                if let Some(o) = v.as_object_mut() {
                    o.insert("text".into(), oom.text().into());
                }
                v.to_string()
            }),
        ),
        PlanError::Model(m) => {
            let unsupported = matches!(m, apar::models::ModelError::Unsupported { .. });
            (
                if unsupported {
                    "UnsupportedModel"
                } else {
                    "ModelError"
                },
                "model",
                None,
            )
        }
        PlanError::NoHfArchitecture(_) => ("ModelError", "no_hf_architecture", None),
        PlanError::HfCodeNotModelled { .. } => ("ModelError", "hf_code_not_modelled", None),
        PlanError::Compile(apar::lower::compile::CompileError::Verify(_)) => {
            ("GraphError", "verify", None)
        }
        PlanError::TrainingGraph(_) => ("GraphError", "training_graph", None),
        PlanError::EmptySpace(_) => ("ConfigError", "empty_space", None),
        PlanError::Cluster(_) => ("ConfigError", "cluster", None),
        PlanError::Compile(_) => ("ConfigError", "compile", None),
        PlanError::InvalidRuntime { .. } => ("ConfigError", "runtime", None),
        PlanError::MoeImbalance(_) | PlanError::MoeImbalanceDense(_) => {
            ("ConfigError", "moe_imbalance", None)
        }
        PlanError::Calibration(_) => ("ConfigError", "calibration", None),
        PlanError::BatchNotDivisible { .. } => ("ConfigError", "batch_not_divisible", None),
        PlanError::NothingCompiled { .. } => ("PlanFailed", "nothing_compiled", None),
        PlanError::EditedModelConfig
        | PlanError::GraphOnly(_)
        | PlanError::ReadPlan { .. }
        | PlanError::ParsePlan { .. } => ("ConfigError", "saved_plan", None),
    };
    raise(py, class, message, kind, detail)
}

/// `options` (a partial [`PlanOptions`] document) over the defaults for `seq` and
/// `global_batch`: objects merge key by key, anything else replaces.
fn options(py: Python<'_>, seq: u64, global_batch: u64, partial: &str) -> PyResult<PlanOptions> {
    fn merge(base: &mut serde_json::Value, over: serde_json::Value) {
        match (base, over) {
            (serde_json::Value::Object(b), serde_json::Value::Object(o)) => {
                for (k, v) in o {
                    match b.get_mut(&k) {
                        Some(slot) => merge(slot, v),
                        None => {
                            b.insert(k, v);
                        }
                    }
                }
            }
            (slot, v) => *slot = v,
        }
    }
    let mut base = serde_json::to_value(PlanOptions::new(seq, global_batch))
        .map_err(|e| bad_json(py, "options", e))?;
    let over: serde_json::Value =
        serde_json::from_str(partial).map_err(|e| bad_json(py, "options", e))?;
    merge(&mut base, over);
    serde_json::from_value(base).map_err(|e| bad_json(py, "options", e))
}

/// A session for a model: a GraphDoc JSON text when `graph` is given (named `model`),
/// else a zoo name or a file path. `hf_config`: a Hugging Face `config.json` text whose
/// configuration is attached to plans of a graph, for the engine exports that build the
/// model from its dimensions (ignored when apar's loader cannot read it).
fn session(
    py: Python<'_>,
    model: &str,
    graph: Option<&str>,
    cluster: &str,
    options: &PlanOptions,
    overrides: Option<&str>,
) -> PyResult<Session> {
    let cluster = Cluster::resolve(cluster).map_err(|e| plan_error(py, e.into()))?;
    if let Some(text) = overrides {
        if graph.is_some() {
            return Err(raise(
                py,
                "ConfigError",
                format!("{model}: layers and attention override zoo and config.json models, not a graph"),
                "overrides",
                None,
            ));
        }
        let o: Overrides = serde_json::from_str(text).map_err(|e| bad_json(py, "overrides", e))?;
        let mut spec = ModelSpec::parse(model);
        spec.layers = o.layers;
        spec.attention = o.attention;
        return Session::for_spec(&spec, &cluster, options).map_err(|e| plan_error(py, e));
    }
    match graph {
        Some(text) => {
            let g = apar::ir::json::from_json(text).map_err(|e| {
                raise(
                    py,
                    "GraphError",
                    format!("{model}: {e}"),
                    "graph_json",
                    None,
                )
            })?;
            let mut g = g;
            g.set_name(model);
            Session::for_graph(&g, &cluster, options).map_err(|e| plan_error(py, e))
        }
        None => Session::for_spec(&ModelSpec::parse(model), &cluster, options)
            .map_err(|e| plan_error(py, e)),
    }
}

/// The model overrides of a zoo name or `config.json` (`apar plan --layers
/// --attention`).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Overrides {
    layers: Option<u32>,
    attention: Option<apar::models::Attention>,
}

fn with_config(mut plan: Plan, model: &str, hf_config: Option<&str>) -> Plan {
    if plan.model_config.is_none() {
        if let Some(text) = hf_config {
            plan.model_config = apar::models::hf::from_json_str(model, text).ok();
        }
    }
    plan
}

/// Plans a model; returns the plan JSON. `progress(done, total)` is called as
/// candidates are compiled (at most once per percent).
#[pyfunction]
#[pyo3(signature = (model, cluster, seq, global_batch, options="{}", graph=None, hf_config=None, progress=None, overrides=None))]
#[allow(clippy::too_many_arguments)]
fn plan(
    py: Python<'_>,
    model: &str,
    cluster: &str,
    seq: u64,
    global_batch: u64,
    options: &str,
    graph: Option<&str>,
    hf_config: Option<&str>,
    progress: Option<PyObject>,
    overrides: Option<&str>,
) -> PyResult<String> {
    let opts = self::options(py, seq, global_batch, options)?;
    let s = session(py, model, graph, cluster, &opts, overrides)?;
    // The highest percentage reported so far: workers finish out of order, so a
    // report goes out only when it raises it (at most 100 reports, the last at 100%).
    let last = AtomicUsize::new(0);
    let result = py.allow_threads(|| {
        let report = |done: usize, total: usize| {
            let Some(cb) = &progress else { return };
            let pct = (done * 100).checked_div(total).unwrap_or(100);
            if last.fetch_max(pct, Ordering::Relaxed) < pct {
                Python::with_gil(|py| {
                    // A failing callback must not stop the search.
                    let _ = cb.call1(py, (done, total));
                });
            }
        };
        s.plan_with_progress(&report)
    });
    let plan = result.map_err(|e| plan_error(py, e))?;
    to_json(py, &with_config(plan, model, hf_config))
}

/// Evaluates one configuration (a `Config` JSON document); returns the plan JSON.
#[pyfunction]
#[pyo3(signature = (model, cluster, seq, global_batch, config, options="{}", graph=None, hf_config=None, overrides=None))]
#[allow(clippy::too_many_arguments)]
fn evaluate(
    py: Python<'_>,
    model: &str,
    cluster: &str,
    seq: u64,
    global_batch: u64,
    config: &str,
    options: &str,
    graph: Option<&str>,
    hf_config: Option<&str>,
    overrides: Option<&str>,
) -> PyResult<String> {
    let opts = self::options(py, seq, global_batch, options)?;
    let s = session(py, model, graph, cluster, &opts, overrides)?;
    let mut c: Config = serde_json::from_str(config).map_err(|e| bad_json(py, "config", e))?;
    // An unspecified expert-tensor degree is Megatron-LM's default, tp, for a
    // mixture-of-experts model (as `apar eval`).
    let etp_given = serde_json::from_str::<serde_json::Value>(config)
        .ok()
        .is_some_and(|v| v.get("etp").is_some());
    if !etp_given {
        c.etp = s.default_etp(c.tp);
    }
    let c = s.with_micro_batches(c).map_err(|e| plan_error(py, e))?;
    let plan = py
        .allow_threads(|| s.evaluate(&c))
        .map_err(|e| plan_error(py, e))?;
    to_json(py, &with_config(plan, model, hf_config))
}

fn read_plan(py: Python<'_>, plan: &str) -> PyResult<Plan> {
    serde_json::from_str(plan).map_err(|e| bad_json(py, "plan", e))
}

/// The engine export of a plan (`engine`: the plan's own when `None`); returns the
/// `Export` JSON (`engine`, `text`, `env`, `notes`).
#[pyfunction]
#[pyo3(signature = (plan, engine=None))]
fn export(py: Python<'_>, plan: &str, engine: Option<&str>) -> PyResult<String> {
    let p = read_plan(py, plan)?;
    let engine = match engine {
        Some(name) => parse_engine(py, name)?,
        None => p.engine,
    };
    let e = p
        .export(engine)
        .map_err(|e| raise(py, "ExportError", e.to_string(), "export", None))?;
    let v = serde_json::json!({
        "engine": e.engine.to_string(),
        "text": e.text,
        "env": e.env,
        "env_prefix": e.env_prefix(),
        "notes": e.notes,
    });
    Ok(v.to_string())
}

fn parse_engine(py: Python<'_>, name: &str) -> PyResult<Engine> {
    serde_json::from_value(serde_json::Value::String(name.to_string())).map_err(|_| {
        raise(
            py,
            "ConfigError",
            format!("unknown engine `{name}` (megatron, deepspeed, torchtitan, hf)"),
            "engine",
            None,
        )
    })
}

/// The AP-style search log of a plan.
#[pyfunction]
fn plan_log(py: Python<'_>, plan: &str) -> PyResult<String> {
    Ok(read_plan(py, plan)?.log())
}

/// The human-readable evaluation of a plan.
#[pyfunction]
fn plan_text(py: Python<'_>, plan: &str) -> PyResult<String> {
    Ok(read_plan(py, plan)?.text())
}

/// The Chrome/Perfetto trace (JSON) and the memory SVG of a plan.
#[pyfunction]
fn plan_trace(py: Python<'_>, plan: &str) -> PyResult<(String, String)> {
    let p = read_plan(py, plan)?;
    Ok((p.chrome_trace().to_string(), p.memory_svg()))
}

/// Parses and verifies a GraphDoc JSON text; returns `(ops, tensors, params, text)`
/// where `params` is the number of parameter elements and `text` the IR text form.
#[pyfunction]
fn check_graph(py: Python<'_>, graph: &str) -> PyResult<(usize, usize, u64, String)> {
    let g = apar::ir::json::from_json(graph)
        .map_err(|e| raise(py, "GraphError", e.to_string(), "graph_json", None))?;
    apar::ir::verify(&g).map_err(|e| raise(py, "GraphError", e.to_string(), "verify", None))?;
    let params = g
        .ops()
        .filter(|&o| matches!(g.op(o), apar::ir::Op::Param { .. }))
        .flat_map(|o| g.node(o).results.clone())
        .filter_map(|t| g.get_tensor(t))
        .map(|t| {
            t.ty.shape
                .dims()
                .iter()
                .map(|d| d.as_lit().unwrap_or(0))
                .product::<u64>()
        })
        .sum();
    let tensors = g.ops().map(|o| g.node(o).results.len()).sum();
    Ok((g.ops().count(), tensors, params, apar::ir::text::print(&g)))
}

/// Fits cost parameters to measured runs (run files as the CLI's `calibrate --runs`);
/// returns the `Fit` JSON with the calibration under `calibration`.
#[pyfunction]
#[pyo3(signature = (runs, fit, calibration=None))]
fn calibrate_runs(
    py: Python<'_>,
    runs: Vec<String>,
    fit: &str,
    calibration: Option<&str>,
) -> PyResult<String> {
    let cal_err = |e: String| raise(py, "ConfigError", e, "calibrate", None);
    let free = calibrate::parse_params(fit).map_err(|e| cal_err(e.to_string()))?;
    let start = match calibration {
        Some(path) => Some(
            apar::cost::Calibration::from_json_file(std::path::Path::new(path))
                .map_err(|e| cal_err(e.to_string()))?,
        ),
        None => None,
    };
    let mut all = Vec::new();
    for file in &runs {
        all.extend(
            calibrate::read_runs(std::path::Path::new(file)).map_err(|e| cal_err(e.to_string()))?,
        );
    }
    let f = py
        .allow_threads(|| calibrate::fit(&all, start.as_ref(), &free))
        .map_err(|e| cal_err(e.to_string()))?;
    to_json(py, &f)
}

/// The cluster presets as `(spec, description)` pairs.
#[pyfunction]
fn clusters() -> Vec<(String, String)> {
    apar::cluster::presets()
        .map(|(s, d)| (s, d.to_string()))
        .collect()
}

/// The built-in models as `(name, description)` pairs.
#[pyfunction]
fn models() -> Vec<(String, String)> {
    apar::models::zoo::ZOO
        .iter()
        .map(|z| (z.name.to_string(), z.about.to_string()))
        .collect()
}

/// The IR op names of the op table.
#[pyfunction]
fn op_names() -> Vec<&'static str> {
    apar::ir::OpKind::ALL
        .iter()
        .map(|k| k.info().name)
        .collect()
}

/// The Rust side of the `apar` package.
#[pymodule]
fn _apar(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(plan, m)?)?;
    m.add_function(wrap_pyfunction!(evaluate, m)?)?;
    m.add_function(wrap_pyfunction!(export, m)?)?;
    m.add_function(wrap_pyfunction!(plan_log, m)?)?;
    m.add_function(wrap_pyfunction!(plan_text, m)?)?;
    m.add_function(wrap_pyfunction!(plan_trace, m)?)?;
    m.add_function(wrap_pyfunction!(check_graph, m)?)?;
    m.add_function(wrap_pyfunction!(calibrate_runs, m)?)?;
    m.add_function(wrap_pyfunction!(clusters, m)?)?;
    m.add_function(wrap_pyfunction!(models, m)?)?;
    m.add_function(wrap_pyfunction!(op_names, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
