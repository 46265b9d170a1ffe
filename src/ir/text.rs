//! The text format (`.apir`): a printer and a parser that form a pair.
//!
//! # Law
//!
//! For every graph `g` whose ops only read tensors defined by earlier ops (every
//! [`GraphBuilder`](super::GraphBuilder) graph, every graph the verifier accepts):
//! `parse(&print(&g)) == Ok(g)`. Tensors are numbered in definition order on both
//! sides: the printer writes `%n` for tensor `n`, and the parser treats `%n` as a
//! label and renumbers tensors in the order it meets their definitions, so a file
//! may use any labels.
//!
//! # Format
//!
//! ```text
//! # comment to end of line
//! graph "tiny-mlp" {
//!   embed fwd {
//!     %0 = input {name="tokens"} : i64[b,s]
//!     %1 = param {name="embed.tokens.weight"} : bf16[256,64] @param
//!     %2 = embedding(%1, %0) : bf16[b,s,64]
//!   }
//!   layer.0 fwd {
//!     %3, %4 = dropout(%2) {p=1e-1} : bf16[b,s,64], u8[b,s,64]
//!     send(%3) {peer=1}
//!   }
//! }
//! ```
//!
//! * A file holds one `graph "<name>" { ... }`; only blanks and comments may follow it.
//! * Ops sit in sections `<block> <phase> { ... }` (`embed`, `layer.N`, `head`;
//!   `fwd`, `bwd`, `opt`). The printer opens a new section whenever the block or phase
//!   changes; sections may repeat.
//! * One op per line: results `%a, %b =` (absent for ops without results), the op
//!   name, inputs `(%x, %y)` (absent when there are none), attributes `{k=v, ...}` in
//!   op-table order (absent when the op has none), then `:` and one type per result,
//!   each optionally followed by `@role` (the printer omits `@act`).
//! * Types are `dtype[dim, ...]`; dims are products of integers, `b` and `s`,
//!   optionally divided by an integer (`4096`, `b*s`, `s/8`).
//! * Attribute values: `true`/`false`, integers, floats (`1e-1`, `10000.0`, `-2.5e0`),
//!   Rust-escaped strings, dtypes, and lists `[0,2,1]` (all plain integers) or shapes
//!   `[b,s,4,16]`.
//!
//! The parser checks syntax, names, attributes and that every value is defined before
//! it is used; it does not check types. Run [`verify`](super::verify()) on the result.
//! It never panics, whatever the input. `ir-spec/README.md` gives the grammar in EBNF.

use super::graph::{Block, Graph, OpId, Phase, TensorId};
use super::op::{AttrError, AttrValue, Op, OpKind};
use super::types::{DType, Dim, Role, Shape, TensorType};
use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use thiserror::Error;

// ---------------------------------------------------------------------------------
// Printer
// ---------------------------------------------------------------------------------

/// Prints a graph in the text format (see the module docs).
pub fn print(g: &Graph) -> String {
    let mut out = String::new();
    // Writing to a `String` cannot fail.
    let _ = write_graph(&mut out, g);
    out
}

fn write_graph(out: &mut String, g: &Graph) -> fmt::Result {
    writeln!(out, "graph {:?} {{", g.name())?;
    let mut section: Option<(Block, Phase)> = None;
    for id in g.ops() {
        let node = g.node(id);
        let tag = (node.block, node.phase);
        if section != Some(tag) {
            if section.is_some() {
                out.push_str("  }\n");
            }
            writeln!(out, "  {} {} {{", node.block, node.phase)?;
            section = Some(tag);
        }
        out.push_str("    ");
        write_op(out, g, id)?;
        out.push('\n');
    }
    if section.is_some() {
        out.push_str("  }\n");
    }
    out.push_str("}\n");
    Ok(())
}

