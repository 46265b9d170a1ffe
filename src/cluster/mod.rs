//! Clusters: device specs, nodes, links, presets and JSON cluster files.
//!
//! A cluster is `nodes` identical nodes of `devices_per_node` identical devices.
//! Inside a node devices talk over one scale-up fabric (NVLink/NVSwitch, xGMI);
//! across nodes over NICs (InfiniBand/RoCE). Every number below names its source.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;
use thiserror::Error;

/// One accelerator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSpec {
    /// Marketing name.
    pub name: String,
    /// Peak dense bf16/fp16 tensor throughput, FLOP/s.
    pub peak_bf16_flops: f64,
    /// Peak dense fp32 (non-tensor) throughput, FLOP/s.
    pub peak_fp32_flops: f64,
    /// Peak dense FP8 (E4M3/E5M2) tensor throughput, FLOP/s; `None` for a device
    /// without FP8 tensor cores, which cannot train with `--precision fp8`.
    /// (Always serialized, like `Cluster::usable_memory_bytes`; JSON files may omit it.)
    #[serde(default)]
    pub peak_fp8_flops: Option<f64>,
    /// Device memory, bytes.
    pub memory_bytes: u64,
    /// Device memory bandwidth, bytes/s.
    pub memory_bandwidth: f64,
    /// Who makes it, which decides which vendor libraries an engine can use on it
    /// (Transformer Engine's userbuffers for Megatron-LM's `--tp-comm-overlap` are
    /// NVIDIA's). `None` (a JSON file that does not say): apar assumes neither.
    #[serde(default)]
    pub vendor: Option<Vendor>,
}

/// An accelerator vendor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Vendor {
    /// NVIDIA (CUDA).
    Nvidia,
    /// AMD (ROCm).
    Amd,
}

/// A link class: per-device unidirectional bandwidth and per-message latency.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    /// Name (`nvlink4`, `ib-ndr`).
    pub name: String,
    /// Unidirectional bandwidth available to one device, bytes/s.
    pub bandwidth: f64,
    /// Latency of one message (the alpha of the alpha-beta model), seconds.
    pub latency_s: f64,
}

/// A homogeneous cluster.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// Name, for reports.
    pub name: String,
    /// The accelerator.
    pub device: DeviceSpec,
    /// Devices per node.
    pub devices_per_node: u32,
    /// Nodes.
    pub nodes: u32,
    /// Scale-up link inside a node.
    pub intra_node: Link,
    /// Scale-out link between nodes (per device).
    pub inter_node: Link,
    /// Bytes a job may use per device, when the platform reserves part of the memory
    /// (`None`: all of `device.memory_bytes`).
    /// (Always serialized, so that non-self-describing encodings such as the binary
    /// codec can read it back; JSON files may omit it.)
    #[serde(default)]
    pub usable_memory_bytes: Option<u64>,
}

impl Cluster {
    /// Total devices.
    pub fn devices(&self) -> u64 {
        u64::from(self.devices_per_node) * u64::from(self.nodes)
    }

    /// Memory a job may use on one device.
    pub fn device_memory(&self) -> u64 {
        self.usable_memory_bytes.unwrap_or(self.device.memory_bytes)
    }

