//! Tensor types: element types, symbolic dimensions, shapes and tensor roles.
//!
//! A dimension is a monomial `coef · b^i · s^j / div` over the two symbols of a
//! training step: `b`, the micro-batch size, and `s`, the sequence length. Model
//! graphs are built once with symbolic `b` and `s` and evaluated under an [`Env`]
//! that binds them; `b*s` (flattened tokens) and `s/8` (a sequence shard) are
//! ordinary dimensions.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE binary16.
    F16,
    /// Signed 64-bit integer (token ids, labels).
    I64,
    /// Signed 32-bit integer.
    I32,
    /// Unsigned byte (dropout masks).
    U8,
    /// 8-bit float, 4 exponent and 3 mantissa bits, finite only (PyTorch
    /// `torch.float8_e4m3fn`; the OCP "FP8 Formats for Deep Learning" E4M3): the
    /// operands of forward FP8 GEMMs.
    F8E4M3,
    /// 8-bit float, 5 exponent and 2 mantissa bits (PyTorch `torch.float8_e5m2`): the
    /// output gradients of backward FP8 GEMMs in the "hybrid" recipe.
    F8E5M2,
}

impl DType {
    /// Every dtype, in table order.
    pub const ALL: [DType; 8] = [
        DType::F32,
        DType::Bf16,
        DType::F16,
        DType::I64,
        DType::I32,
        DType::U8,
        DType::F8E4M3,
        DType::F8E5M2,
    ];

    /// Size of one element in bytes.
    pub fn size_bytes(self) -> u64 {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::Bf16 | DType::F16 => 2,
            DType::I64 => 8,
            DType::U8 | DType::F8E4M3 | DType::F8E5M2 => 1,
        }
    }

    /// Whether this is a floating-point type.
    pub fn is_float(self) -> bool {
        matches!(
            self,
            DType::F32 | DType::Bf16 | DType::F16 | DType::F8E4M3 | DType::F8E5M2
        )
    }

    /// Whether this is an 8-bit float (an FP8 GEMM operand).
    pub fn is_fp8(self) -> bool {
        matches!(self, DType::F8E4M3 | DType::F8E5M2)
    }

    /// Whether this is an integer type.
    pub fn is_int(self) -> bool {
        !self.is_float()
    }

    /// The token the text format uses.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
            DType::F16 => "f16",
            DType::I64 => "i64",
            DType::I32 => "i32",
            DType::U8 => "u8",
            DType::F8E4M3 => "f8e4m3",
            DType::F8E5M2 => "f8e5m2",
        }
    }

    /// Parses a text-format token.
    pub fn from_name(s: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name() == s)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Values of the symbolic dimensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Env {
    /// Micro-batch size `b` (sequences per micro-batch).
    pub batch: u64,
    /// Sequence length `s` in tokens.
    pub seq: u64,
}

impl Env {
    /// Binds `b` and `s`.
    pub fn new(batch: u64, seq: u64) -> Env {
        Env { batch, seq }
    }
}

/// One dimension: `coef · b^batch · s^seq / div`, kept normalized
/// (`gcd(coef, div) = 1`, `div ≥ 1`, `coef ≥ 1` unless the dimension is the literal 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "DimRepr", into = "DimRepr")]
pub struct Dim {
    coef: u64,
    batch: u8,
    seq: u8,
    div: u64,
}

/// Serialized form of a [`Dim`]: a plain number or the text spelling (`"b*s/8"`).
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum DimRepr {
    Lit(u64),
    Text(String),
}

impl From<Dim> for DimRepr {
    fn from(d: Dim) -> DimRepr {
        match d.as_lit() {
            Some(n) => DimRepr::Lit(n),
            None => DimRepr::Text(d.to_string()),
        }
    }
}