fn write_op(out: &mut String, g: &Graph, id: OpId) -> fmt::Result {
    let node = g.node(id);
    for (i, r) in node.results.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        write!(out, "{r}")?;
    }
    if !node.results.is_empty() {
        out.push_str(" = ");
    }
    out.push_str(node.op.name());
    if !node.inputs.is_empty() {
        out.push('(');
        for (i, t) in node.inputs.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            write!(out, "{t}")?;
        }
        out.push(')');
    }
    let attrs = node.op.attrs();
    if !attrs.is_empty() {
        out.push_str(" {");
        for (i, (k, v)) in attrs.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            write!(out, "{k}={v}")?;
        }
        out.push('}');
    }
    for (i, &r) in node.results.iter().enumerate() {
        out.push_str(if i == 0 { " : " } else { ", " });
        match g.get_tensor(r) {
            Some(t) => {
                write!(out, "{}", t.ty)?;
                if t.role != Role::Activation {
                    write!(out, " @{}", t.role)?;
                }
            }
            // Only a corrupt graph gets here; print something the parser rejects.
            None => out.push('?'),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------

/// A position in the source: 1-based line and column (columns count characters).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pos {
    /// Line, from 1.
    pub line: u32,
    /// Column in characters, from 1.
    pub col: u32,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

/// A syntax or name error, with the position it was found at.
#[derive(Clone, Debug, PartialEq, Error)]
#[error("{line}:{col}: {kind}")]
pub struct ParseError {
    /// Line, from 1.
    pub line: u32,
    /// Column in characters, from 1.
    pub col: u32,
    /// What is wrong.
    pub kind: ParseErrorKind,
}

impl ParseError {
    fn at(pos: Pos, kind: ParseErrorKind) -> ParseError {
        ParseError {
            line: pos.line,
            col: pos.col,
            kind,
        }
    }

    /// The error's position.
    pub fn pos(&self) -> Pos {
        Pos {
            line: self.line,
            col: self.col,
        }
    }
}

/// What a [`ParseError`] found wrong.
#[derive(Clone, Debug, PartialEq, Error)]
pub enum ParseErrorKind {
    /// A character that starts no token.
    #[error("unexpected character {0:?}")]
    UnexpectedChar(char),
    /// A string without its closing quote on the same line.
    #[error("unterminated string")]
    UnterminatedString,
    /// An escape sequence Rust strings do not have.
    #[error("bad escape `{0}` in string")]
    BadEscape(String),
    /// An integer that does not fit in 64 bits.
    #[error("integer `{0}` is too large")]
    IntTooLarge(String),
    /// A token other than the grammar allows here.
    #[error("expected {expected}, found {found}")]
    Expected {
        /// What the grammar allows.
        expected: &'static str,
        /// What was found.
        found: String,
    },
    /// A block name other than `embed`, `layer.N` and `head`.
    #[error("unknown block `{0}` (expected embed, layer.N or head)")]
    UnknownBlock(String),
    /// A phase name other than `fwd`, `bwd` and `opt`.
    #[error("unknown phase `{0}` (expected fwd, bwd or opt)")]
    UnknownPhase(String),
    /// Unknown op, or an unknown, missing or ill-typed attribute.
    #[error(transparent)]
    Attr(#[from] AttrError),
    /// The same attribute given twice.
    #[error("duplicate attribute `{0}`")]
    DuplicateAttr(String),
    /// A word that is no attribute value.
    #[error("bad attribute value `{0}`")]
    BadAttrValue(String),
    /// A use of a value that no earlier op defines.
    #[error("undefined value %{0}")]
    Undefined(u64),
    /// A second definition of a value.
    #[error("value %{label} is already defined on line {line}")]
    Redefined {
        /// The value's label.
        label: u64,
        /// Line of the first definition.
        line: u32,
    },
    /// A dtype name not in the dtype table.
    #[error("unknown dtype `{0}`")]
    UnknownDType(String),
    /// A dimension that is not a product of integers, `b` and `s` over an integer.
    #[error("bad dimension `{0}`")]
    BadDim(String),
    /// A role name not in the role table.
    #[error("unknown role `@{0}`")]
    UnknownRole(String),
    /// Result names and result types disagree in number.
    #[error("{results} result(s) named but {types} type(s) given")]
    ResultTypes {
        /// Names on the left of `=`.
        results: usize,
        /// Types after `:`.
        types: usize,
    },
    /// Something after the graph's closing brace.
    #[error("unexpected {0} after the graph")]
    Trailing(String),
}

// ---------------------------------------------------------------------------------
// Lexer
// ---------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
enum Tok<'a> {
    /// `[A-Za-z_][A-Za-z0-9_.]*`
    Ident(&'a str),
    /// `%N`
    Value(u64),
    /// `@name`
    Role(&'a str),
    /// A number, as written.
    Num(&'a str),
    /// A string, unescaped.
    Str(String),
    /// One of `(){}[],=:*/`.
    Punct(char),
    Newline,
    Eof,
}

impl fmt::Display for Tok<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tok::Ident(s) => write!(f, "`{s}`"),
            Tok::Value(n) => write!(f, "`%{n}`"),
            Tok::Role(s) => write!(f, "`@{s}`"),
            Tok::Num(s) => write!(f, "`{s}`"),
            Tok::Str(s) => write!(f, "string {s:?}"),
            Tok::Punct(c) => write!(f, "`{c}`"),
            Tok::Newline => f.write_str("end of line"),
            Tok::Eof => f.write_str("end of input"),
        }
    }
}

struct Lexer<'a> {
    src: &'a str,
    /// Byte offset of the next character.
    off: usize,
    /// Byte offset where the most recently lexed token starts.
    last_start: usize,
    line: u32,
    col: u32,
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '.'
}

impl<'a> Lexer<'a> {
    fn new(src: &'a str) -> Lexer<'a> {
        Lexer {
            src,
            off: 0,
            last_start: 0,
            line: 1,
            col: 1,
        }
    }

    fn pos(&self) -> Pos {
        Pos {
            line: self.line,
            col: self.col,
        }
    }

    fn peek_char(&self) -> Option<char> {
        self.src.get(self.off..)?.chars().next()
    }

    fn peek_char2(&self) -> Option<char> {
        let mut it = self.src.get(self.off..)?.chars();
        it.next();
        it.next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek_char()?;
        self.off += c.len_utf8();
        if c == '\n' {
            self.line = self.line.saturating_add(1);
            self.col = 1;
        } else {
            self.col = self.col.saturating_add(1);
        }
        Some(c)
    }

    fn eat_while(&mut self, f: impl Fn(char) -> bool) -> &'a str {
        let start = self.off;
        while self.peek_char().is_some_and(&f) {
            self.bump();
        }
        self.src.get(start..self.off).unwrap_or("")
    }

    fn next(&mut self) -> Result<(Tok<'a>, Pos), ParseError> {
        loop {
            match self.peek_char() {
                Some(' ' | '\t' | '\r') => {
                    self.bump();
                }
                Some('#') => {
                    self.eat_while(|c| c != '\n');
                }
                _ => break,
            }
        }
        let pos = self.pos();
        self.last_start = self.off;
        let Some(c) = self.peek_char() else {
            return Ok((Tok::Eof, pos));
        };
        let tok = match c {
            '\n' => {
                self.bump();
                Tok::Newline
            }
            '(' | ')' | '{' | '}' | '[' | ']' | ',' | '=' | ':' | '*' | '/' => {
                self.bump();
                Tok::Punct(c)
            }
            '%' => {
                self.bump();
                let digits = self.eat_while(|c| c.is_ascii_digit());
                if digits.is_empty() {
                    return Err(ParseError::at(
                        pos,
                        ParseErrorKind::Expected {
                            expected: "a value number after `%`",
                            found: self.describe_next(),
                        },
                    ));
                }
                let n = digits.parse().map_err(|_| {
                    ParseError::at(pos, ParseErrorKind::IntTooLarge(digits.to_string()))
                })?;
                Tok::Value(n)
            }
            '@' => {
                self.bump();
                let name = self.eat_while(is_ident_char);
                if name.is_empty() {
                    return Err(ParseError::at(
                        pos,
                        ParseErrorKind::Expected {
                            expected: "a role name after `@`",
                            found: self.describe_next(),
                        },
                    ));
                }
                Tok::Role(name)
            }
            '"' => self.string(pos)?,
            c if c.is_ascii_digit()
                || (c == '-' && self.peek_char2().is_some_and(|d| d.is_ascii_digit())) =>
            {
                Tok::Num(self.number())
            }
            c if is_ident_start(c) => Tok::Ident(self.eat_while(is_ident_char)),
            c => return Err(ParseError::at(pos, ParseErrorKind::UnexpectedChar(c))),
        };
        Ok((tok, pos))
    }

    fn describe_next(&self) -> String {
        match self.peek_char() {
            None => "end of input".into(),
            Some('\n') => "end of line".into(),
            Some(c) => format!("{c:?}"),
        }
    }

    /// `-?digits(.digits)?([eE][+-]?digits)?`
    fn number(&mut self) -> &'a str {
        let start = self.off;
        if self.peek_char() == Some('-') {
            self.bump();
        }
        self.eat_while(|c| c.is_ascii_digit());
        if self.peek_char() == Some('.') && self.peek_char2().is_some_and(|c| c.is_ascii_digit()) {
            self.bump();
            self.eat_while(|c| c.is_ascii_digit());
        }
        if matches!(self.peek_char(), Some('e' | 'E')) {
            let rest = self.src.get(self.off + 1..).unwrap_or("");
            let mut it = rest.chars();
            let exp_ok = match it.next() {
                Some('+' | '-') => it.next().is_some_and(|c| c.is_ascii_digit()),
                Some(c) => c.is_ascii_digit(),
                None => false,
            };
            if exp_ok {
                self.bump();
                if matches!(self.peek_char(), Some('+' | '-')) {
                    self.bump();
                }
                self.eat_while(|c| c.is_ascii_digit());
            }
        }
        self.src.get(start..self.off).unwrap_or("")
    }

    fn string(&mut self, pos: Pos) -> Result<Tok<'a>, ParseError> {
        self.bump(); // opening quote
        let mut s = String::new();
        loop {
            let esc_pos = self.pos();
            match self.peek_char() {
                None | Some('\n') => {
                    return Err(ParseError::at(pos, ParseErrorKind::UnterminatedString))
                }
                Some('"') => {
                    self.bump();
                    return Ok(Tok::Str(s));
                }
                Some('\\') => {
                    self.bump();
                    let bad =
                        |text: String| ParseError::at(esc_pos, ParseErrorKind::BadEscape(text));
                    match self.bump() {
                        Some('n') => s.push('\n'),
                        Some('t') => s.push('\t'),
                        Some('r') => s.push('\r'),
                        Some('0') => s.push('\0'),
                        Some('\\') => s.push('\\'),
                        Some('"') => s.push('"'),
                        Some('\'') => s.push('\''),
                        Some('u') => {
                            if self.peek_char() != Some('{') {
                                return Err(bad("\\u".into()));
                            }
                            self.bump();
                            let hex = self.eat_while(|c| c.is_ascii_hexdigit());
                            let closed = self.peek_char() == Some('}');
                            let text = format!("\\u{{{hex}{}", if closed { "}" } else { "" });
                            if !closed || hex.is_empty() || hex.len() > 6 {
                                return Err(bad(text));
                            }
                            self.bump();
                            let ch = u32::from_str_radix(hex, 16).ok().and_then(char::from_u32);
                            match ch {
                                Some(ch) => s.push(ch),
                                None => return Err(bad(text)),
                            }
                        }
                        None | Some('\n') => {
                            return Err(ParseError::at(pos, ParseErrorKind::UnterminatedString))
                        }
                        Some(c) => return Err(bad(format!("\\{c}"))),
                    }
                }
                Some(c) => {
                    self.bump();
                    s.push(c);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// Parser
// ---------------------------------------------------------------------------------

/// Parses a graph from the text format (see the module docs). Does not verify.
///
/// # Errors
/// A [`ParseError`] with the line and column of the first syntax or name error.
pub fn parse(src: &str) -> Result<Graph, ParseError> {
    parse_with_positions(src).map(|(g, _)| g)
}

/// Like [`parse`], and also returns the source position of each op (indexed by
/// [`OpId::index`]), so that verifier errors can point at lines.
///
/// # Errors
/// As [`parse`].
pub fn parse_with_positions(src: &str) -> Result<(Graph, Vec<Pos>), ParseError> {
    let mut p = Parser {
        lex: Lexer::new(src),
        peeked: None,
        graph: Graph::new(""),
        labels: BTreeMap::new(),
        positions: Vec::new(),
    };
    p.file()?;
    if let Err((op, t)) = p.graph.link() {
        // Unreachable: every input was resolved to a defined tensor.
        let pos = p
            .positions
            .get(op.index())
            .copied()
            .unwrap_or(Pos { line: 1, col: 1 });
        return Err(ParseError::at(
            pos,
            ParseErrorKind::Undefined(t.index() as u64),
        ));
    }
    Ok((p.graph, p.positions))
}

struct Parser<'a> {
    lex: Lexer<'a>,
    peeked: Option<(Tok<'a>, Pos)>,
    graph: Graph,
    /// Label → (tensor, line of its definition).
    labels: BTreeMap<u64, (TensorId, u32)>,
    positions: Vec<Pos>,
}

fn expected(pos: Pos, what: &'static str, found: &Tok<'_>) -> ParseError {
    ParseError::at(
        pos,
        ParseErrorKind::Expected {
            expected: what,
            found: found.to_string(),
        },
    )
}

impl<'a> Parser<'a> {
    fn peek(&mut self) -> Result<&(Tok<'a>, Pos), ParseError> {
        let tok = match self.peeked.take() {
            Some(t) => t,
            None => self.lex.next()?,
        };
        Ok(self.peeked.insert(tok))
    }

    fn next(&mut self) -> Result<(Tok<'a>, Pos), ParseError> {
        match self.peeked.take() {
            Some(t) => Ok(t),
            None => self.lex.next(),
        }
    }

    fn peek_is(&mut self, c: char) -> Result<bool, ParseError> {
        Ok(self.peek()?.0 == Tok::Punct(c))
    }

    fn expect_punct(&mut self, c: char, what: &'static str) -> Result<Pos, ParseError> {
        let (tok, pos) = self.next()?;
        if tok == Tok::Punct(c) {
            Ok(pos)
        } else {
            Err(expected(pos, what, &tok))
        }
    }

    fn skip_newlines(&mut self) -> Result<(), ParseError> {
        while self.peek()?.0 == Tok::Newline {
            self.next()?;
        }
        Ok(())
    }

    fn file(&mut self) -> Result<(), ParseError> {
        self.skip_newlines()?;
        let (tok, pos) = self.next()?;
        if tok != Tok::Ident("graph") {
            return Err(expected(pos, "`graph`", &tok));
        }
        let (tok, pos) = self.next()?;
        match tok {
            Tok::Str(name) => self.graph.set_name(name),
            other => return Err(expected(pos, "the graph name as a string", &other)),
        }
        self.expect_punct('{', "`{`")?;
        loop {
            self.skip_newlines()?;
            if self.peek_is('}')? {
                self.next()?;
                break;
            }
            self.section()?;
        }
        self.skip_newlines()?;
        let (tok, pos) = self.next()?;
        if tok != Tok::Eof {
            return Err(ParseError::at(
                pos,
                ParseErrorKind::Trailing(tok.to_string()),
            ));
        }
        Ok(())
    }

    fn section(&mut self) -> Result<(), ParseError> {
        let (tok, pos) = self.next()?;
        let block = match tok {
            Tok::Ident(s) => Block::parse(s)
                .ok_or_else(|| ParseError::at(pos, ParseErrorKind::UnknownBlock(s.into())))?,
            other => {
                return Err(expected(
                    pos,
                    "a section `<block> <phase> {` or `}`",
                    &other,
                ))
            }
        };
        let (tok, pos) = self.next()?;
        let phase = match tok {
            Tok::Ident(s) => Phase::parse(s)
                .ok_or_else(|| ParseError::at(pos, ParseErrorKind::UnknownPhase(s.into())))?,
            other => return Err(expected(pos, "a phase (fwd, bwd or opt)", &other)),
        };
        self.expect_punct('{', "`{`")?;
        loop {
            self.skip_newlines()?;
            if self.peek_is('}')? {
                self.next()?;
                return Ok(());
            }
            self.op(block, phase)?;
            let (tok, pos) = self.peek()?;
            if !matches!(tok, Tok::Newline | Tok::Punct('}')) {
                let found = tok.to_string();
                return Err(ParseError::at(
                    *pos,
                    ParseErrorKind::Expected {
                        expected: "end of line after the op",
                        found,
                    },
                ));
            }
        }
    }

    fn op(&mut self, block: Block, phase: Phase) -> Result<(), ParseError> {
        let start = self.peek()?.1;
        // Results.
        let mut results: Vec<(u64, Pos)> = Vec::new();
        if matches!(self.peek()?.0, Tok::Value(_)) {
            loop {
                let (tok, pos) = self.next()?;
                let Tok::Value(label) = tok else {
                    return Err(expected(pos, "a result value `%n`", &tok));
                };
                if let Some(&(_, line)) = self.labels.get(&label) {
                    return Err(ParseError::at(
                        pos,
                        ParseErrorKind::Redefined { label, line },
                    ));
                }
                if results.iter().any(|&(l, _)| l == label) {
                    return Err(ParseError::at(
                        pos,
                        ParseErrorKind::Redefined {
                            label,
                            line: pos.line,
                        },
                    ));
                }
                results.push((label, pos));
                if self.peek_is(',')? {
                    self.next()?;
                } else {
                    break;
                }
            }
            self.expect_punct('=', "`=` or `,` after result values")?;
        }
        // Op name.
        let (tok, name_pos) = self.next()?;
        let kind = match tok {
            Tok::Ident(name) => OpKind::from_name(name).ok_or_else(|| {
                ParseError::at(name_pos, AttrError::UnknownOp(name.to_string()).into())
            })?,
            other => return Err(expected(name_pos, "an op name", &other)),
        };
        // Inputs.
        let mut inputs = Vec::new();
        if self.peek_is('(')? {
            self.next()?;
            if self.peek_is(')')? {
                self.next()?;
            } else {
                loop {
                    let (tok, pos) = self.next()?;
                    let Tok::Value(label) = tok else {
                        return Err(expected(pos, "an input value `%n`", &tok));
                    };
                    let &(t, _) = self
                        .labels
                        .get(&label)
                        .ok_or_else(|| ParseError::at(pos, ParseErrorKind::Undefined(label)))?;
                    inputs.push(t);
                    let (tok, pos) = self.next()?;
                    match tok {
                        Tok::Punct(',') => {}
                        Tok::Punct(')') => break,
                        other => return Err(expected(pos, "`,` or `)`", &other)),
                    }
                }
            }
        }
        // Attributes.
        let mut attrs: BTreeMap<String, AttrValue> = BTreeMap::new();
        let mut attr_pos: BTreeMap<String, (Pos, Pos)> = BTreeMap::new();
        if self.peek_is('{')? {
            self.next()?;
            if self.peek_is('}')? {
                self.next()?;
            } else {
                loop {
                    let (tok, key_pos) = self.next()?;
                    let Tok::Ident(key) = tok else {
                        return Err(expected(key_pos, "an attribute name", &tok));
                    };
                    if attrs.contains_key(key) {
                        return Err(ParseError::at(
                            key_pos,
                            ParseErrorKind::DuplicateAttr(key.into()),
                        ));
                    }
                    self.expect_punct('=', "`=` after the attribute name")?;
                    let value_pos = self.peek()?.1;
                    let value = self.attr_value()?;
                    attrs.insert(key.to_string(), value);
                    attr_pos.insert(key.to_string(), (key_pos, value_pos));
                    let (tok, pos) = self.next()?;
                    match tok {
                        Tok::Punct(',') => {}
                        Tok::Punct('}') => break,
                        other => return Err(expected(pos, "`,` or `}`", &other)),
                    }
                }
            }
        }
        let op = Op::from_attrs(kind, &attrs).map_err(|e| {
            let pos = match &e {
                AttrError::Unknown { attr, .. } => attr_pos.get(attr).map(|p| p.0),
                AttrError::Type { attr, .. } => attr_pos.get(*attr).map(|p| p.1),
                AttrError::Missing { .. } | AttrError::UnknownOp(_) => None,
            };
            ParseError::at(pos.unwrap_or(name_pos), e.into())
        })?;
        // Types.
        let mut types = Vec::new();
        if self.peek_is(':')? {
            let colon = self.next()?.1;
            loop {
                let ty = self.tensor_type()?;
                let role = match self.peek()? {
                    (Tok::Role(name), pos) => {
                        let (name, pos) = (*name, *pos);
                        self.next()?;
                        Role::from_name(name).ok_or_else(|| {
                            ParseError::at(pos, ParseErrorKind::UnknownRole(name.into()))
                        })?
                    }
                    _ => Role::Activation,
                };
                types.push((ty, role));
                if self.peek_is(',')? {
                    self.next()?;
                } else {
                    break;
                }
            }
            if types.len() != results.len() {
                return Err(ParseError::at(
                    colon,
                    ParseErrorKind::ResultTypes {
                        results: results.len(),
                        types: types.len(),
                    },
                ));
            }
        } else if !results.is_empty() {
            let (tok, pos) = self.peek()?;
            let found = tok.to_string();
            return Err(ParseError::at(
                *pos,
                ParseErrorKind::Expected {
                    expected: "`:` and the result types",
                    found,
                },
            ));
        }
        let first = self.graph.tensor_count();
        for (i, &(label, pos)) in results.iter().enumerate() {
            self.labels
                .insert(label, (TensorId::from_index(first + i), pos.line));
        }
        self.graph.push_unchecked(op, inputs, types, block, phase);
        self.positions.push(start);
        Ok(())
    }

    fn tensor_type(&mut self) -> Result<TensorType, ParseError> {
        let (tok, pos) = self.next()?;
        let dtype = match tok {
            Tok::Ident(name) => DType::from_name(name)
                .ok_or_else(|| ParseError::at(pos, ParseErrorKind::UnknownDType(name.into())))?,
            other => return Err(expected(pos, "a tensor type like `bf16[b,s,64]`", &other)),
        };
        self.expect_punct('[', "`[` after the dtype")?;
        let mut dims = Vec::new();
        if self.peek_is(']')? {
            self.next()?;
        } else {
            loop {
                dims.push(self.dim()?.0);
                let (tok, pos) = self.next()?;
                match tok {
                    Tok::Punct(',') => {}
                    Tok::Punct(']') => break,
                    other => return Err(expected(pos, "`,` or `]`", &other)),
                }
            }
        }
        Ok(TensorType::new(dtype, dims))
    }

    /// A dimension; also says whether it was a single plain integer.
    fn dim(&mut self) -> Result<(Dim, bool), ParseError> {
        let start = self.peek()?.1;
        let start_off = self.lex.last_start;
        let mut dim = Some(Dim::lit(1));
        let mut plain = true;
        let mut factors = 0;
        loop {
            let (tok, pos) = self.next()?;
            let f = match tok {
                Tok::Num(n) if n.bytes().all(|c| c.is_ascii_digit()) => {
                    n.parse::<u64>().ok().map(Dim::lit)
                }
                Tok::Ident("b") => {
                    plain = false;
                    Some(Dim::batch())
                }
                Tok::Ident("s") => {
                    plain = false;
                    Some(Dim::seq())
                }
                Tok::Num(t) | Tok::Ident(t) => {
                    return Err(ParseError::at(pos, ParseErrorKind::BadDim(t.to_string())))
                }
                other => return Err(expected(pos, "a dimension (integer, `b` or `s`)", &other)),
            };
            factors += 1;
            dim = match (dim, f) {
                (Some(d), Some(f)) => d.checked_mul(f),
                _ => None,
            };
            if self.peek_is('*')? {
                self.next()?;
            } else {
                break;
            }
        }
        if self.peek_is('/')? {
            self.next()?;
            plain = false;
            let (tok, pos) = self.next()?;
            match tok {
                Tok::Num(n) if n.bytes().all(|c| c.is_ascii_digit()) => {
                    dim = match (dim, n.parse::<u64>().ok()) {
                        (Some(d), Some(n)) => d.checked_div(n),
                        _ => None,
                    };
                }
                other => return Err(expected(pos, "an integer divisor", &other)),
            }
        }
        let plain = plain && factors == 1;
        match dim {
            Some(d) => Ok((d, plain)),
            None => {
                let text = self
                    .lex
                    .src
                    .get(start_off..self.lex.off)
                    .unwrap_or("")
                    .trim();
                Err(ParseError::at(
                    start,
                    ParseErrorKind::BadDim(text.to_string()),
                ))
            }
        }
    }

    fn attr_value(&mut self) -> Result<AttrValue, ParseError> {
        let (tok, pos) = self.peek()?.clone();
        match tok {
            Tok::Punct('[') => {
                self.next()?;
                let mut dims = Vec::new();
                let mut all_plain = true;
                if self.peek_is(']')? {
                    self.next()?;
                } else {
                    loop {
                        let (d, plain) = self.dim()?;
                        all_plain &= plain;
                        dims.push(d);
                        let (tok, pos) = self.next()?;
                        match tok {
                            Tok::Punct(',') => {}
                            Tok::Punct(']') => break,
                            other => return Err(expected(pos, "`,` or `]`", &other)),
                        }
                    }
                }
                if all_plain {
                    Ok(AttrValue::Ints(
                        dims.iter().filter_map(|d| d.as_lit()).collect(),
                    ))
                } else {
                    Ok(AttrValue::Shape(Shape::new(dims)))
                }
            }
            Tok::Ident(word) => {
                self.next()?;
                match word {
                    "true" => Ok(AttrValue::Bool(true)),
                    "false" => Ok(AttrValue::Bool(false)),
                    w => DType::from_name(w)
                        .map(AttrValue::DType)
                        .ok_or_else(|| ParseError::at(pos, ParseErrorKind::BadAttrValue(w.into()))),
                }
            }
            Tok::Num(text) => {
                self.next()?;
                if text.bytes().all(|c| c.is_ascii_digit()) {
                    text.parse()
                        .map(AttrValue::Int)
                        .map_err(|_| ParseError::at(pos, ParseErrorKind::IntTooLarge(text.into())))
                } else {
                    text.parse()
                        .map(AttrValue::Float)
                        .map_err(|_| ParseError::at(pos, ParseErrorKind::BadAttrValue(text.into())))
                }
            }
            Tok::Str(s) => {
                self.next()?;
                Ok(AttrValue::Str(s))
            }
            other => Err(expected(pos, "an attribute value", &other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{verify, GraphBuilder};

    const TINY: &str = r#"# comment to end of line
graph "tiny-mlp" {
  embed fwd {
    %0 = input {name="tokens"} : i64[b,s]
    %1 = param {name="embed.tokens.weight"} : bf16[256,64] @param
    %2 = embedding(%1, %0) : bf16[b,s,64]
  }
  layer.0 fwd {
    %3, %4 = dropout(%2) {p=1e-1} : bf16[b,s,64], u8[b,s,64]
    send(%3) {peer=1}
  }
}
"#;

    #[test]
    fn parses_and_prints_the_module_example() {
        let g = parse(TINY).unwrap();
        assert_eq!(g.op_count(), 5);
        assert_eq!(g.tensor_count(), 5);
        verify(&g).unwrap();
        let printed = print(&g);
        assert_eq!(
            printed,
            TINY.lines().skip(1).collect::<Vec<_>>().join("\n") + "\n"
        );
        assert_eq!(parse(&printed).unwrap(), g);
    }

    #[test]
    fn labels_are_renumbered_in_definition_order() {
        let src = "graph \"g\" {\n embed fwd {\n %7 = input {name=\"x\"} : f32[4,4]\n %2 = gelu(%7) : f32[4,4]\n }\n}\n";
        let g = parse(src).unwrap();
        assert_eq!(print(&g).matches("%0").count(), 2);
        assert!(print(&g).contains("%1 = gelu(%0)"));
    }

    #[test]
    fn floats_and_strings_round_trip_exactly() {
        let values = [
            0.1,
            -2.5,
            1e-300,
            f64::MIN_POSITIVE,
            5e-324,
            f64::MAX,
            -0.0,
            123456789.0,
            1e15,
            0.3535533905932738,
        ];
        for (i, v) in values.into_iter().enumerate() {
            let mut b = GraphBuilder::new(format!("g{i} \"q\" \\ \t\n\u{7f}\u{301}é✓"));
            let x = b.input("x\u{0}", TensorType::new(DType::F32, [Dim::batch()]));
            b.add1(Op::Scale { factor: v }, &[x]).unwrap();
            let g = b.finish();
            let text = print(&g);
            assert_eq!(parse(&text).unwrap(), g, "{text}");
        }
    }

    #[test]
    fn errors_have_positions() {
        let e = parse("graph \"g\" {\n embed fwd {\n %0 = gelu(%9) : f32[4]\n }\n}\n").unwrap_err();
        assert_eq!((e.line, e.col), (3, 12));
        assert_eq!(e.to_string(), "3:12: undefined value %9");
        let e = parse("graph \"g\" {\n embed fwd {\n %0 = input {name=\"x\"} : f32[b*x]\n }\n}\n")
            .unwrap_err();
        assert_eq!(e.kind, ParseErrorKind::BadDim("x".into()));
        let e = parse("graph \"g\" {\n embed fwd {\n %0 = input {name=\"x\"} : f32[s/0]\n }\n}\n")
            .unwrap_err();
        assert_eq!(e.kind, ParseErrorKind::BadDim("s/0".into()));
        assert_eq!(e.col, 30);
    }

    #[test]
    fn never_panics_on_prefixes() {
        for i in 0..=TINY.len() {
            if let Some(prefix) = TINY.get(..i) {
                let _ = parse(prefix);
            }
        }
    }
}
