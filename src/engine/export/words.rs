//! Shell words: writing options so that they paste after a command, and reading them
//! back (POSIX quoting: `'…'` literal, `"…"` with `\` escapes, `\` newline joins lines).

use super::ParseError;
use std::str::FromStr;

/// `s` as one shell word: as it is when it holds only safe characters, else in single
/// quotes.
pub(super) fn quote(s: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "_-./,:=@%+".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r#"'\''"#))
    }
}

/// One option per line (its words quoted), lines joined by ` \` so that the whole
/// pastes after a command.
pub(super) fn lines(options: &[Vec<String>]) -> String {
    let rows: Vec<String> = options
        .iter()
        .map(|o| o.iter().map(|w| quote(w)).collect::<Vec<_>>().join(" "))
        .collect();
    rows.join(" \\\n") + "\n"
}

/// Splits `text` into shell words.
pub(super) fn split(text: &str) -> Result<Vec<String>, ParseError> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(x) => cur.push(x),
                        None => return Err(ParseError::Words("unclosed '".into())),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(x @ ('"' | '\\' | '$' | '`')) => cur.push(x),
                            Some('\n') => {}
                            Some(x) => {
                                cur.push('\\');
                                cur.push(x);
                            }
                            None => return Err(ParseError::Words("dangling \\".into())),
                        },
                        Some(x) => cur.push(x),
                        None => return Err(ParseError::Words("unclosed \"".into())),
                    }
                }
            }
            '\\' => match chars.next() {
                Some('\n') => {}
                Some(x) => {
                    in_word = true;
                    cur.push(x);
                }
                None => return Err(ParseError::Words("dangling \\".into())),
            },
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

/// Options read from shell words: `--name value…`, `--name=value` and bare flags.
pub(super) struct Options {
    words: Vec<String>,
}

impl Options {
    pub(super) fn parse(text: &str) -> Result<Options, ParseError> {
        Ok(Options {
            words: split(text)?,
        })
    }

    /// The options without the word `w` (a subcommand), and whether it was there.
    pub(super) fn take(&mut self, w: &str) -> bool {
        let before = self.words.len();
        self.words.retain(|x| x != w);
        self.words.len() != before
    }

    /// The words given to `name` (after it up to the next `--option`, or after `=`);
    /// `None` when `name` is absent.
    pub(super) fn values(&self, name: &str) -> Option<Vec<&str>> {
        let prefix = format!("{name}=");
        let i = self
            .words
            .iter()
            .rposition(|w| w == name || w.starts_with(&prefix))?;
        if let Some(v) = self.words[i].strip_prefix(&prefix) {
            return Some(vec![v]);
        }
        Some(
            self.words[i + 1..]
                .iter()
                .take_while(|w| !w.starts_with("--"))
                .map(String::as_str)
                .collect(),
        )
    }

    /// The single value of `name`.
    pub(super) fn value(&self, name: &str) -> Result<Option<&str>, ParseError> {
        match self.values(name) {
            None => Ok(None),
            Some(v) if v.len() == 1 => Ok(Some(v[0])),
            Some(v) => Err(ParseError::BadValue {
                option: name.to_string(),
                value: v.join(" "),
            }),
        }
    }

    /// The value of `name` parsed as `T`.
    pub(super) fn num<T: FromStr>(&self, name: &str) -> Result<Option<T>, ParseError> {
        match self.value(name)? {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| ParseError::BadValue {
                option: name.to_string(),
                value: v.to_string(),
            }),
        }
    }

    /// The value of `name` parsed as `T`; an error when absent.
    pub(super) fn req<T: FromStr>(&self, name: &str) -> Result<T, ParseError> {
        self.num(name)?
            .ok_or_else(|| ParseError::Missing(name.to_string()))
    }

    /// Whether the word `w` (a flag or a subcommand) is present.
    pub(super) fn has(&self, w: &str) -> bool {
        self.words.iter().any(|x| x == w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_words_split_back() {
        for w in ["plain", "Et*3|t*4", "it's", "{\"a\": true}", "a b", ""] {
            let text = format!("--x {} \\\n--y", quote(w));
            assert_eq!(split(&text).unwrap(), vec!["--x", w, "--y"]);
        }
    }

    #[test]
    fn unbalanced_quotes_are_errors() {
        assert!(split("'open").is_err());
        assert!(split("\"open").is_err());
        assert!(split("end\\").is_err());
    }
}
