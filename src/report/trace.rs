//! Chrome/Perfetto trace and SVG memory-timeline output.

use super::MemoryJson;
use crate::lower::schedule::Pass;
use crate::lower::{CommKind, StepTrace};
use serde_json::{json, Value};
use std::fmt::Write;

/// Microseconds (the Chrome trace's unit), rounded to nanoseconds.
fn us(seconds: f64) -> f64 {
    (seconds * 1e6 * 1000.0).round() / 1000.0
}

/// Lanes of one pipeline device in the Chrome trace.
const COMPUTE: u32 = 0;
const P2P: u32 = 1;
const DATA_PARALLEL: u32 = 2;
const OPTIMIZER: u32 = 3;

/// A Chrome trace (`chrome://tracing`, Perfetto): one process per pipeline device with
/// four lanes — compute (forward and backward units of each micro-batch, each split
/// into its blocks, with the tensor-parallel collectives and recomputation inside a
/// block as child slices), pipeline sends, data-parallel collectives (ZeRO-3 gathers
/// and ZeRO-2/3 bucket reduce-scatters per micro-batch, when the simulated
/// communication stream ran them; each bucket's gradient reduction once per step, the
/// exposed tail and the exposed parameter gather after the optimizer) and the optimizer
/// step — and a memory counter by role (bytes).
///
/// Within a block the order of its collectives is not simulated: its tensor-parallel
/// collectives are drawn as one slice of their total time at the end of the block's
/// slice, its recomputation as one slice at the start of its backward slice.
pub fn chrome_trace(trace: &StepTrace, pp: u32) -> Value {
    let pp = pp.max(1);
    let mut ev = Vec::new();
    for s in 0..pp {
        ev.push(json!({"name": "process_name", "ph": "M", "pid": s, "args": {"name": format!("stage {s}")}}));
        for (tid, lane) in [
            (COMPUTE, "compute"),
            (P2P, "pipeline send"),
            (DATA_PARALLEL, "data parallel"),
            (OPTIMIZER, "optimizer"),
        ] {
            ev.push(json!({"name": "thread_name", "ph": "M", "pid": s, "tid": tid, "args": {"name": lane}}));
        }
    }
    for x in &trace.events {
        let pass = match x.pass {
            Pass::F => "F",
            Pass::B => "B",
        };
        ev.push(json!({
            "name": format!("{pass}{}", x.micro_batch), "cat": pass, "ph": "X",
            "ts": us(x.start), "dur": us(x.end - x.start), "pid": x.stage, "tid": COMPUTE,
            "args": {"micro_batch": x.micro_batch, "chunk": x.chunk},
        }));
        let k = (x.chunk * pp + x.stage) as usize;
        let Some(blocks) = trace.blocks.get(k) else {
            continue;
        };
        let order: Box<dyn Iterator<Item = _>> = match x.pass {
            Pass::F => Box::new(blocks.iter()),
            Pass::B => Box::new(blocks.iter().rev()),
        };
        let mut t = x.start;
        for b in order {
            let (dur, tp) = match x.pass {
                Pass::F => (b.fwd_s, b.tp_fwd_s),
                Pass::B => (b.bwd_s, b.tp_bwd_s),
            };
            let name = b
                .block
                .map_or_else(|| "block".to_string(), |b| b.to_string());
            let slice = |name: &str, cat: &str, tid: u32, start: f64, dur: f64| {
                json!({"name": name, "cat": cat, "ph": "X", "ts": us(start), "dur": us(dur),
                       "pid": x.stage, "tid": tid, "args": {"micro_batch": x.micro_batch}})
            };
            if dur > 0.0 {
                ev.push(slice(&name, "block", COMPUTE, t, dur));
            }
            if x.pass == Pass::B && b.recompute_s > 0.0 {
                ev.push(slice("recompute", "recompute", COMPUTE, t, b.recompute_s));
            }
            if tp > 0.0 {
                ev.push(slice("tp collectives", "tp", COMPUTE, t + dur - tp, tp));
            }
            // Data-parallel collectives where the pass's communication stream ran them.
            let (gather, gather_at) = match x.pass {
                Pass::F => (b.dp_fwd_s, b.dp_fwd_at_s),
                Pass::B => (b.dp_bwd_s, b.dp_bwd_at_s),
            };
            if gather > 0.0 {
                let what = format!("zero param gather {name}");
                ev.push(slice(
                    &what,
                    "dp",
                    DATA_PARALLEL,
                    x.start + gather_at,
                    gather,
                ));
            }
            if x.pass == Pass::B && b.reduce_s > 0.0 {
                let what = format!("zero reduce-scatter {name}");
                ev.push(slice(
                    &what,
                    "dp",
                    DATA_PARALLEL,
                    x.start + b.reduce_at_s,
                    b.reduce_s,
                ));
            }
            t += dur;
        }
    }
    for c in &trace.comm {
        let tid = match c.what {
            CommKind::Send => P2P,
            CommKind::Optimizer => OPTIMIZER,
            CommKind::DpReduce | CommKind::GradReduce | CommKind::ParamGather => DATA_PARALLEL,
        };
        let name = match c.block {
            Some(b) => format!("{} {b}", c.what.name()),
            None => c.what.name().to_string(),
        };
        ev.push(json!({
            "name": name, "cat": c.what.name(), "ph": "X", "ts": us(c.start),
            "dur": us(c.end - c.start), "pid": c.stage, "tid": tid,
        }));
    }
    for (s, samples) in trace.timeline.iter().enumerate() {
        for m in samples {
            let states = m.bytes.saturating_sub(m.activations + m.temporary);
            ev.push(json!({
                "name": "memory (bytes)", "ph": "C", "ts": us(m.t), "pid": s,
                "args": {"model states": states, "activations": m.activations, "temporary": m.temporary},
            }));
        }
    }
    json!({"traceEvents": ev, "displayTimeUnit": "ms"})
}

