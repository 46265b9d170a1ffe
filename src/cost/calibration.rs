//! Calibration files: the named cost parameters of one device type, as JSON.
//!
//! A [`Calibration`] holds what the cost model needs beyond a device's datasheet
//! numbers: the fraction of peak that large matmuls reach and how GEMM shape lowers it
//! ([`GemmModel`]), the fraction of peak that fused attention reaches forward and
//! backward, the fraction of HBM bandwidth memory-bound kernels reach, and the fraction
//! of link bandwidth collectives reach. The built-in tables (`calibration/*.json`,
//! compiled in with `include_str!`) are such files; `--calibration FILE` and
//! `apar calibrate` read and write the same format.
//!
//! # Schema (version 1)
//!
//! ```json
//! { "version": 1,
//!   "devices": ["A100-SXM4-80GB"],      // device names the table is for
//!   "matmul": 0.86,                     // large-GEMM fraction of peak tensor FLOP/s
//!   "gemm": { "compute_units": 108,     // SMs / CUs
//!             "tiles": [[256, 128], [128, 128]],  // output tiles the library picks from
//!             "k_half": 64 },           // contraction depth at half efficiency
//!   "attention": 0.6,                   // fused attention forward, fraction of peak
//!   "attention_bwd": 0.5,               // fused attention backward, fraction of peak
//!   "memory": 0.8,                      // memory-bound kernels, fraction of HBM bandwidth
//!   "link": 0.85,                       // collectives and sends, fraction of link bandwidth
//!   "sources": { "matmul": "…" } }      // free text per parameter (optional)
//! ```
//!
//! Unknown fields are errors; every efficiency must lie in `(0, 1]`.

use crate::cluster::DeviceSpec;
use crate::ir::Gemm;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::OnceLock;
use thiserror::Error;

/// The calibration file format this build reads and writes.
pub const CALIBRATION_VERSION: u32 = 1;

/// The named cost parameters of one device type (see the module doc for the JSON).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    /// File format version ([`CALIBRATION_VERSION`]).
    pub version: u32,
    /// Names of the devices ([`DeviceSpec::name`]) the table is for.
    pub devices: Vec<String>,
    /// Fraction of peak tensor FLOP/s a large, well-shaped GEMM reaches.
    pub matmul: f64,
    /// How a GEMM's shape lowers `matmul` ([`GemmModel`]).
    pub gemm: GemmModel,
    /// Fraction of peak tensor FLOP/s fused attention reaches in the forward pass.
    pub attention: f64,
    /// Fraction of peak tensor FLOP/s fused attention reaches in the backward pass.
    pub attention_bwd: f64,
    /// Fraction of HBM bandwidth memory-bound kernels (elementwise, norms, softmax,
    /// copies, optimizer) reach.
    pub memory: f64,
    /// Fraction of link bandwidth collectives and point-to-point sends reach.
    pub link: f64,
    /// Fraction of compute throughput lost while a data-parallel collective runs
    /// beside it: NCCL/RCCL run each channel as one thread block on its own
    /// streaming multiprocessor (compute unit), which the overlapped kernels cannot
    /// use, so compute slows by about the channels' share of the device
    /// ([`crate::lower::overlap`] applies it). 0 when a file leaves it out.
    #[serde(default)]
    pub overlap_slowdown: f64,
    /// Where each value comes from, by parameter name (free text).
    #[serde(default)]
    pub sources: BTreeMap<String, String>,
}

/// The GEMM shape model: tile and wave quantization (NVIDIA, "Matrix Multiplication
/// Background User's Guide", sections "Tile Quantization" and "Wave Quantization") and
/// a fixed per-tile prologue/epilogue against the contraction depth.
///
/// A GEMM of `batch` products `m×k · k×n` is cut into output tiles `tm×tn`; the
/// device runs `compute_units` tiles at a time. The fraction of the tile work that is
/// useful is
///
/// ```text
/// tile  = m·n / (⌈m/tm⌉·tm · ⌈n/tn⌉·tn)             padding of the edge tiles
/// wave  = T / (⌈T/units⌉·units),  T = ⌈m/tm⌉·⌈n/tn⌉·batch   idle units in the last wave
/// depth = k / (k + k_half)                            main loop vs prologue/epilogue
/// efficiency = matmul · max over tiles (tile · wave) · depth
/// ```
///
/// The maximum over `tiles` stands for the library's heuristic picking the tile that
/// wastes least (cuBLAS and hipBLASLt choose among several). The model saturates: a
/// large GEMM gets `matmul · k/(k + k_half)`, close to `matmul`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GemmModel {
    /// Streaming multiprocessors (NVIDIA) or compute units (AMD) of the device.
    pub compute_units: u32,
    /// Output tile shapes `[tm, tn]` the library chooses among.
    pub tiles: Vec<[u32; 2]>,
    /// Contraction depth at which the per-tile fixed cost halves the efficiency.
    pub k_half: f64,
}

