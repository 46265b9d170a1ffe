//! Chrome/Perfetto trace and SVG memory-timeline output.

use super::MemoryJson;
use crate::lower::schedule::Pass;
use crate::lower::StepTrace;
use serde_json::{json, Value};
use std::fmt::Write;

fn us(seconds: f64) -> f64 {
    (seconds * 1e6 * 1000.0).round() / 1000.0
}

/// A Chrome trace (`chrome://tracing`, Perfetto): one process per pipeline stage with
/// a compute lane and a communication lane, and a memory counter.
pub fn chrome_trace(trace: &StepTrace, pp: u32) -> Value {
    let mut ev = Vec::new();
    for s in 0..pp.max(1) {
        ev.push(json!({"name": "process_name", "ph": "M", "pid": s, "args": {"name": format!("stage {s}")}}));
        ev.push(json!({"name": "thread_name", "ph": "M", "pid": s, "tid": 0, "args": {"name": "compute"}}));
        ev.push(json!({"name": "thread_name", "ph": "M", "pid": s, "tid": 1, "args": {"name": "communication"}}));
    }
    for x in &trace.events {
        let pass = match x.pass {
            Pass::F => "F",
            Pass::B => "B",
        };
        ev.push(json!({
            "name": format!("{pass}{}", x.micro_batch), "cat": pass, "ph": "X",
            "ts": us(x.start), "dur": us(x.end - x.start), "pid": x.stage, "tid": 0,
            "args": {"micro_batch": x.micro_batch, "chunk": x.chunk},
        }));
    }
    for c in &trace.comm {
        ev.push(json!({
            "name": c.what.name(), "cat": "comm", "ph": "X", "ts": us(c.start),
            "dur": us(c.end - c.start), "pid": c.stage, "tid": 1,
        }));
    }
    for (s, samples) in trace.timeline.iter().enumerate() {
        for m in samples {
            ev.push(json!({
                "name": "memory", "ph": "C", "ts": us(m.t), "pid": s,
                "args": {"bytes": m.bytes},
            }));
        }
    }
    json!({"traceEvents": ev, "displayTimeUnit": "ms"})
}

/// An SVG plot of each stage's memory over the step, with the budget line.
pub fn memory_svg(trace: &StepTrace, memory: &MemoryJson, step_time_s: f64) -> String {
    let stages = trace.timeline.len().max(1);
    let (w, panel, left, top) = (900.0, 140.0, 80.0, 30.0);
    let height = top + panel * stages as f64 + 30.0;
    let t_max = step_time_s.max(1e-12);
    let y_max = memory.peak_bytes.max(memory.budget_bytes).max(1) as f64 * 1.05;
    let plot_w = w - left - 20.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="18" font-size="13">memory per stage over one step ({:.3} s); dashed: budget {:.2} GiB</text>"#,
        step_time_s,
        memory.budget_bytes as f64 / (1u64 << 30) as f64
    );
    for (i, samples) in trace.timeline.iter().enumerate() {
        let y0 = top + panel * i as f64;
        let h = panel - 20.0;
        let x = |t: f64| left + plot_w * t / t_max;
        let y = |b: f64| y0 + h - h * b / y_max;
        let _ = writeln!(
            s,
            r##"<rect x="{left}" y="{y0}" width="{plot_w}" height="{h}" fill="none" stroke="#999"/>"##
        );
        let _ = writeln!(s, r#"<text x="4" y="{:.1}">stage {i}</text>"#, y0 + h / 2.0);
        let by = y(memory.budget_bytes as f64);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{by:.1}" x2="{:.1}" y2="{by:.1}" stroke="#c00" stroke-dasharray="4 3"/>"##,
            left + plot_w
        );
        let mut pts = String::new();
        let mut prev: Option<f64> = None;
        for m in samples {
            let (px, py) = (x(m.t), y(m.bytes as f64));
            if let Some(p) = prev {
                let _ = write!(pts, "{px:.1},{p:.1} ");
            }
            let _ = write!(pts, "{px:.1},{py:.1} ");
            prev = Some(py);
        }
        let _ = writeln!(
            s,
            r##"<polyline points="{}" fill="none" stroke="#1f77b4" stroke-width="1.2"/>"##,
            pts.trim_end()
        );
        let peak = memory.per_stage.get(i).map_or(0, |m| m.peak_bytes);
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}">peak {:.2} GiB</text>"#,
            left + plot_w - 110.0,
            y0 + 12.0,
            peak as f64 / (1u64 << 30) as f64
        );
    }
    s.push_str("</svg>\n");
    s
}
