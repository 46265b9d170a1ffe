//! probe (temporary)
use apar::cluster::Cluster;
use apar::engine::Engine;
use apar::lower::compile::{Compiler, ModelSource};
use apar::models::{zoo, Attention};
use apar::passes::{Config, Recompute, Schedule};

const GIB: f64 = (1u64 << 30) as f64;

fn cluster(nodes: u32, per_node: u32) -> Cluster {
    let mut c = Cluster::resolve(&format!("dgx-a100-80g:{nodes}")).unwrap();
    c.devices_per_node = per_node;
    c
}

fn compiler(model: &str, flash: bool, cl: Cluster, seq: u64, gbs: u64, engine: Engine) -> Compiler {
    let mut m = zoo::lookup(model).unwrap();
    if flash {
        m.attention = Attention::Flash;
    }
    Compiler::new(ModelSource::Config(m), cl, seq, gbs, 1.0)
        .unwrap()
        .with_engine(engine)
}

#[allow(clippy::too_many_arguments)]
fn cfg(
    dp: u32,
    tp: u32,
    pp: u32,
    b: u32,
    m: u32,
    sp: bool,
    rc: Recompute,
    zero: u8,
    low: bool,
    sched: Schedule,
) -> Config {
    Config {
        dp,
        tp,
        pp,
        micro_batch: b,
        num_micro_batches: m,
        sp,
        recompute: rc,
        zero,
        low_prec_shard: low,
        schedule: sched,
        recompute_layers: None,
    }
}

fn show(what: &str, c: &Compiler, k: &Config) {
    let e = c.evaluate(k).unwrap();
    for s in &e.sim.memory {
        eprintln!("{what} stage {} buf {:.3} rt {:.3} peak {:.3} params {:.3} grads {:.3} opt {:.3} act {:.3} tmp {:.3}", s.stage, s.buffers as f64 / GIB, s.runtime as f64 / GIB,
            s.peak_bytes as f64 / GIB, s.params as f64 / GIB, s.grads as f64 / GIB, s.optimizer as f64 / GIB, s.activations as f64 / GIB, s.temporary as f64 / GIB);
        if s.stage > 2 {
            break;
        }
    }
}

#[test]
fn probe() {
    let k22 = compiler(
        "megatron-22b",
        false,
        cluster(1, 8),
        2048,
        4,
        Engine::Megatron,
    );
    show(
        "22b none",
        &k22,
        &cfg(
            1,
            8,
            1,
            4,
            1,
            false,
            Recompute::None,
            0,
            false,
            Schedule::OneFOneB,
        ),
    );
    show(
        "22b sel",
        &k22,
        &cfg(
            1,
            8,
            1,
            4,
            1,
            true,
            Recompute::Selective,
            0,
            false,
            Schedule::OneFOneB,
        ),
    );
    let k175 = compiler(
        "gpt3-175b",
        false,
        cluster(8, 8),
        2048,
        64,
        Engine::Megatron,
    );
    show(
        "175b none",
        &k175,
        &cfg(
            1,
            8,
            8,
            1,
            64,
            false,
            Recompute::None,
            0,
            false,
            Schedule::Interleaved(3),
        ),
    );
    show(
        "175b sel",
        &k175,
        &cfg(
            1,
            8,
            8,
            1,
            64,
            true,
            Recompute::Selective,
            0,
            false,
            Schedule::Interleaved(3),
        ),
    );
    let k13 = compiler(
        "llama2-13b",
        true,
        cluster(16, 8),
        2048,
        1024,
        Engine::Megatron,
    );
    show(
        "13b",
        &k13,
        &cfg(
            64,
            2,
            1,
            2,
            8,
            true,
            Recompute::None,
            1,
            false,
            Schedule::OneFOneB,
        ),
    );
    let k7a = compiler(
        "llama2-7b",
        true,
        cluster(1, 2),
        2048,
        128,
        Engine::Megatron,
    );
    show(
        "7b dp1",
        &k7a,
        &cfg(
            1,
            2,
            1,
            4,
            32,
            true,
            Recompute::None,
            1,
            false,
            Schedule::OneFOneB,
        ),
    );
    let k7b = compiler(
        "llama2-7b",
        true,
        cluster(1, 4),
        2048,
        128,
        Engine::Megatron,
    );
    show(
        "7b dp2",
        &k7b,
        &cfg(
            2,
            2,
            1,
            4,
            16,
            true,
            Recompute::None,
            1,
            false,
            Schedule::OneFOneB,
        ),
    );
    let k70 = compiler(
        "llama2-70b",
        true,
        cluster(8, 8),
        4096,
        128,
        Engine::Torchtitan,
    );
    show(
        "70b b2 sel",
        &k70,
        &cfg(
            64,
            1,
            1,
            2,
            1,
            false,
            Recompute::Selective,
            3,
            false,
            Schedule::OneFOneB,
        ),
    );
    show(
        "70b b2 full",
        &k70,
        &cfg(
            64,
            1,
            1,
            2,
            1,
            false,
            Recompute::Full,
            3,
            false,
            Schedule::OneFOneB,
        ),
    );
    let k70b = compiler(
        "llama2-70b",
        true,
        cluster(8, 8),
        4096,
        64,
        Engine::Torchtitan,
    );
    show(
        "70b b1 sel",
        &k70b,
        &cfg(
            64,
            1,
            1,
            1,
            1,
            false,
            Recompute::Selective,
            3,
            false,
            Schedule::OneFOneB,
        ),
    );
}