    /// Checks that every number is usable: counts, throughputs, bandwidths,
    /// latencies and memory inside the accepted ranges ([`FLOPS_RANGE`],
    /// [`BANDWIDTH_RANGE`], [`LATENCY_RANGE_S`], [`MAX_MEMORY_BYTES`],
    /// [`MAX_DEVICES_PER_NODE`], [`MAX_NODES`]); NaN and infinities are never inside.
    ///
    /// # Errors
    ///
    /// [`ClusterError::Invalid`] naming the first field out of range.
    pub fn validate(&self) -> Result<(), ClusterError> {
        let bad = |field: &str, why: &str| {
            Err(ClusterError::Invalid {
                cluster: self.name.clone(),
                field: field.to_string(),
                why: why.to_string(),
            })
        };
        let range = |f: &str, v: f64, (lo, hi): (f64, f64), unit: &str| {
            // `!(..)` so that NaN fails too.
            if !(v >= lo && v <= hi) {
                return bad(
                    f,
                    &format!("{v} is outside the accepted range [{lo:e}, {hi:e}] {unit}"),
                );
            }
            Ok(())
        };
        if !(1..=MAX_DEVICES_PER_NODE).contains(&self.devices_per_node) {
            return bad(
                "devices_per_node",
                &format!(
                    "{} is outside the accepted range [1, {MAX_DEVICES_PER_NODE}]",
                    self.devices_per_node
                ),
            );
        }
        if !(1..=MAX_NODES).contains(&self.nodes) {
            return bad(
                "nodes",
                &format!(
                    "{} is outside the accepted range [1, {MAX_NODES}]",
                    self.nodes
                ),
            );
        }
        for (f, v) in [
            ("device.peak_bf16_flops", self.device.peak_bf16_flops),
            ("device.peak_fp32_flops", self.device.peak_fp32_flops),
        ] {
            range(f, v, FLOPS_RANGE, "FLOP/s")?;
        }
        if let Some(v) = self.device.peak_fp8_flops {
            range("device.peak_fp8_flops", v, FLOPS_RANGE, "FLOP/s")?;
            // Every FP8 tensor core runs at least at its bf16 rate (twice it on H100,
            // H200 and MI300X): a smaller figure is a typo or another unit.
            if v < self.device.peak_bf16_flops {
                return bad(
                    "device.peak_fp8_flops",
                    "is below device.peak_bf16_flops (FP8 tensor cores run at least at the bf16 rate)",
                );
            }
        }
        // fp32 runs on vector units or TF32-less paths at a fraction of the bf16 tensor
        // rate on every accelerator listed (A100 19.5 of 312, H100 67 of 989 TFLOP/s).
        if self.device.peak_fp32_flops > self.device.peak_bf16_flops {
            return bad(
                "device.peak_fp32_flops",
                "is above device.peak_bf16_flops (fp32 runs at a fraction of the bf16 tensor-core rate)",
            );
        }
        for (f, v) in [
            ("device.memory_bandwidth", self.device.memory_bandwidth),
            ("intra_node.bandwidth", self.intra_node.bandwidth),
            ("inter_node.bandwidth", self.inter_node.bandwidth),
        ] {
            range(f, v, BANDWIDTH_RANGE, "bytes/s")?;
        }
        for (f, v) in [
            ("intra_node.latency_s", self.intra_node.latency_s),
            ("inter_node.latency_s", self.inter_node.latency_s),
        ] {
            range(f, v, LATENCY_RANGE_S, "s")?;
        }
        if !(1..=MAX_MEMORY_BYTES).contains(&self.device.memory_bytes) {
            return bad(
                "device.memory_bytes",
                &format!(
                    "{} is outside the accepted range [1, {MAX_MEMORY_BYTES}] bytes",
                    self.device.memory_bytes
                ),
            );
        }
        if let Some(u) = self.usable_memory_bytes {
            if u == 0 || u > self.device.memory_bytes {
                return bad("usable_memory_bytes", "must be in (0, device.memory_bytes]");
            }
        }
        Ok(())
    }

    /// Reads and validates a JSON cluster file. Unknown fields are errors (a misspelt
    /// field would otherwise silently keep its default).
    ///
    /// # Errors
    ///
    /// [`ClusterError::File`] when the file cannot be read or is not a cluster (bad
    /// JSON, missing or unknown field), [`ClusterError::Invalid`] when a value is out
    /// of range (see [`Cluster::validate`]).
    pub fn from_json_file(path: &Path) -> Result<Cluster, ClusterError> {
        let file = path.display().to_string();
        let text = crate::input::read_text(path).map_err(|e| ClusterError::File {
            file: file.clone(),
            why: e.to_string(),
        })?;
        let c: Cluster = serde_json::from_str(&text).map_err(|e| ClusterError::File {
            file,
            why: e.to_string(),
        })?;
        c.validate()?;
        Ok(c)
    }

    /// Resolves `--cluster`: a preset `name:NODES`, a flavor (`moai-4xlarge`), or a
    /// JSON file.
    pub fn resolve(spec: &str) -> Result<Cluster, ClusterError> {
        if let Some(c) = preset(spec)? {
            return Ok(c);
        }
        let path = Path::new(spec);
        if path.exists() {
            return Cluster::from_json_file(path);
        }
        if spec.contains('/') || spec.contains(std::path::MAIN_SEPARATOR) || spec.ends_with(".json")
        {
            return Err(ClusterError::File {
                file: spec.to_string(),
                why: "no such file".into(),
            });
        }
        Err(ClusterError::Unknown(spec.to_string()))
    }
}

