//! Search over configurations: out-of-memory suggestions (each one compiled and
//! checked), and (in `plan`) the whole candidate space.

use crate::lower::compile::Compiler;
use crate::passes::{Config, Recompute};
use crate::report::Suggestion;

/// Single changes to `c` that an out-of-memory user could make, in a fixed order.
fn neighbours(c: &Config) -> Vec<(String, Config)> {
    let mut out = Vec::new();
    for zero in (c.zero + 1)..=3 {
        out.push((
            format!("ZeRO stage {zero} (--zero {zero})"),
            Config { zero, ..*c },
        ));
    }
    if !c.shards_low_prec() && c.dp > 1 {
        out.push((
            "shard the low-precision parameters (--low-prec-shard)".into(),
            Config {
                low_prec_shard: true,
                ..*c
            },
        ));
    }
    for r in [Recompute::Selective, Recompute::Full] {
        if r > c.recompute {
            out.push((
                format!("{r} recomputation (--recompute {r})"),
                Config { recompute: r, ..*c },
            ));
        }
    }
    if c.micro_batch % 2 == 0 {
        out.push((
            format!(
                "micro-batch {} × {} micro-batches (--micro-batch {})",
                c.micro_batch / 2,
                c.num_micro_batches * 2,
                c.micro_batch / 2
            ),
            Config {
                micro_batch: c.micro_batch / 2,
                num_micro_batches: c.num_micro_batches * 2,
                ..*c
            },
        ));
    }
    if c.dp % 2 == 0 {
        out.push((
            format!(
                "{} pipeline stages, dp {} (--pp {} --dp {})",
                c.pp * 2,
                c.dp / 2,
                c.pp * 2,
                c.dp / 2
            ),
            Config {
                pp: c.pp * 2,
                dp: c.dp / 2,
                num_micro_batches: c.num_micro_batches * 2,
                ..*c
            },
        ));
        out.push((
            format!(
                "tensor parallel {}, dp {} (--tp {} --dp {})",
                c.tp * 2,
                c.dp / 2,
                c.tp * 2,
                c.dp / 2
            ),
            Config {
                tp: c.tp * 2,
                dp: c.dp / 2,
                num_micro_batches: c.num_micro_batches * 2,
                ..*c
            },
        ));
    }
    if c.tp > 1 && !c.sp {
        out.push(("sequence parallelism (--sp)".into(), Config { sp: true, ..*c }));
    }
    out
}

/// Compiles every single change of `c` and returns those that fit, fastest first.
pub fn suggestions(compiler: &Compiler, c: &Config) -> Vec<Suggestion> {
    let mut fits: Vec<Suggestion> = neighbours(c)
        .into_iter()
        .filter_map(|(change, cfg)| {
            let e = compiler.evaluate(&cfg).ok()?;
            e.fits.then_some(Suggestion {
                change,
                config: Some(cfg),
                peak_bytes: e.peak_bytes,
                step_time_s: e.step_time_s,
            })
        })
        .collect();
    fits.sort_by(|a, b| a.step_time_s.total_cmp(&b.step_time_s));
    fits
}