impl TryFrom<DimRepr> for Dim {
    type Error = String;
    fn try_from(r: DimRepr) -> Result<Dim, String> {
        match r {
            DimRepr::Lit(n) => Ok(Dim::lit(n)),
            DimRepr::Text(t) => Dim::parse(&t).ok_or_else(|| format!("bad dimension `{t}`")),
        }
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl Dim {
    /// A literal size.
    pub const fn lit(n: u64) -> Dim {
        Dim {
            coef: n,
            batch: 0,
            seq: 0,
            div: 1,
        }
    }

    /// The symbolic micro-batch size `b`.
    pub const fn batch() -> Dim {
        Dim {
            coef: 1,
            batch: 1,
            seq: 0,
            div: 1,
        }
    }

    /// The symbolic sequence length `s`.
    pub const fn seq() -> Dim {
        Dim {
            coef: 1,
            batch: 0,
            seq: 1,
            div: 1,
        }
    }

    fn normalized(coef: u64, batch: u8, seq: u8, div: u64) -> Option<Dim> {
        if div == 0 {
            return None;
        }
        if coef == 0 {
            return Some(Dim::lit(0));
        }
        let g = gcd(coef, div);
        Some(Dim {
            coef: coef / g,
            batch,
            seq,
            div: div / g,
        })
    }

    /// The literal value, if the dimension has no symbols and no remainder.
    pub fn as_lit(self) -> Option<u64> {
        (self.batch == 0 && self.seq == 0 && self.div == 1).then_some(self.coef)
    }

    /// Whether the dimension mentions `b` or `s`.
    pub fn is_symbolic(self) -> bool {
        self.batch != 0 || self.seq != 0
    }

    /// Whether the dimension mentions the sequence length `s`.
    pub fn has_seq(self) -> bool {
        self.seq != 0
    }

    /// Whether the dimension is the literal zero.
    pub fn is_zero(self) -> bool {
        self.coef == 0
    }

    /// Product of two dimensions; `None` on overflow.
    pub fn checked_mul(self, o: Dim) -> Option<Dim> {
        Dim::normalized(
            self.coef.checked_mul(o.coef)?,
            self.batch.checked_add(o.batch)?,
            self.seq.checked_add(o.seq)?,
            self.div.checked_mul(o.div)?,
        )
    }

    /// This dimension divided by `parts`; `None` when `parts` is 0.
    pub fn checked_div(self, parts: u64) -> Option<Dim> {
        Dim::normalized(
            self.coef,
            self.batch,
            self.seq,
            self.div.checked_mul(parts)?,
        )
    }

    /// Whether `self / parts` is a whole dimension for every binding of the symbols
    /// (only literal factors are considered, so `s/8` is not divisible by 2 here).
    pub fn divisible_by(self, parts: u64) -> bool {
        parts != 0 && self.div == 1 && self.coef % parts == 0
    }

    /// Value under `env`; `None` on overflow or when the division leaves a remainder.
    pub fn eval(self, env: Env) -> Option<u64> {
        let mut v = self.coef;
        for _ in 0..self.batch {
            v = v.checked_mul(env.batch)?;
        }
        for _ in 0..self.seq {
            v = v.checked_mul(env.seq)?;
        }
        (v % self.div == 0).then_some(v / self.div)
    }

    /// Value under `env` rounded up to a whole number (`s/8` at `s = 1` is 1); `None` on
    /// overflow.
    pub fn eval_ceil(self, env: Env) -> Option<u64> {
        let mut v = self.coef;
        for _ in 0..self.batch {
            v = v.checked_mul(env.batch)?;
        }
        for _ in 0..self.seq {
            v = v.checked_mul(env.seq)?;
        }
        Some(v.div_ceil(self.div))
    }

    /// Parses the text spelling: factors `N`, `b`, `s` joined by `*`, optionally `/N`.
    pub fn parse(text: &str) -> Option<Dim> {
        let (num, den) = match text.split_once('/') {
            Some((n, d)) => (n, Some(d)),
            None => (text, None),
        };
        let mut dim = Dim::lit(1);
        for factor in num.split('*') {
            let f = match factor.trim() {
                "b" => Dim::batch(),
                "s" => Dim::seq(),
                t if !t.is_empty() && t.bytes().all(|c| c.is_ascii_digit()) => {
                    Dim::lit(t.parse().ok()?)
                }
                _ => return None,
            };
            dim = dim.checked_mul(f)?;
        }
        if let Some(d) = den {
            let d = d.trim();
            if d.is_empty() || !d.bytes().all(|c| c.is_ascii_digit()) {
                return None;
            }
            dim = dim.checked_div(d.parse().ok()?)?;
        }
        Some(dim)
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Vec::new();
        if self.coef != 1 || (self.batch == 0 && self.seq == 0) {
            parts.push(self.coef.to_string());
        }
        for _ in 0..self.batch {
            parts.push("b".into());
        }
        for _ in 0..self.seq {
            parts.push("s".into());
        }
        f.write_str(&parts.join("*"))?;
        if self.div != 1 {
            write!(f, "/{}", self.div)?;
        }
        Ok(())
    }
}

impl From<u64> for Dim {
    fn from(n: u64) -> Dim {
        Dim::lit(n)
    }
}

/// An ordered list of dimensions.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Shape(pub Vec<Dim>);

impl Shape {
    /// Builds a shape from dimensions.
    pub fn new(dims: impl IntoIterator<Item = Dim>) -> Shape {
        Shape(dims.into_iter().collect())
    }

    /// The scalar shape `[]`.
    pub fn scalar() -> Shape {
        Shape(Vec::new())
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.0.len()
    }

    /// The dimensions.
    pub fn dims(&self) -> &[Dim] {
        &self.0
    }

    /// Last dimension, if any.
    pub fn last(&self) -> Option<Dim> {
        self.0.last().copied()
    }

    /// Element count as a dimension; `None` on overflow.
    pub fn numel(&self) -> Option<Dim> {
        self.0
            .iter()
            .try_fold(Dim::lit(1), |acc, d| acc.checked_mul(*d))
    }

    /// Element count under `env`.
    pub fn numel_at(&self, env: Env) -> Option<u64> {
        self.0
            .iter()
            .try_fold(1u64, |acc, d| acc.checked_mul(d.eval(env)?))
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

/// A tensor type: element type and shape, spelled `bf16[b,s,4096]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorType {
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Shape,
}

impl TensorType {
    /// Builds a tensor type.
    pub fn new(dtype: DType, dims: impl IntoIterator<Item = Dim>) -> TensorType {
        TensorType {
            dtype,
            shape: Shape::new(dims),
        }
    }

    /// Same shape, other dtype.
    pub fn with_dtype(&self, dtype: DType) -> TensorType {
        TensorType {
            dtype,
            shape: self.shape.clone(),
        }
    }

    /// Size in bytes under `env`; `None` on overflow or a non-integral dimension.
    pub fn bytes_at(&self, env: Env) -> Option<u64> {
        self.shape
            .numel_at(env)?
            .checked_mul(self.dtype.size_bytes())
    }

    /// Size in bytes under `env` with every dimension rounded up to a whole number (a
    /// per-device `s/8` at `s = 1` counts as 1); `None` only on overflow.
    pub fn bytes_at_ceil(&self, env: Env) -> Option<u64> {
        self.shape
            .dims()
            .iter()
            .try_fold(self.dtype.size_bytes(), |acc, d| {
                acc.checked_mul(d.eval_ceil(env)?)
            })
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.dtype, self.shape)
    }
}

/// What a tensor is for; memory breakdowns are reported by role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A forward value (data inputs included); saved for backward when a backward op uses it.
    Activation,
    /// A master (full-precision) parameter.
    Param,
    /// The low-precision copy of a parameter used by forward and backward compute.
    LowPrecParam,
    /// A parameter gradient.
    Grad,
    /// An optimizer state (Adam moments).
    OptimizerState,
    /// A backward intermediate (activation gradients and scratch values).
    Temporary,
}

impl Role {
    /// Every role, in table order.
    pub const ALL: [Role; 6] = [
        Role::Activation,
        Role::Param,
        Role::LowPrecParam,
        Role::Grad,
        Role::OptimizerState,
        Role::Temporary,
    ];