impl fmt::Display for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} node(s) × {} {} ({:.0} GiB usable each)",
            self.name,
            self.nodes,
            self.devices_per_node,
            self.device.name,
            self.device_memory() as f64 / (1u64 << 30) as f64
        )
    }
}

/// A problem with a cluster argument or file.
#[derive(Debug, Error)]
pub enum ClusterError {
    /// Neither a preset nor a file.
    #[error(
        "unknown cluster `{0}` (see `apar clusters`; presets take a node count, e.g. `dgx-h100:4`)"
    )]
    Unknown(String),
    /// A preset with a bad node count.
    #[error("cluster `{spec}`: {why}")]
    BadSpec {
        /// The argument.
        spec: String,
        /// What is wrong.
        why: String,
    },
    /// The file could not be read or parsed.
    #[error("{file}: {why}")]
    File {
        /// The file.
        file: String,
        /// What went wrong.
        why: String,
    },
    /// A field has an unusable value.
    #[error("cluster `{cluster}`: `{field}` {why}")]
    Invalid {
        /// Cluster name.
        cluster: String,
        /// The field.
        field: String,
        /// What is wrong.
        why: String,
    },
}

const GB: f64 = 1e9;
const GIB: u64 = 1 << 30;

/// Accepted peak throughput of a device, FLOP/s: 1 GFLOP/s (below any CPU core's
/// vector unit) to 1 EFLOP/s (about 750× the fastest device listed here, MI300X's
/// 1.3 PFLOP/s dense bf16). Outside it, step times are meaningless or overflow.
pub const FLOPS_RANGE: (f64, f64) = (1e9, 1e18);

/// Accepted bandwidth of device memory and of links, bytes/s: 1 MB/s (slower than any
/// network card made this century) to 1 PB/s (about 200× H200's 4.8 TB/s HBM3e).
pub const BANDWIDTH_RANGE: (f64, f64) = (1e6, 1e15);

/// Accepted per-message link latency, seconds: 0 to 1 s (NCCL steps take microseconds;
/// a second per message is no interconnect).
pub const LATENCY_RANGE_S: (f64, f64) = (0.0, 1.0);

/// Largest accepted device memory, bytes: 1 PiB (about 5,000× MI300X's 192 GB).
pub const MAX_MEMORY_BYTES: u64 = 1 << 50;

/// Largest accepted devices per node: 1,024 (above NVIDIA's largest announced NVLink
/// domain, 576 GPUs); keeps the candidate enumeration's divisor loops short.
pub const MAX_DEVICES_PER_NODE: u32 = 1 << 10;

/// Largest accepted node count: 65,536 (several times today's largest training
/// clusters), the same bound the search's cluster-size suggestions go up to.
pub const MAX_NODES: u32 = 1 << 16;

/// Device specs.
pub mod devices {
    use super::{DeviceSpec, GB, GIB};

    /// NVIDIA A100 SXM4 40 GB: 312 TFLOP/s dense bf16, 19.5 TFLOP/s fp32, 1,555 GB/s
    /// HBM2 (NVIDIA A100 Tensor Core GPU datasheet, 2021); 40 GiB as the driver reports.
    /// No FP8 tensor cores (the datasheet lists TF32, bf16/fp16, INT8 and INT4 only).
    pub fn a100_40g() -> DeviceSpec {
        DeviceSpec {
            name: "A100-SXM4-40GB".into(),
            peak_bf16_flops: 312e12,
            peak_fp32_flops: 19.5e12,
            peak_fp8_flops: None,
            memory_bytes: 40 * GIB,
            memory_bandwidth: 1555.0 * GB,
            vendor: Some(super::Vendor::Nvidia),
        }
    }

    /// NVIDIA A100 SXM4 80 GB: 312 TFLOP/s dense bf16, 2,039 GB/s HBM2e (same datasheet);
    /// no FP8 tensor cores.
    pub fn a100_80g() -> DeviceSpec {
        DeviceSpec {
            name: "A100-SXM4-80GB".into(),
            peak_bf16_flops: 312e12,
            peak_fp32_flops: 19.5e12,
            peak_fp8_flops: None,
            memory_bytes: 80 * GIB,
            memory_bandwidth: 2039.0 * GB,
            vendor: Some(super::Vendor::Nvidia),
        }
    }