impl GemmModel {
    /// The fraction of `matmul` a GEMM of shape `g` reaches, in `(0, 1]`.
    pub fn utilization(&self, g: Gemm) -> f64 {
        if g.m == 0 || g.n == 0 || g.k == 0 || g.batch == 0 {
            return 1.0;
        }
        let units = f64::from(self.compute_units.max(1));
        let (m, n, batch) = (g.m as f64, g.n as f64, g.batch as f64);
        let best = self
            .tiles
            .iter()
            .map(|&[tm, tn]| {
                let (tm, tn) = (f64::from(tm.max(1)), f64::from(tn.max(1)));
                let (rows, cols) = ((m / tm).ceil(), (n / tn).ceil());
                let tile = m * n / (rows * tm * cols * tn);
                let tiles = rows * cols * batch;
                let wave = tiles / ((tiles / units).ceil() * units);
                tile * wave
            })
            .fold(0.0, f64::max);
        let best = if best > 0.0 { best } else { 1.0 };
        let k = g.k as f64;
        best * k / (k + self.k_half.max(0.0))
    }
}

/// The parameters `apar calibrate` can fit (`--fit matmul,memory,...`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Param {
    /// [`Calibration::matmul`].
    Matmul,
    /// [`Calibration::attention`] and [`Calibration::attention_bwd`], scaled together.
    Attention,
    /// [`Calibration::memory`].
    Memory,
    /// [`Calibration::link`].
    Link,
    /// [`Calibration::overlap_slowdown`].
    Overlap,
}

impl Param {
    /// Every parameter, in the order fits report them.
    pub const ALL: [Param; 5] = [
        Param::Matmul,
        Param::Attention,
        Param::Memory,
        Param::Link,
        Param::Overlap,
    ];

    /// The name on the command line and in files.
    pub fn name(self) -> &'static str {
        match self {
            Param::Matmul => "matmul",
            Param::Attention => "attention",
            Param::Memory => "memory",
            Param::Link => "link",
            Param::Overlap => "overlap_slowdown",
        }
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Option<Param> {
        Param::ALL.into_iter().find(|p| p.name() == s.trim())
    }

    /// The parameter's value in `c`.
    pub fn get(self, c: &Calibration) -> f64 {
        match self {
            Param::Matmul => c.matmul,
            Param::Attention => c.attention,
            Param::Memory => c.memory,
            Param::Link => c.link,
            Param::Overlap => c.overlap_slowdown,
        }
    }

    /// The values the parameter may take in `c`, inclusive: the efficiencies
    /// `[MIN_EFFICIENCY, 1]` (attention's ends moved so that the backward value, which
    /// keeps its ratio to the forward one, stays in that range too), the overlap
    /// slowdown `[0, MAX_OVERLAP_SLOWDOWN]` — the ranges [`Calibration::validate`]
    /// accepts.
    pub fn bounds(self, c: &Calibration) -> (f64, f64) {
        match self {
            Param::Overlap => (0.0, MAX_OVERLAP_SLOWDOWN),
            // The backward value keeps its ratio to the forward one: both ends move so
            // that it stays in [MIN_EFFICIENCY, 1] too.
            Param::Attention if c.attention > 0.0 && c.attention_bwd > 0.0 => {
                let ratio = c.attention / c.attention_bwd;
                (MIN_EFFICIENCY * ratio.max(1.0), ratio.min(1.0))
            }
            _ => (MIN_EFFICIENCY, 1.0),
        }
    }

