//! Per-device pipeline schedules: the order in which a device runs forward and
//! backward passes of its model chunks over the micro-batches.

use crate::passes::Schedule;
use serde::{Deserialize, Serialize};

/// Forward or backward pass of one micro-batch through one model chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
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
    let order = DeviceOrder::new(schedule, stage, pp, m);
    (0..order.len()).map(|p| order.step(p)).collect()
}

/// [`device_order`] without materializing it: the `p`-th step in closed form.
#[derive(Clone, Copy, Debug)]
pub struct DeviceOrder {
    schedule: Schedule,
    pp: u32,
    /// Micro-steps per pass: `m · v`.
    total: u32,
    /// Warm-up forwards.
    warm: u32,
    v: u32,
}

impl DeviceOrder {
    /// The order of device `stage` of `pp` with `m` micro-batches.
    pub fn new(schedule: Schedule, stage: u32, pp: u32, m: u32) -> DeviceOrder {
        let v = schedule.chunks();
        let total = m * v;
        let warm = match schedule {
            Schedule::Gpipe => total,
            Schedule::OneFOneB => (pp - stage - 1).min(m),
            Schedule::Interleaved(_) => ((pp - stage - 1) * 2 + (v - 1) * pp).min(total),
        };
        DeviceOrder {
            schedule,
            pp,
            total,
            warm,
            v,
        }
    }

    /// Number of steps (`2 · m · v`).
    pub fn len(&self) -> usize {
        2 * self.total as usize
    }

    /// Whether there is no step.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Micro-step `k` of a pass → (chunk, micro-batch). Micro-batches advance through
    /// the chunks in groups of `pp`; backward visits the chunks in reverse.
    fn at(&self, k: u32, backward: bool) -> (u32, u32) {
        match self.schedule {
            Schedule::Interleaved(_) => {
                let (pp, v) = (self.pp, self.v);
                let group = k / pp;
                let chunk = group % v;
                let chunk = if backward { v - 1 - chunk } else { chunk };
                (chunk, (group / v) * pp + k % pp)
            }
            _ => (0, k),
        }
    }

    /// The `p`-th step: `warm` forwards, then alternating forward/backward, then the
    /// remaining backwards.
    pub fn step(&self, p: usize) -> Step {
        let (w, total) = (self.warm as usize, self.total as usize);
        let (pass, k) = if p < w {
            (Pass::F, p)
        } else if p < w + 2 * (total - w) {
            let q = p - w;
            if q % 2 == 0 {
                (Pass::F, w + q / 2)
            } else {
                (Pass::B, q / 2)
            }
        } else {
            (Pass::B, total - w + (p - w - 2 * (total - w)))
        };
        let (chunk, micro_batch) = self.at(k as u32, pass == Pass::B);
        Step {
            pass,
            chunk,
            micro_batch,
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