const GIB: f64 = (1u64 << 30) as f64;

/// Round tick spacing (1, 2 or 5 × 10ⁿ) giving at most `max` ticks over `0..=span`.
fn tick_step(span: f64, max: f64) -> f64 {
    if span <= 0.0 || !span.is_finite() {
        return 1.0;
    }
    let raw = span / max;
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|f| f * mag)
        .find(|&step| step >= raw)
        .unwrap_or(10.0 * mag)
}

/// Number text without trailing zeros (`0.5`, `12`, `1.25`).
fn num(x: f64) -> String {
    let s = format!("{x:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Colours of the roles, bottom to top.
const ROLES: [(&str, &str); 3] = [
    ("model states", "#9ecae1"),
    ("activations", "#fdae6b"),
    ("temporary", "#d62728"),
];

/// An SVG plot of each pipeline device's memory over one step, stacked by role (model
/// states, saved activations, temporary buffers), with the budget line, axes in
/// seconds and GiB, and a legend.
pub fn memory_svg(trace: &StepTrace, memory: &MemoryJson, step_time_s: f64) -> String {
    let stages = trace.timeline.len().max(1);
    let (w, panel, left, right, top) = (960.0, 170.0, 70.0, 20.0, 56.0);
    let height = top + panel * stages as f64 + 30.0;
    let t_max = step_time_s.max(1e-12);
    let y_max = memory.peak_bytes.max(memory.budget_bytes).max(1) as f64 * 1.05;
    let plot_w = w - left - right;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="18" font-size="14">Memory per pipeline device over one training step ({} s)</text>"#,
        num(step_time_s)
    );
    // Legend.
    let mut lx = left;
    for (name, colour) in ROLES {
        let _ = writeln!(
            s,
            r#"<rect x="{lx}" y="28" width="12" height="12" fill="{colour}"/><text x="{}" y="38">{name}</text>"#,
            lx + 16.0
        );
        lx += 130.0;
    }
    let _ = writeln!(
        s,
        r##"<line x1="{lx}" y1="34" x2="{}" y2="34" stroke="#c00" stroke-dasharray="4 3"/><text x="{}" y="38">budget {} GiB</text>"##,
        lx + 24.0,
        lx + 28.0,
        num(memory.budget_bytes as f64 / GIB)
    );
    let y_step = tick_step(y_max / GIB, 4.0);
    let t_step = tick_step(t_max, 8.0);
    for (i, samples) in trace.timeline.iter().enumerate() {
        let y0 = top + panel * i as f64;
        let h = panel - 40.0;
        let x = |t: f64| left + plot_w * t / t_max;
        let y = |b: f64| y0 + h - h * b / y_max;
        // Axes and grid.
        let _ = writeln!(
            s,
            r##"<rect x="{left}" y="{y0}" width="{plot_w}" height="{h}" fill="none" stroke="#999"/>"##
        );
        let mut g = 0.0;
        while g * GIB <= y_max {
            let gy = y(g * GIB);
            let _ = writeln!(
                s,
                r##"<line x1="{left}" y1="{gy:.1}" x2="{:.1}" y2="{gy:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                left + plot_w,
                left - 4.0,
                gy + 4.0,
                num(g)
            );
            g += y_step;
        }
        let mut tick = 0.0;
        while tick <= t_max * 1.0001 {
            let tx = x(tick);
            let _ = writeln!(
                s,
                r##"<line x1="{tx:.1}" y1="{:.1}" x2="{tx:.1}" y2="{:.1}" stroke="#999"/><text x="{tx:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                y0 + h,
                y0 + h + 4.0,
                y0 + h + 16.0,
                num(tick)
            );
            tick += t_step;
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">time (s)</text>"#,
            left + plot_w,
            y0 + h + 30.0
        );
        let _ = writeln!(
            s,
            r#"<text x="14" y="{:.1}" transform="rotate(-90 14 {:.1})" text-anchor="middle">stage {i} (GiB)</text>"#,
            y0 + h / 2.0,
            y0 + h / 2.0
        );
        // Stacked bands, each a step function over the samples.
        let tops: [fn(&crate::lower::MemSample) -> u64; 3] = [
            |m| m.bytes.saturating_sub(m.activations + m.temporary),
            |m| m.bytes.saturating_sub(m.temporary),
            |m| m.bytes,
        ];
        for (band, (name, colour)) in ROLES.iter().enumerate().rev() {
            let mut pts = format!("{:.1},{:.1} ", x(0.0), y(0.0));
            let mut prev: Option<f64> = None;
            for m in samples {
                let (px, py) = (x(m.t), y(tops[band](m) as f64));
                if let Some(p) = prev {
                    let _ = write!(pts, "{px:.1},{p:.1} ");
                }
                let _ = write!(pts, "{px:.1},{py:.1} ");
                prev = Some(py);
            }
            if let Some(last) = samples.last() {
                let _ = write!(pts, "{:.1},{:.1}", x(last.t), y(0.0));
            }
            let _ = writeln!(
                s,
                r#"<polygon points="{}" fill="{colour}" stroke="none"><title>{name}</title></polygon>"#,
                pts.trim_end()
            );
        }
        let by = y(memory.budget_bytes as f64);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{by:.1}" x2="{:.1}" y2="{by:.1}" stroke="#c00" stroke-dasharray="4 3"/>"##,
            left + plot_w
        );
        let peak = memory.per_stage.get(i).map_or(0, |m| m.peak_bytes);
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">peak {} GiB</text>"#,
            left + plot_w - 6.0,
            y0 + 14.0,
            num(peak as f64 / GIB)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round() {
        assert_eq!(tick_step(80.0, 4.0), 20.0);
        assert_eq!(tick_step(1.3, 8.0), 0.2);
        assert_eq!(tick_step(0.0, 4.0), 1.0);
        assert_eq!(num(0.5), "0.5");
        assert_eq!(num(12.0), "12");
    }
}