    /// Sets the parameter in `c` (attention: the backward value keeps its ratio to the
    /// forward one).
    pub fn set(self, c: &mut Calibration, v: f64) {
        match self {
            Param::Matmul => c.matmul = v,
            Param::Attention => {
                let ratio = c.attention_bwd / c.attention;
                c.attention = v;
                c.attention_bwd = v * ratio;
            }
            Param::Memory => c.memory = v,
            Param::Link => c.link = v,
            Param::Overlap => c.overlap_slowdown = v,
        }
    }
}

impl fmt::Display for Param {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A problem with a calibration file.
#[derive(Debug, Error)]
pub enum CalibrationError {
    /// The file could not be read or parsed.
    #[error("{file}: {why}")]
    File {
        /// The file.
        file: String,
        /// What went wrong.
        why: String,
    },
    /// A value is unusable.
    #[error("calibration: `{field}` {why}")]
    Invalid {
        /// The field.
        field: String,
        /// What is wrong.
        why: String,
    },
}

/// The smallest accepted efficiency: 1% of a peak.
pub const MIN_EFFICIENCY: f64 = 0.01;

/// The most SMs/CUs a [`GemmModel`] may name: ten times today's largest devices
/// (MI300X: 304 CUs; H100 SXM: 132 SMs), so that a typo cannot price a GEMM at a
/// nonsense wave count.
pub const MAX_COMPUTE_UNITS: u32 = 4096;

/// The longest side of a GEMM output tile a [`GemmModel`] may name: four times the
/// largest tiles cuBLAS, CUTLASS and Tensile use (256).
pub const MAX_TILE_SIDE: u32 = 1024;

/// The largest [`GemmModel`] `k_half`: a per-tile prologue and epilogue as long as
/// 4096 steps of the contraction would halve the efficiency of a GEMM with `k` = 4096,
/// far beyond any measured kernel.
pub const MAX_K_HALF: f64 = 4096.0;

/// The largest [`Calibration::overlap_slowdown`]: compute beside a collective keeps at
/// least a tenth of its speed (at 1 the overlapped compute would never finish).
pub const MAX_OVERLAP_SLOWDOWN: f64 = 0.9;

/// Lee et al. measured GPT and Llama layers on A100, H100, MI250 and MI210 with their
/// collectives overlapped ("Characterizing Compute-Communication Overlap in
/// GPU-Accelerated Distributed Deep Learning: Performance and Power Implications",
/// 2025, arXiv 2507.03114, abstract): the compute took 18.9% longer than alone, on
/// average ...
pub const LEE_COMPUTE_SLOWDOWN: f64 = 0.189;

/// ... and running the compute and the communication one after the other took 10.2%
/// longer than overlapped (same source).
pub const LEE_SERIAL_OVER_OVERLAPPED: f64 = 1.102;

/// [`Calibration::overlap_slowdown`] (`s`: the share of compute speed lost while a
/// collective runs beside it) from a compute slowdown `sigma` and a ratio `r` of serial
/// to overlapped time, both as Lee et al. define them: compute `C` alone, collective
/// `M` alone, overlapped time `(1 + sigma)·C` (the collective hidden), serial
/// `C + M = r·(1 + sigma)·C`, and apar's overlapped time `C + s·M`
/// (`crate::lower::overlap`), so `s = sigma / (r·(1 + sigma) − 1)`. With Lee et al.'s
/// averages ([`LEE_COMPUTE_SLOWDOWN`], [`LEE_SERIAL_OVER_OVERLAPPED`]), combined as if
/// they were one run's (an approximation): 0.61.
pub fn overlap_slowdown_from(sigma: f64, r: f64) -> f64 {
    sigma / (r * (1.0 + sigma) - 1.0)
}

/// Agrawal et al. (AMD) ran GEMMs beside RCCL collectives on MI300X and realized on
/// average 21% of the ideal speedup of overlapping them ("Optimizing ML Concurrent
/// Computation and Communication with GPU DMA Engines", 2024, arXiv 2412.14335,
/// abstract): of the collective's time `M` that perfect overlap would save, `0.21·M`
/// is saved, so apar's `C + s·M` has `s = 1 − 0.21` = 0.79. The largest slowdown
/// measured; `apar calibrate` warns about a fit above it.
pub const AGRAWAL_REALIZED_SPEEDUP_FRACTION: f64 = 0.21;

/// The largest compute slowdown beside a collective measured (Agrawal et al. 2024 on
/// MI300X, see [`AGRAWAL_REALIZED_SPEEDUP_FRACTION`]): a fit that needs more is
/// absorbing something else, and `apar calibrate` says so.
pub const MEASURED_MAX_OVERLAP_SLOWDOWN: f64 = 1.0 - AGRAWAL_REALIZED_SPEEDUP_FRACTION;

impl Calibration {
    /// Checks the version and that every value is usable.
    ///
    /// # Errors
    ///
    /// [`CalibrationError::Invalid`] naming the first bad field.
    pub fn validate(&self) -> Result<(), CalibrationError> {
        let bad = |field: &str, why: String| {
            Err(CalibrationError::Invalid {
                field: field.into(),
                why,
            })
        };
        if self.version != CALIBRATION_VERSION {
            return bad(
                "version",
                format!(
                    "is {}; this build reads version {CALIBRATION_VERSION}",
                    self.version
                ),
            );
        }
        if self.devices.iter().any(|d| d.trim().is_empty()) {
            return bad(
                "devices",
                "names an empty device; list device names (`H100-SXM5-80GB`) or none for any device".into(),
            );
        }
        for (f, v) in [
            ("matmul", self.matmul),
            ("attention", self.attention),
            ("attention_bwd", self.attention_bwd),
            ("memory", self.memory),
            ("link", self.link),
        ] {
            // Below 1% of a peak no kernel runs on a working device; tinier values
            // only turn step times into nonsense or overflow.
            if !((MIN_EFFICIENCY..=1.0).contains(&v)) {
                return bad(f, format!("{v} is not a fraction in [{MIN_EFFICIENCY}, 1]"));
            }
        }
        if !(0.0..=MAX_OVERLAP_SLOWDOWN).contains(&self.overlap_slowdown) {
            return bad(
                "overlap_slowdown",
                format!(
                    "{} is outside [0, {MAX_OVERLAP_SLOWDOWN}]",
                    self.overlap_slowdown
                ),
            );
        }
        if !(1..=MAX_COMPUTE_UNITS).contains(&self.gemm.compute_units) {
            return bad(
                "gemm.compute_units",
                format!(
                    "{} is outside [1, {MAX_COMPUTE_UNITS}]",
                    self.gemm.compute_units
                ),
            );
        }
        if self.gemm.tiles.is_empty()
            || self
                .gemm
                .tiles
                .iter()
                .any(|t| t.iter().any(|&d| !(1..=MAX_TILE_SIDE).contains(&d)))
        {
            return bad(
                "gemm.tiles",
                format!("must list at least one tile, each side in [1, {MAX_TILE_SIDE}]"),
            );
        }
        if !(self.gemm.k_half >= 0.0 && self.gemm.k_half <= MAX_K_HALF) {
            return bad(
                "gemm.k_half",
                format!("{} is outside [0, {MAX_K_HALF}]", self.gemm.k_half),
            );
        }
        Ok(())
    }

