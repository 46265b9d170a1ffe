//! How a user's calibration is used: it changes what programs cost, never which
//! program runs, and it says when it was measured on other hardware.

use apar::cluster::Cluster;
use apar::cost::calibration::builtin_named;
use apar::models::zoo;
use apar::passes::{Config, Recompute, Schedule};
use apar::{PlanOptions, Session};

fn session(calibration: Option<apar::cost::Calibration>) -> Session {
    let model = zoo::lookup("llama2-7b").unwrap();
    let cluster = Cluster::resolve("dgx-h100:1").unwrap();
    let mut opts = PlanOptions::new(4096, 16);
    opts.memory_ratio = 1.0;
    opts.calibration = calibration;
    Session::for_config(&model, &cluster, &opts).unwrap()
}

fn tp4() -> Config {
    let mut c = Config::new(2, 4, 1, 1, 8);
    c.sp = true;
    c.recompute = Recompute::None;
    c.schedule = Schedule::OneFOneB;
    c
}

/// A slower interconnect makes tensor-parallel steps slower but leaves the sharded
/// program, hence the memory, as it was: the sharding pass compares layouts with the
/// device's built-in table.
#[test]
fn a_calibration_changes_costs_not_programs() {
    let mut slow = builtin_named("h100").unwrap();
    slow.link /= 10.0;
    let base = session(None).evaluate(&tp4()).unwrap();
    let slowed = session(Some(slow)).evaluate(&tp4()).unwrap();
    assert_eq!(base.memory.peak_bytes, slowed.memory.peak_bytes);
    assert!(slowed.step_time_s > base.step_time_s);
}

/// The A100 table on an H100 cluster is priced as asked, with a warning naming both.
#[test]
fn a_calibration_for_other_hardware_warns() {
    let plan = session(Some(builtin_named("a100").unwrap()))
        .evaluate(&tp4())
        .unwrap();
    let text: Vec<String> = plan.warnings.iter().map(ToString::to_string).collect();
    assert!(
        text.iter()
            .any(|w| w.contains("A100-SXM4-80GB") && w.contains("H100-SXM5-80GB")),
        "{text:?}"
    );
    let own = session(Some(builtin_named("h100").unwrap()))
        .evaluate(&tp4())
        .unwrap();
    assert!(own
        .warnings
        .iter()
        .all(|w| !w.to_string().contains("calibration is for")));
}

/// DeepSeek-V3's cluster (2,048 H800 in nodes of 8): the preset resolves and the H800,
/// the H100's die with NVLink cut to 400 GB/s, is priced with the H100 table.
#[test]
fn the_h800_preset_uses_the_h100_table() {
    let c = Cluster::resolve("hgx-h800:256").unwrap();
    assert_eq!(c.devices(), 2048);
    assert_eq!(c.intra_node.bandwidth, 200e9);
    let m = apar::cost::CostModel::new(c);
    assert!(!m.defaulted);
    assert_eq!(m.eff, builtin_named("h100").unwrap());
}

/// A library user handing the compiler a calibration directly gets the same checks as
/// `PlanOptions::calibration`: nonsense is refused, naming the field, not priced.
#[test]
fn the_compiler_refuses_an_invalid_calibration() {
    use apar::lower::compile::{CompileError, Compiler, ModelSource};
    let model = zoo::lookup("tiny-llama").unwrap();
    let cluster = Cluster::resolve("dgx-a100-80g:1").unwrap();
    let compiler = || {
        Compiler::new(
            ModelSource::Config(model.clone()),
            cluster.clone(),
            128,
            8,
            1.0,
        )
        .unwrap()
    };
    let mut bad = builtin_named("a100").unwrap();
    bad.overlap_slowdown = 0.95;
    let err = compiler().with_calibration(bad.clone()).err().unwrap();
    assert!(
        matches!(&err, CompileError::Calibration(m) if m.contains("overlap_slowdown")),
        "{err}"
    );
    let mut c = compiler();
    assert!(c.reprice(bad.clone()).is_err());
    assert!(c.repriced(bad).is_err());
    let good = builtin_named("a100").unwrap();
    assert!(c.reprice(good.clone()).is_ok());
    assert!(compiler().with_calibration(good).is_ok());
}