    /// NVIDIA A800 SXM4 80 GB: the A100 80 GB's compute and memory (312 TFLOP/s dense
    /// bf16, 2,039 GB/s HBM2e) with NVLink cut to 400 GB/s (NVIDIA A800 product brief).
    pub fn a800_80g() -> DeviceSpec {
        DeviceSpec {
            name: "A800-SXM4-80GB".into(),
            ..a100_80g()
        }
    }

    /// NVIDIA H800 SXM5 80 GB: the H100 SXM5's compute, FP8 and memory with NVLink cut
    /// to 400 GB/s (NVIDIA H800 product brief; DeepSeek-V3 technical report, Liu et al.
    /// 2024, Sec. 3.1–3.2: H800 nodes of 8 GPUs on NVLink/NVSwitch, InfiniBand across).
    pub fn h800() -> DeviceSpec {
        DeviceSpec {
            name: "H800-SXM5-80GB".into(),
            ..h100()
        }
    }

    /// NVIDIA H100 SXM5 80 GB: 989 TFLOP/s dense bf16, 67 TFLOP/s fp32, 3.35 TB/s HBM3
    /// (NVIDIA H100 Tensor Core GPU datasheet, 2023); 1,979 TFLOP/s dense FP8 (the
    /// datasheet's 3,958 "with sparsity", halved).
    pub fn h100() -> DeviceSpec {
        DeviceSpec {
            name: "H100-SXM5-80GB".into(),
            peak_bf16_flops: 989e12,
            peak_fp32_flops: 67e12,
            peak_fp8_flops: Some(1979e12),
            memory_bytes: 80 * GIB,
            memory_bandwidth: 3350.0 * GB,
            vendor: Some(super::Vendor::Nvidia),
        }
    }

    /// NVIDIA H200 SXM 141 GB: 989 TFLOP/s dense bf16, 67 TFLOP/s fp32, 4.8 TB/s HBM3e
    /// (NVIDIA H200 Tensor Core GPU datasheet, 2024); 141 GB = 141·10⁹ bytes; 1,979
    /// TFLOP/s dense FP8 (the datasheet's 3,958 "with sparsity", halved).
    pub fn h200() -> DeviceSpec {
        DeviceSpec {
            name: "H200-SXM-141GB".into(),
            peak_bf16_flops: 989e12,
            peak_fp32_flops: 67e12,
            peak_fp8_flops: Some(1979e12),
            memory_bytes: 141_000_000_000,
            memory_bandwidth: 4800.0 * GB,
            vendor: Some(super::Vendor::Nvidia),
        }
    }

    /// One GCD of an AMD Instinct MI250 (not MI250X): half of the package's 362.1
    /// TFLOP/s dense bf16 and 45.3 TFLOP/s fp32 vector, 64 GiB HBM2e at half of the
    /// package's 3.2768 TB/s (ROCm documentation, "GPU hardware specifications",
    /// MI250 row: 208 CUs, 128 GB; the 383 / 47.9 TFLOP/s figures are MI250X's). CDNA2 has no FP8
    /// matrix cores (the data sheet lists fp64, fp32, fp16, bf16, INT8 and INT4).
    pub fn mi250_gcd() -> DeviceSpec {
        DeviceSpec {
            name: "MI250-GCD".into(),
            peak_bf16_flops: 181.05e12,
            peak_fp32_flops: 22.65e12,
            peak_fp8_flops: None,
            memory_bytes: 64 * GIB,
            memory_bandwidth: 1638.4 * GB,
            vendor: Some(super::Vendor::Amd),
        }
    }

    /// One GCD of an AMD Instinct MI250X: half of the package's 383 TFLOP/s dense
    /// bf16 and 47.9 TFLOP/s fp32 vector, 64 GiB HBM2e at half of the package's
    /// 3.2768 TB/s (ROCm documentation, "GPU hardware specifications", MI250X row: 220
    /// CUs, 128 GB). The GCD of Frontier and LUMI-G; no FP8, as the MI250.
    pub fn mi250x_gcd() -> DeviceSpec {
        DeviceSpec {
            name: "MI250X-GCD".into(),
            peak_bf16_flops: 191.5e12,
            peak_fp32_flops: 23.95e12,
            peak_fp8_flops: None,
            memory_bytes: 64 * GIB,
            memory_bandwidth: 1638.4 * GB,
            vendor: Some(super::Vendor::Amd),
        }
    }