    /// The token the text format uses (after `@`).
    pub fn name(self) -> &'static str {
        match self {
            Role::Activation => "act",
            Role::Param => "param",
            Role::LowPrecParam => "lowp",
            Role::Grad => "grad",
            Role::OptimizerState => "opt",
            Role::Temporary => "tmp",
        }
    }

    /// Parses a text-format token.
    pub fn from_name(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == s)
    }

    /// Whether tensors of this role live for the whole training step.
    pub fn is_persistent(self) -> bool {
        matches!(
            self,
            Role::Param | Role::LowPrecParam | Role::Grad | Role::OptimizerState
        )
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dims_print_and_parse() {
        for text in ["4096", "b", "s", "b*s", "s/8", "b*s/8", "3*s", "0"] {
            let d = Dim::parse(text).unwrap();
            assert_eq!(d.to_string(), text);
        }
        assert_eq!(Dim::parse("8*s/4").unwrap().to_string(), "2*s");
        assert!(Dim::parse("x").is_none());
        assert!(Dim::parse("s/0").is_none());
        assert!(Dim::parse("").is_none());
    }

    #[test]
    fn dims_evaluate() {
        let env = Env::new(2, 1024);
        assert_eq!(Dim::parse("b*s").unwrap().eval(env), Some(2048));
        assert_eq!(Dim::parse("s/8").unwrap().eval(env), Some(128));
        assert_eq!(Dim::parse("s/3").unwrap().eval(env), None);
        let t = TensorType::new(DType::Bf16, [Dim::batch(), Dim::seq(), Dim::lit(4096)]);
        assert_eq!(t.bytes_at(env), Some(2 * 1024 * 4096 * 2));
        assert_eq!(t.to_string(), "bf16[b,s,4096]");
    }
}