    /// Parses and validates a calibration from JSON text; `file` names it in errors.
    ///
    /// # Errors
    ///
    /// [`CalibrationError::File`] for bad JSON or an unknown or missing field, and as
    /// [`Calibration::validate`].
    pub fn from_json(text: &str, file: &str) -> Result<Calibration, CalibrationError> {
        let c: Calibration = serde_json::from_str(text).map_err(|e| CalibrationError::File {
            file: file.into(),
            why: e.to_string(),
        })?;
        c.validate()?;
        Ok(c)
    }

    /// Reads a calibration file.
    ///
    /// # Errors
    ///
    /// As [`Calibration::from_json`], and [`CalibrationError::File`] when the file
    /// cannot be read.
    pub fn from_json_file(path: &Path) -> Result<Calibration, CalibrationError> {
        let file = path.display().to_string();
        let text = crate::input::read_text(path).map_err(|e| CalibrationError::File {
            file: file.clone(),
            why: e.to_string(),
        })?;
        Calibration::from_json(&text, &file)
    }

    /// The JSON text of this calibration (pretty-printed, with a final newline).
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("a calibration serializes");
        s.push('\n');
        s
    }

    /// Matmul efficiency of a GEMM of shape `g`: `matmul` lowered by the shape model.
    pub fn matmul_efficiency(&self, g: Gemm) -> f64 {
        self.matmul * self.gemm.utilization(g)
    }