    /// AMD Instinct MI300X: 1,307.4 TFLOP/s dense bf16, 163.4 TFLOP/s fp32, 192 GB HBM3
    /// at 5.3 TB/s (AMD Instinct MI300X data sheet, 2023); 2,614.9 TFLOP/s dense FP8
    /// (same data sheet; 5,229.8 with sparsity).
    pub fn mi300x() -> DeviceSpec {
        DeviceSpec {
            name: "MI300X".into(),
            peak_bf16_flops: 1307.4e12,
            peak_fp32_flops: 163.4e12,
            peak_fp8_flops: Some(2614.9e12),
            memory_bytes: 192_000_000_000,
            memory_bandwidth: 5300.0 * GB,
            vendor: Some(super::Vendor::Amd),
        }
    }
}

/// Link classes.
pub mod links {
    use super::{Link, GB};

    /// NVLink 3 through NVSwitch (DGX A100): 600 GB/s bidirectional per GPU, 300 GB/s
    /// each way (NVIDIA DGX A100 datasheet). Latency: NCCL's order of magnitude for an
    /// intra-node step, a few microseconds.
    pub fn nvlink3() -> Link {
        Link {
            name: "nvlink3".into(),
            bandwidth: 300.0 * GB,
            latency_s: 5e-6,
        }
    }

    /// NVLink 3 of the A800 (HGX A800): 400 GB/s bidirectional per GPU, 200 GB/s each
    /// way (NVIDIA A800 SXM4 product brief); latency as [`nvlink3`].
    pub fn nvlink3_a800() -> Link {
        Link {
            name: "nvlink3-a800".into(),
            bandwidth: 200.0 * GB,
            latency_s: 5e-6,
        }
    }

    /// NVLink 4 through NVSwitch (DGX H100/H200): 900 GB/s bidirectional per GPU, 450
    /// GB/s each way (NVIDIA DGX H100 datasheet).
    pub fn nvlink4() -> Link {
        Link {
            name: "nvlink4".into(),
            bandwidth: 450.0 * GB,
            latency_s: 5e-6,
        }
    }

    /// NVLink 4 on H800 (HGX H800): 400 GB/s bidirectional per GPU, 200 GB/s each way
    /// (NVIDIA H800 product brief); DeepSeek-V3's report measures 160 GB/s of it
    /// (Liu et al. 2024, Sec. 3.2.2: "NVLink offers a bandwidth of 160 GB/s, roughly
    /// 3.2 times that of IB (50 GB/s)"), 0.8 of nominal, the `link` efficiency.
    pub fn nvlink4_h800() -> Link {
        Link {
            name: "nvlink4-h800".into(),
            bandwidth: 200.0 * GB,
            latency_s: 5e-6,
        }
    }

    /// One 200 Gb/s HDR InfiniBand NIC per GPU (DGX A100: 8 × ConnectX-6 for compute),
    /// 25 GB/s each way.
    pub fn ib_hdr() -> Link {
        Link {
            name: "ib-hdr".into(),
            bandwidth: 25.0 * GB,
            latency_s: 10e-6,
        }
    }

    /// One 400 Gb/s NDR InfiniBand NIC per GPU (DGX H100: 8 × ConnectX-7), 50 GB/s each way.
    pub fn ib_ndr() -> Link {
        Link {
            name: "ib-ndr".into(),
            bandwidth: 50.0 * GB,
            latency_s: 10e-6,
        }
    }

    /// AMD Infinity Fabric (xGMI) between MI250 (and MI250X) GCDs of one node: 50 GB/s each way per
    /// link (AMD CDNA 2 white paper); a ring over the node's GCDs gets about two links'
    /// worth, 100 GB/s.
    pub fn xgmi_mi250() -> Link {
        Link {
            name: "xgmi-mi250".into(),
            bandwidth: 100.0 * GB,
            latency_s: 5e-6,
        }
    }

