//! Per-device pipeline schedules: the order in which a device runs forward and
//! backward passes of its model chunks over the micro-batches.

use crate::passes::Schedule;
use serde::Serialize;

/// Forward or backward pass of one micro-batch through one model chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Pass {
    /// Forward.
    F,
    /// Backward.
    B,
}

/// One scheduled unit of work on a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Step {
    /// Forward or backward.
    pub pass: Pass,
    /// Model chunk on this device (0 unless interleaved).
    pub chunk: u32,
    /// Micro-batch.
    pub micro_batch: u32,
}

/// The order of work on pipeline device `stage` of `pp`, with `m` micro-batches.
///
/// * GPipe: all forwards, then all backwards.
/// * 1F1B: `pp - stage - 1` warm-up forwards, then one forward / one backward, then
///   the remaining backwards (Narayanan et al. 2021, Fig. 4 top).
/// * Interleaved with `v` chunks: micro-batches advance in groups of `pp` through the
///   chunks; warm-up is `2(pp - stage - 1) + (v - 1)·pp` forwards (Fig. 4 bottom).
pub fn device_order(schedule: Schedule, stage: u32, pp: u32, m: u32) -> Vec<Step> {
    let f = |chunk, micro_batch| Step {
        pass: Pass::F,
        chunk,
        micro_batch,
    };
    let b = |chunk, micro_batch| Step {
        pass: Pass::B,
        chunk,
        micro_batch,
    };
    match schedule {
        Schedule::Gpipe => (0..m)
            .map(|i| f(0, i))
            .chain((0..m).map(|i| b(0, i)))
            .collect(),
        Schedule::OneFOneB => {
            let warm = (pp - stage - 1).min(m);
            let mut out: Vec<Step> = (0..warm).map(|i| f(0, i)).collect();
            for i in 0..m - warm {
                out.push(f(0, warm + i));
                out.push(b(0, i));
            }
            out.extend((m - warm..m).map(|i| b(0, i)));
            out
        }
        Schedule::Interleaved(v) => {
            let v = v.max(1);
            let total = m * v;
            // Micro-step k → (chunk, micro-batch); micro-batches advance in groups of pp.
            let at = |k: u32, backward: bool| {
                let group = k / pp;
                let chunk = group % v;
                let chunk = if backward { v - 1 - chunk } else { chunk };
                let mb = (group / v) * pp + k % pp;
                (chunk, mb)
            };
            let warm = ((pp - stage - 1) * 2 + (v - 1) * pp).min(total);
            let mut out = Vec::with_capacity(2 * total as usize);
            for k in 0..warm {
                let (c, i) = at(k, false);
                out.push(f(c, i));
            }
            for k in 0..total - warm {
                let (c, i) = at(warm + k, false);
                out.push(f(c, i));
                let (c, i) = at(k, true);
                out.push(b(c, i));
            }
            for k in total - warm..total {
                let (c, i) = at(k, true);
                out.push(b(c, i));
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_schedule_runs_each_pass_once() {
        for schedule in [
            Schedule::Gpipe,
            Schedule::OneFOneB,
            Schedule::Interleaved(2),
        ] {
            let (pp, m) = (4, 8);
            for s in 0..pp {
                let order = device_order(schedule, s, pp, m);
                let v = schedule.chunks();
                assert_eq!(order.len() as u32, 2 * m * v);
                for c in 0..v {
                    for i in 0..m {
                        for pass in [Pass::F, Pass::B] {
                            let n = order
                                .iter()
                                .filter(|x| x.pass == pass && x.chunk == c && x.micro_batch == i)
                                .count();
                            assert_eq!(n, 1, "{schedule} stage {s} chunk {c} mb {i}");
                        }
                        let fpos = order.iter().position(|x| {
                            *x == Step {
                                pass: Pass::F,
                                chunk: c,
                                micro_batch: i,
                            }
                        });
                        let bpos = order.iter().position(|x| {
                            *x == Step {
                                pass: Pass::B,
                                chunk: c,
                                micro_batch: i,
                            }
                        });
                        assert!(fpos < bpos);
                    }
                }
            }
        }
    }

    #[test]
    fn one_f_one_b_warm_up_is_pp_minus_stage_minus_one() {
        let order = device_order(Schedule::OneFOneB, 0, 4, 8);
        let first_b = order.iter().position(|x| x.pass == Pass::B).unwrap();
        assert_eq!(first_b, 4); // 3 warm-up forwards, then F3, then B0
    }
}