    /// The built-in table for `device`, matched by name; `None` when no built-in table
    /// lists it.
    pub fn for_device(device: &DeviceSpec) -> Option<Calibration> {
        builtin()
            .iter()
            .find(|(_, c)| c.devices.contains(&device.name))
            .map(|(_, c)| c.clone())
    }

    /// The table used for a device no built-in table lists: the A100 table's values
    /// (its `matmul` fitted to Megatron-LM's published A100 runs), with its device list
    /// emptied. A plan
    /// made with it says so ([`crate::api::Warning::DefaultCostTable`]).
    pub fn default_table() -> Calibration {
        let mut c = builtin_named("a100").expect("the A100 table is built in");
        c.devices.clear();
        c
    }
}

/// The built-in tables, by short name, as compiled in from `calibration/*.json`.
pub const BUILTIN_FILES: [(&str, &str); 6] = [
    ("a100", include_str!("../../calibration/a100.json")),
    ("h100", include_str!("../../calibration/h100.json")),
    ("h200", include_str!("../../calibration/h200.json")),
    (
        "mi250-gcd",
        include_str!("../../calibration/mi250-gcd.json"),
    ),
    (
        "mi250x-gcd",
        include_str!("../../calibration/mi250x-gcd.json"),
    ),
    ("mi300x", include_str!("../../calibration/mi300x.json")),
];

/// The built-in tables, parsed once.
///
/// # Panics
///
/// When a compiled-in file does not parse (a build bug that a test catches).
pub fn builtin() -> &'static [(&'static str, Calibration)] {
    static TABLES: OnceLock<Vec<(&'static str, Calibration)>> = OnceLock::new();
    TABLES.get_or_init(|| {
        BUILTIN_FILES
            .iter()
            .map(|(name, text)| {
                let c = Calibration::from_json(text, name)
                    .unwrap_or_else(|e| panic!("built-in calibration {name}: {e}"));
                (*name, c)
            })
            .collect()
    })
}

/// The built-in table with short name `name` (`a100`, `h100`, `h200`, `mi250-gcd`,
/// `mi250x-gcd`, `mi300x`).
pub fn builtin_named(name: &str) -> Option<Calibration> {
    builtin()
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, c)| c.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Cluster;

    #[test]
    fn builtin_tables_parse_and_cover_the_presets() {
        for (name, c) in builtin() {
            c.validate().unwrap();
            assert!(!c.devices.is_empty(), "{name}");
            for p in [
                "matmul",
                "attention",
                "attention_bwd",
                "memory",
                "link",
                "gemm",
            ] {
                assert!(c.sources.contains_key(p), "{name} has no source for {p}");
            }
        }
        for preset in [
            "dgx-a100-40g:1",
            "dgx-a100-80g:1",
            "hgx-a800:1",
            "dgx-h100:1",
            "dgx-h200:1",
            "mi250-gcd:1",
            "mi250x-gcd:1",
            "mi300x:1",
        ] {
            let c = Cluster::resolve(preset).unwrap();
            assert!(Calibration::for_device(&c.device).is_some(), "{preset}");
        }
    }

    #[test]
    fn gemm_model_saturates_and_penalizes_small_and_skinny_shapes() {
        let c = builtin_named("a100").unwrap();
        let g = |m, n, k| Gemm { batch: 1, m, n, k };
        let big = c.matmul_efficiency(g(8192, 8192, 8192));
        assert!(big > 0.98 * c.matmul && big <= c.matmul);
        assert!(c.matmul_efficiency(g(128, 128, 8192)) < 0.05 * c.matmul);
        assert!(c.matmul_efficiency(g(8192, 8192, 64)) < 0.6 * c.matmul);
        assert!(c.matmul_efficiency(g(8192, 8192, 4096)) > c.matmul_efficiency(g(8192, 64, 4096)));
    }

    #[test]
    fn files_round_trip_and_refuse_unknown_fields() {
        let c = builtin_named("h100").unwrap();
        assert_eq!(Calibration::from_json(&c.to_json(), "x").unwrap(), c);
        let text = c.to_json().replacen("\"matmul\"", "\"matmull\"", 1);
        assert!(Calibration::from_json(&text, "x").is_err());
        let mut bad = c.clone();
        bad.memory = 1.5;
        assert!(bad.validate().is_err());
        bad = c;
        bad.version = 2;
        assert!(bad.validate().is_err());
    }
}