    /// AMD Infinity Fabric on MI300X platforms: 7 links of 64 GB/s each way per GPU,
    /// 448 GB/s (AMD Instinct MI300X platform data sheet).
    pub fn xgmi_mi300x() -> Link {
        Link {
            name: "xgmi-mi300x".into(),
            bandwidth: 448.0 * GB,
            latency_s: 5e-6,
        }
    }

    /// 200 Gb/s RoCE/InfiniBand shared by two GCDs (one NIC per MI250 package),
    /// 12.5 GB/s each way per GCD; also Frontier's and LUMI-G's four 200 Gb/s
    /// Slingshot-11 NICs per node of four MI250X (OLCF and LUMI user guides).
    pub fn nic_200g_per_2() -> Link {
        Link {
            name: "nic-200g/2".into(),
            bandwidth: 12.5 * GB,
            latency_s: 10e-6,
        }
    }
}

/// The usable memory per device of the reference platform's MI250 flavors, from its
/// out-of-memory report ("Memory available: 68702699520 bytes").
pub const MOAI_USABLE_BYTES: u64 = 68_702_699_520;

struct Preset {
    name: &'static str,
    about: &'static str,
    /// Fixed node count for flavors; `None` for `name:N` presets.
    nodes: Option<u32>,
    make: fn(u32) -> Cluster,
}

fn node(
    name: String,
    device: DeviceSpec,
    per_node: u32,
    nodes: u32,
    intra: Link,
    inter: Link,
) -> Cluster {
    Cluster {
        name,
        device,
        devices_per_node: per_node,
        nodes,
        intra_node: intra,
        inter_node: inter,
        usable_memory_bytes: None,
    }
}

fn moai(nodes: u32, flavor: &str) -> Cluster {
    let mut c = node(
        flavor.to_string(),
        devices::mi250_gcd(),
        8,
        nodes,
        links::xgmi_mi250(),
        links::nic_200g_per_2(),
    );
    c.usable_memory_bytes = Some(MOAI_USABLE_BYTES);
    c
}

const PRESETS: &[Preset] = &[
    Preset {
        name: "dgx-a100-40g",
        about: "DGX A100 40 GB: 8 × A100-40GB, NVLink3/NVSwitch, 8 × HDR IB",
        nodes: None,
        make: |n| {
            node(
                format!("dgx-a100-40g:{n}"),
                devices::a100_40g(),
                8,
                n,
                links::nvlink3(),
                links::ib_hdr(),
            )
        },
    },
    Preset {
        name: "dgx-a100-80g",
        about: "DGX A100 80 GB: 8 × A100-80GB, NVLink3/NVSwitch, 8 × HDR IB",
        nodes: None,
        make: |n| {
            node(
                format!("dgx-a100-80g:{n}"),
                devices::a100_80g(),
                8,
                n,
                links::nvlink3(),
                links::ib_hdr(),
            )
        },
    },
    Preset {
        name: "hgx-a800",
        about: "HGX A800 80 GB: 8 × A800-80GB, NVLink 400 GB/s, 8 × HDR IB",
        nodes: None,
        make: |n| {
            node(
                format!("hgx-a800:{n}"),
                devices::a800_80g(),
                8,
                n,
                links::nvlink3_a800(),
                links::ib_hdr(),
            )
        },
    },
    Preset {
        name: "hgx-h800",
        about: "HGX H800: 8 × H800-SXM5, NVLink 400 GB/s, 8 × NDR IB (DeepSeek-V3's cluster)",
        nodes: None,
        make: |n| {
            node(
                format!("hgx-h800:{n}"),
                devices::h800(),
                8,
                n,
                links::nvlink4_h800(),
                links::ib_ndr(),
            )
        },
    },
    Preset {
        name: "dgx-h100",
        about: "DGX H100: 8 × H100-SXM5, NVLink4/NVSwitch, 8 × NDR IB",
        nodes: None,
        make: |n| {
            node(
                format!("dgx-h100:{n}"),
                devices::h100(),
                8,
                n,
                links::nvlink4(),
                links::ib_ndr(),
            )
        },
    },
    Preset {
        name: "dgx-h200",
        about: "DGX H200: 8 × H200-SXM, NVLink4/NVSwitch, 8 × NDR IB",
        nodes: None,
        make: |n| {
            node(
                format!("dgx-h200:{n}"),
                devices::h200(),
                8,
                n,
                links::nvlink4(),
                links::ib_ndr(),
            )
        },
    },
    Preset {
        name: "mi250-gcd",
        about: "4 × MI250 (8 GCDs) per node, xGMI, one 200 Gb/s NIC per package",
        nodes: None,
        make: |n| {
            node(
                format!("mi250-gcd:{n}"),
                devices::mi250_gcd(),
                8,
                n,
                links::xgmi_mi250(),
                links::nic_200g_per_2(),
            )
        },
    },
    Preset {
        name: "mi250x-gcd",
        about: "4 × MI250X (8 GCDs) per node, xGMI, one 200 Gb/s NIC per package (HPE Cray EX235a: Frontier, LUMI-G)",
        nodes: None,
        make: |n| {
            node(
                format!("mi250x-gcd:{n}"),
                devices::mi250x_gcd(),
                8,
                n,
                links::xgmi_mi250(),
                links::nic_200g_per_2(),
            )
        },
    },
    Preset {
        name: "mi300x",
        about: "8 × MI300X per node, Infinity Fabric, 8 × 400 Gb/s NICs",
        nodes: None,
        make: |n| {
            node(
                format!("mi300x:{n}"),
                devices::mi300x(),
                8,
                n,
                links::xgmi_mi300x(),
                links::ib_ndr(),
            )
        },
    },
    Preset {
        name: "moai-xlarge",
        about: "reference platform flavor: 1 node × 8 MI250 GCDs, 68,702,699,520 B usable",
        nodes: Some(1),
        make: |n| moai(n, "moai-xlarge"),
    },
    Preset {
        name: "moai-2xlarge",
        about: "reference platform flavor: 2 nodes × 8 MI250 GCDs",
        nodes: Some(2),
        make: |n| moai(n, "moai-2xlarge"),
    },
    Preset {
        name: "moai-4xlarge",
        about: "reference platform flavor: 4 nodes × 8 MI250 GCDs",
        nodes: Some(4),
        make: |n| moai(n, "moai-4xlarge"),
    },
    Preset {
        name: "moai-8xlarge",
        about: "reference platform flavor: 8 nodes × 8 MI250 GCDs",
        nodes: Some(8),
        make: |n| moai(n, "moai-8xlarge"),
    },
];

/// Preset names with a description (`apar clusters`).
pub fn presets() -> impl Iterator<Item = (String, &'static str)> {
    PRESETS.iter().map(|p| {
        let name = match p.nodes {
            Some(_) => p.name.to_string(),
            None => format!("{}:N", p.name),
        };
        (name, p.about)
    })
}

/// Builds a preset from `name:N` or a flavor name; `Ok(None)` if `spec` names no preset.
pub fn preset(spec: &str) -> Result<Option<Cluster>, ClusterError> {
    let (name, count) = match spec.split_once(':') {
        Some((n, c)) => (n, Some(c)),
        None => (spec, None),
    };
    let Some(p) = PRESETS.iter().find(|p| p.name == name) else {
        return Ok(None);
    };
    let bad = |why: String| ClusterError::BadSpec {
        spec: spec.to_string(),
        why,
    };
    let nodes = match (p.nodes, count) {
        (Some(n), None) => n,
        (Some(_), Some(_)) => return Err(bad("a flavor has a fixed node count".into())),
        (None, None) => return Err(bad(format!("give a node count, e.g. `{name}:4`"))),
        (None, Some(c)) => match c.parse::<u32>() {
            Ok(n) if n > 0 && n <= 1 << 20 => n,
            _ => return Err(bad(format!("`{c}` is not a node count"))),
        },
    };
    let c = (p.make)(nodes);
    c.validate()?;
    Ok(Some(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_resolve_and_validate() {
        let c = Cluster::resolve("dgx-h100:2048").unwrap();
        assert_eq!(c.devices(), 16384);
        let m = Cluster::resolve("moai-4xlarge").unwrap();
        assert_eq!(m.devices(), 32);
        assert_eq!(m.device_memory(), 68_702_699_520);
        for bad in [
            "dgx-h100",
            "dgx-h100:0",
            "dgx-h100:x",
            "moai-4xlarge:2",
            "nope:3",
        ] {
            assert!(Cluster::resolve(bad).is_err(), "{bad}");
        }
    }
}
