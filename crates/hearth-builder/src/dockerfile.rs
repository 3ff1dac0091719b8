//! A Dockerfile parser for untrusted input.
//!
//! [`parse`] turns the text into typed [`Instruction`]s, each with its 1-based
//! line number. Values are kept as written (quotes and `$VAR` references
//! included); [`Instruction::expanded`] applies variable substitution and quote
//! removal to exactly the fields Docker expands (FROM, COPY/ADD, ENV, ARG,
//! WORKDIR, USER, EXPOSE, LABEL, STOPSIGNAL), never to RUN/CMD/ENTRYPOINT/SHELL.
//! [`Dockerfile::stages`] splits the instructions into build stages.
//!
//! Supported: parser directives `# escape=` (backslash or backtick) and
//! `# syntax=` (ignored), comments, blank lines, line continuations (comment
//! and blank lines inside a continuation are skipped, as Docker does),
//! case-insensitive keywords, shell and exec (JSON) forms.
//!
//! Deliberately unsupported, with a clear error: heredocs (`<<EOF`), RUN flags
//! (`--mount`, `--network`, ...), COPY/ADD flags other than `--chown`,
//! `--chmod` (and `--from` for COPY), FROM flags other than `--platform`,
//! ONBUILD, HEALTHCHECK and VOLUME. MAINTAINER is accepted and ignored (it is
//! deprecated and has no effect on the image's filesystem or config we keep).
//!
//! Exec form: an argument starting with `[` is parsed as a JSON array of
//! strings. For RUN/CMD/ENTRYPOINT, if that fails and the text does not look
//! like JSON (the first non-blank character after `[` is not `"` or `]`), it is
//! shell form, so `RUN [ -f x ] && y` works; otherwise it is an error.

use std::collections::HashMap;

/// Largest Dockerfile accepted, in bytes.
pub const MAX_DOCKERFILE_BYTES: usize = 1 << 20;
/// Most instructions accepted in one Dockerfile.
pub const MAX_INSTRUCTIONS: usize = 10_000;

/// Why a Dockerfile was rejected. Every message starts with `line N:`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DockerfileError {
    #[error("line {line}: Dockerfile is larger than {max} bytes")]
    TooLarge { line: usize, max: usize },
    #[error("line {line}: more than {max} instructions")]
    TooManyInstructions { line: usize, max: usize },
    #[error("line {line}: unknown instruction {word:?}")]
    UnknownInstruction { line: usize, word: String },
    #[error("line {line}: {what} is not supported")]
    Unsupported { line: usize, what: String },
    #[error("line {line}: {message}")]
    Syntax { line: usize, message: String },
    #[error("line {line}: malformed exec-form JSON array (expected [\"a\", \"b\", ...])")]
    InvalidJson { line: usize },
    #[error("line {line}: variable substitution failed")]
    Expand {
        line: usize,
        #[source]
        source: ExpandError,
    },
}

impl DockerfileError {
    /// The 1-based line the error refers to.
    pub fn line(&self) -> usize {
        match self {
            Self::TooLarge { line, .. }
            | Self::TooManyInstructions { line, .. }
            | Self::UnknownInstruction { line, .. }
            | Self::Unsupported { line, .. }
            | Self::Syntax { line, .. }
            | Self::InvalidJson { line }
            | Self::Expand { line, .. } => *line,
        }
    }
}

fn syntax(line: usize, message: impl Into<String>) -> DockerfileError {
    DockerfileError::Syntax {
        line,
        message: message.into(),
    }
}

/// Why [`expand`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpandError {
    #[error("unterminated single quote")]
    UnterminatedSingleQuote,
    #[error("unterminated double quote")]
    UnterminatedDoubleQuote,
    #[error("unterminated ${{...}}")]
    UnterminatedBrace,
    #[error("bad substitution in ${{...}}")]
    BadSubstitution,
    #[error("{name}: {message}")]
    Required { name: String, message: String },
    #[error("${{...}} nested more than {MAX_NESTING} deep")]
    TooDeep,
}

/// A parsed Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dockerfile {
    /// The escape character (`\` unless `# escape=` says otherwise).
    pub escape: char,
    pub instructions: Vec<Instruction>,
}

/// One instruction and the line it starts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instruction {
    /// 1-based line of the instruction's keyword.
    pub line: usize,
    pub kind: InstructionKind,
}

/// A command in shell form (one string for `/bin/sh -c`) or exec form (argv).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandForm {
    Shell(String),
    Exec(Vec<String>),
}

/// The arguments of COPY or ADD.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CopySpec {
    pub sources: Vec<String>,
    pub dest: String,
    pub chown: Option<String>,
    pub chmod: Option<String>,
    /// `--from=` (COPY only).
    pub from: Option<String>,
}

/// The typed instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstructionKind {
    From {
        image: String,
        /// Stage name from `AS name`, lowercased.
        name: Option<String>,
        platform: Option<String>,
    },
    Run(CommandForm),
    Copy(CopySpec),
    Add(CopySpec),
    /// `(key, value)` pairs.
    Env(Vec<(String, String)>),
    /// `(name, default)` pairs.
    Arg(Vec<(String, Option<String>)>),
    Workdir(String),
    User(String),
    Cmd(CommandForm),
    Entrypoint(CommandForm),
    /// Port words as written, e.g. `80`, `53/udp`, `$PORT`; see [`Port::parse`].
    Expose(Vec<String>),
    Label(Vec<(String, String)>),
    Shell(Vec<String>),
    StopSignal(String),
}

/// Transport protocol of an exposed port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

/// An exposed port or port range (`start == end` for a single port).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Port {
    pub start: u16,
    pub end: u16,
    pub protocol: Protocol,
}

impl Port {
    /// Parses `80`, `80/tcp`, `53/udp` or `8000-8010/tcp`.
    pub fn parse(word: &str) -> Option<Port> {
        let (range, protocol) = match word.split_once('/') {
            Some((r, p)) if p.eq_ignore_ascii_case("tcp") => (r, Protocol::Tcp),
            Some((r, p)) if p.eq_ignore_ascii_case("udp") => (r, Protocol::Udp),
            Some(_) => return None,
            None => (word, Protocol::Tcp),
        };
        let number = |s: &str| -> Option<u16> {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            s.parse().ok()
        };
        let (start, end) = match range.split_once('-') {
            Some((a, b)) => (number(a)?, number(b)?),
            None => {
                let p = number(range)?;
                (p, p)
            }
        };
        if start > end {
            return None;
        }
        Some(Port {
            start,
            end,
            protocol,
        })
    }
}

/// Parses Dockerfile text.
pub fn parse(text: &str) -> Result<Dockerfile, DockerfileError> {
    if text.len() > MAX_DOCKERFILE_BYTES {
        return Err(DockerfileError::TooLarge {
            line: 1,
            max: MAX_DOCKERFILE_BYTES,
        });
    }
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let lines: Vec<&str> = text
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .collect();

    // Parser directives: only at the very top, before any other line.
    let mut escape = '\\';
    let mut seen_escape = false;
    let mut i = 0;
    while i < lines.len() {
        let Some((key, value)) = directive(lines[i]) else {
            break;
        };
        match key.as_str() {
            "escape" => {
                if seen_escape {
                    return Err(syntax(i + 1, "escape directive given twice"));
                }
                seen_escape = true;
                escape = match value {
                    "\\" => '\\',
                    "`" => '`',
                    _ => return Err(syntax(i + 1, "escape must be \\ or `")),
                };
            }
            "syntax" | "check" => {}
            _ => break,
        }
        i += 1;
    }

    let mut instructions = Vec::new();
    while i < lines.len() {
        let trimmed = lines[i].trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            i += 1;
            continue;
        }
        let line_no = i + 1;
        let mut logical = String::new();
        loop {
            let current = lines[i];
            let end_trimmed = current.trim_end();
            match end_trimmed.strip_suffix(escape) {
                Some(body) => {
                    logical.push_str(body);
                    i += 1;
                    // Skip comment and blank lines inside a continuation.
                    while i < lines.len() {
                        let t = lines[i].trim_start();
                        if t.is_empty() || t.starts_with('#') {
                            i += 1;
                        } else {
                            break;
                        }
                    }
                    if i >= lines.len() {
                        break;
                    }
                }
                None => {
                    logical.push_str(current);
                    i += 1;
                    break;
                }
            }
        }
        if instructions.len() >= MAX_INSTRUCTIONS {
            return Err(DockerfileError::TooManyInstructions {
                line: line_no,
                max: MAX_INSTRUCTIONS,
            });
        }
        if let Some(kind) = parse_instruction(line_no, logical.trim(), escape)? {
            instructions.push(Instruction {
                line: line_no,
                kind,
            });
        }
    }
    Ok(Dockerfile {
        escape,
        instructions,
    })
}

/// `# key=value` at the top of the file, key lowercased.
fn directive(line: &str) -> Option<(String, &str)> {
    let rest = line.trim_start().strip_prefix('#')?;
    let (key, value) = rest.split_once('=')?;
    let key = key.trim();
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    Some((key.to_ascii_lowercase(), value.trim()))
}

fn split_keyword(s: &str) -> (&str, &str) {
    match s.find(char::is_whitespace) {
        Some(pos) => (&s[..pos], s[pos..].trim_start()),
        None => (s, ""),
    }
}

fn parse_instruction(
    line: usize,
    text: &str,
    escape: char,
) -> Result<Option<InstructionKind>, DockerfileError> {
    let (word, rest) = split_keyword(text);
    let keyword = word.to_ascii_uppercase();
    let kind = match keyword.as_str() {
        "FROM" => parse_from(line, rest)?,
        "RUN" => {
            let (flags, rest) = take_flags(rest);
            if let Some((name, _)) = flags.first() {
                return Err(DockerfileError::Unsupported {
                    line,
                    what: format!("RUN --{name}"),
                });
            }
            let command = command_form(line, "RUN", rest)?;
            if let CommandForm::Shell(text) = &command {
                check_heredoc(line, text)?;
            }
            InstructionKind::Run(command)
        }
        "CMD" => InstructionKind::Cmd(command_form(line, "CMD", rest)?),
        "ENTRYPOINT" => InstructionKind::Entrypoint(command_form(line, "ENTRYPOINT", rest)?),
        "COPY" => InstructionKind::Copy(parse_copy(line, "COPY", rest)?),
        "ADD" => InstructionKind::Add(parse_copy(line, "ADD", rest)?),
        "ENV" => InstructionKind::Env(parse_name_values(line, "ENV", rest, escape)?),
        "LABEL" => InstructionKind::Label(parse_name_values(line, "LABEL", rest, escape)?),
        "ARG" => {
            let words = split_words(rest, escape);
            if words.is_empty() {
                return Err(syntax(line, "ARG requires a name"));
            }
            let mut args = Vec::with_capacity(words.len());
            for w in words {
                let (name, default) = match w.split_once('=') {
                    Some((n, d)) => (n.to_string(), Some(d.to_string())),
                    None => (w, None),
                };
                check_name(line, "ARG", &name)?;
                args.push((name, default));
            }
            InstructionKind::Arg(args)
        }
        "WORKDIR" => InstructionKind::Workdir(single_value(line, "WORKDIR", rest)?),
        "USER" => InstructionKind::User(single_value(line, "USER", rest)?),
        "STOPSIGNAL" => {
            let words: Vec<&str> = rest.split_whitespace().collect();
            if words.len() != 1 {
                return Err(syntax(line, "STOPSIGNAL requires exactly one argument"));
            }
            InstructionKind::StopSignal(words[0].to_string())
        }
        "EXPOSE" => {
            let words: Vec<String> = rest.split_whitespace().map(str::to_string).collect();
            if words.is_empty() {
                return Err(syntax(line, "EXPOSE requires at least one port"));
            }
            for w in &words {
                if !w.contains('$') && Port::parse(w).is_none() {
                    return Err(syntax(line, format!("invalid port {w:?}")));
                }
            }
            InstructionKind::Expose(words)
        }
        "SHELL" => {
            if !rest.starts_with('[') {
                return Err(syntax(line, "SHELL requires the exec (JSON array) form"));
            }
            let argv = parse_json_array(line, rest)?;
            if argv.is_empty() {
                return Err(syntax(line, "SHELL requires at least one argument"));
            }
            InstructionKind::Shell(argv)
        }
        "MAINTAINER" => return Ok(None),
        "ONBUILD" | "HEALTHCHECK" | "VOLUME" => {
            return Err(DockerfileError::Unsupported {
                line,
                what: keyword,
            })
        }
        _ => {
            let mut word = word.to_string();
            if word.len() > 64 {
                let mut cut = 64;
                while !word.is_char_boundary(cut) {
                    cut -= 1;
                }
                word.truncate(cut);
            }
            return Err(DockerfileError::UnknownInstruction { line, word });
        }
    };
    Ok(Some(kind))
}

/// Leading `--name[=value]` words, and what follows them.
fn take_flags(mut rest: &str) -> (Vec<(String, Option<String>)>, &str) {
    let mut flags = Vec::new();
    while let Some(after) = rest.strip_prefix("--") {
        let (word, remaining) = split_keyword(after);
        if word.is_empty() {
            break;
        }
        let flag = match word.split_once('=') {
            Some((n, v)) => (n.to_ascii_lowercase(), Some(v.to_string())),
            None => (word.to_ascii_lowercase(), None),
        };
        flags.push(flag);
        rest = remaining;
    }
    (flags, rest)
}

fn parse_from(line: usize, rest: &str) -> Result<InstructionKind, DockerfileError> {
    let (flags, rest) = take_flags(rest);
    let mut platform = None;
    for (name, value) in flags {
        match (name.as_str(), value) {
            ("platform", Some(v)) if !v.is_empty() => platform = Some(v),
            ("platform", _) => return Err(syntax(line, "--platform requires a value")),
            _ => {
                return Err(DockerfileError::Unsupported {
                    line,
                    what: format!("FROM --{name}"),
                })
            }
        }
    }
    let words: Vec<&str> = rest.split_whitespace().collect();
    let (image, name) = match words.as_slice() {
        [image] => (*image, None),
        [image, as_kw, name] if as_kw.eq_ignore_ascii_case("as") => {
            let name = name.to_ascii_lowercase();
            let valid = name.starts_with(|c: char| c.is_ascii_lowercase())
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
            if !valid {
                return Err(syntax(line, format!("invalid stage name {name:?}")));
            }
            (*image, Some(name))
        }
        _ => {
            return Err(syntax(
                line,
                "FROM requires an image and optionally AS name",
            ))
        }
    };
    Ok(InstructionKind::From {
        image: image.to_string(),
        name,
        platform,
    })
}

fn check_heredoc(line: usize, text: &str) -> Result<(), DockerfileError> {
    let bytes = text.as_bytes();
    let mut pos = 0;
    while let Some(found) = text[pos..].find("<<") {
        let mut j = pos + found + 2;
        if bytes.get(j) == Some(&b'-') {
            j += 1;
        }
        if matches!(bytes.get(j), Some(b) if b.is_ascii_alphabetic() || *b == b'_' || *b == b'"' || *b == b'\'')
        {
            return Err(DockerfileError::Unsupported {
                line,
                what: "heredoc (<<WORD)".to_string(),
            });
        }
        pos += found + 2;
    }
    Ok(())
}

fn looks_like_json(rest: &str) -> bool {
    rest.strip_prefix('[')
        .map(|r| r.trim_start())
        .is_some_and(|r| r.starts_with('"') || r.starts_with(']'))
}

fn parse_json_array(line: usize, text: &str) -> Result<Vec<String>, DockerfileError> {
    serde_json::from_str::<Vec<String>>(text).map_err(|_| DockerfileError::InvalidJson { line })
}

fn command_form(line: usize, what: &str, rest: &str) -> Result<CommandForm, DockerfileError> {
    if rest.starts_with('[') {
        match serde_json::from_str::<Vec<String>>(rest) {
            Ok(argv) => return Ok(CommandForm::Exec(argv)),
            Err(_) if looks_like_json(rest) => return Err(DockerfileError::InvalidJson { line }),
            Err(_) => {}
        }
    }
    if rest.is_empty() && what == "RUN" {
        return Err(syntax(line, "RUN requires a command"));
    }
    Ok(CommandForm::Shell(rest.to_string()))
}

fn parse_copy(line: usize, what: &str, rest: &str) -> Result<CopySpec, DockerfileError> {
    let (flags, rest) = take_flags(rest);
    let mut spec = CopySpec::default();
    for (name, value) in flags {
        let slot = match name.as_str() {
            "chown" => &mut spec.chown,
            "chmod" => &mut spec.chmod,
            "from" if what == "COPY" => &mut spec.from,
            _ => {
                return Err(DockerfileError::Unsupported {
                    line,
                    what: format!("{what} --{name}"),
                })
            }
        };
        match value {
            Some(v) if !v.is_empty() => *slot = Some(v),
            _ => return Err(syntax(line, format!("{what} --{name} requires a value"))),
        }
    }
    let mut words = if rest.starts_with('[') {
        parse_json_array(line, rest)?
    } else {
        check_heredoc(line, rest)?;
        rest.split_whitespace().map(str::to_string).collect()
    };
    if words.len() < 2 {
        return Err(syntax(
            line,
            format!("{what} requires at least one source and a destination"),
        ));
    }
    spec.dest = words.pop().unwrap_or_default();
    spec.sources = words;
    Ok(spec)
}

fn check_name(line: usize, what: &str, name: &str) -> Result<(), DockerfileError> {
    if name.is_empty() {
        return Err(syntax(line, format!("{what} names can not be blank")));
    }
    Ok(())
}

/// Splits on unquoted whitespace; quotes and escapes stay in the words (they
/// are removed by [`expand`]).
fn split_words(text: &str, escape: char) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quote: Option<char> = None;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == escape && quote != Some('\'') {
            word.push(c);
            if let Some(next) = chars.next() {
                word.push(next);
            }
            continue;
        }
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' => quote = Some(c),
            None if c.is_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
                continue;
            }
            None => {}
        }
        word.push(c);
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

fn parse_name_values(
    line: usize,
    what: &str,
    rest: &str,
    escape: char,
) -> Result<Vec<(String, String)>, DockerfileError> {
    let words = split_words(rest, escape);
    let Some(first) = words.first() else {
        return Err(syntax(
            line,
            format!("{what} requires at least one argument"),
        ));
    };
    if !first.contains('=') {
        // Legacy `ENV key value...`: the value is the rest of the line.
        let (key, value) = split_keyword(rest);
        if value.is_empty() {
            return Err(syntax(line, format!("{what} {key} requires a value")));
        }
        return Ok(vec![(key.to_string(), value.to_string())]);
    }
    let mut pairs = Vec::with_capacity(words.len());
    for w in words {
        let Some((k, v)) = w.split_once('=') else {
            return Err(syntax(
                line,
                format!("{what} expects key=value, got {:?}", truncate(&w)),
            ));
        };
        check_name(line, what, k)?;
        pairs.push((k.to_string(), v.to_string()));
    }
    Ok(pairs)
}

fn truncate(s: &str) -> &str {
    let mut cut = s.len().min(64);
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    &s[..cut]
}

fn single_value(line: usize, what: &str, rest: &str) -> Result<String, DockerfileError> {
    if rest.is_empty() {
        return Err(syntax(line, format!("{what} requires an argument")));
    }
    Ok(rest.to_string())
}

/// Variable substitution and quote removal with the default escape (`\`).
///
/// Supports `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`,
/// `${VAR:+alt}`, `${VAR+alt}`, `${VAR:?msg}`, `${VAR?msg}`, single quotes
/// (literal), double quotes and escapes. Unset variables expand to "".
pub fn expand(word: &str, vars: &HashMap<String, String>) -> Result<String, ExpandError> {
    expand_with_escape(word, vars, '\\')
}

/// [`expand`] with an explicit escape character.
pub fn expand_with_escape(
    word: &str,
    vars: &HashMap<String, String>,
    escape: char,
) -> Result<String, ExpandError> {
    let chars: Vec<char> = word.chars().collect();
    let mut lexer = Lexer {
        chars: &chars,
        pos: 0,
        depth: 0,
        vars,
        escape,
    };
    lexer.word(None)
}

/// Deepest `${A:-${B:-...}}` nesting [`expand`] accepts.
pub const MAX_NESTING: usize = 32;

struct Lexer<'a> {
    chars: &'a [char],
    pos: usize,
    depth: usize,
    vars: &'a HashMap<String, String>,
    escape: char,
}

impl Lexer<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    /// Processes until the end, or until an unquoted `stop` (not consumed).
    fn word(&mut self, stop: Option<char>) -> Result<String, ExpandError> {
        let mut out = String::new();
        while let Some(c) = self.peek() {
            if Some(c) == stop {
                return Ok(out);
            }
            self.pos += 1;
            if c == self.escape {
                match self.peek() {
                    Some(next) => {
                        out.push(next);
                        self.pos += 1;
                    }
                    None => out.push(c),
                }
            } else if c == '\'' {
                loop {
                    match self.peek() {
                        None => return Err(ExpandError::UnterminatedSingleQuote),
                        Some('\'') => {
                            self.pos += 1;
                            break;
                        }
                        Some(ch) => {
                            out.push(ch);
                            self.pos += 1;
                        }
                    }
                }
            } else if c == '"' {
                self.double_quoted(&mut out)?;
            } else if c == '$' {
                self.dollar(&mut out)?;
            } else {
                out.push(c);
            }
        }
        if stop.is_some() {
            return Err(ExpandError::UnterminatedBrace);
        }
        Ok(out)
    }

    fn double_quoted(&mut self, out: &mut String) -> Result<(), ExpandError> {
        loop {
            let Some(c) = self.peek() else {
                return Err(ExpandError::UnterminatedDoubleQuote);
            };
            self.pos += 1;
            if c == '"' {
                return Ok(());
            } else if c == self.escape {
                match self.peek() {
                    Some(next) if next == '"' || next == '$' || next == self.escape => {
                        out.push(next);
                        self.pos += 1;
                    }
                    _ => out.push(c),
                }
            } else if c == '$' {
                self.dollar(out)?;
            } else {
                out.push(c);
            }
        }
    }

    fn name(&mut self) -> String {
        let mut name = String::new();
        while let Some(c) = self.peek() {
            if c.is_ascii_alphanumeric() || c == '_' {
                name.push(c);
                self.pos += 1;
            } else {
                break;
            }
        }
        name
    }

    /// After a `$`.
    fn dollar(&mut self, out: &mut String) -> Result<(), ExpandError> {
        match self.peek() {
            Some('{') => {
                self.pos += 1;
                let name = self.name();
                if name.is_empty() {
                    return Err(if self.peek().is_none() {
                        ExpandError::UnterminatedBrace
                    } else {
                        ExpandError::BadSubstitution
                    });
                }
                let value = self.vars.get(&name);
                match self.peek() {
                    None => Err(ExpandError::UnterminatedBrace),
                    Some('}') => {
                        self.pos += 1;
                        out.push_str(value.map(String::as_str).unwrap_or(""));
                        Ok(())
                    }
                    Some(c) => {
                        let colon = c == ':';
                        if colon {
                            self.pos += 1;
                        }
                        let op = self.peek().ok_or(ExpandError::UnterminatedBrace)?;
                        if !matches!(op, '-' | '+' | '?') {
                            return Err(ExpandError::BadSubstitution);
                        }
                        self.pos += 1;
                        if self.depth >= MAX_NESTING {
                            return Err(ExpandError::TooDeep);
                        }
                        self.depth += 1;
                        let arg = self.word(Some('}'))?;
                        self.depth -= 1;
                        self.pos += 1; // the '}'
                        let set = match value {
                            Some(v) => !colon || !v.is_empty(),
                            None => false,
                        };
                        let v = value.map(String::as_str).unwrap_or("");
                        match op {
                            '-' => out.push_str(if set { v } else { &arg }),
                            '+' => {
                                if set {
                                    out.push_str(&arg)
                                }
                            }
                            _ => {
                                if !set {
                                    let message = if arg.is_empty() {
                                        "is not set".to_string()
                                    } else {
                                        arg
                                    };
                                    return Err(ExpandError::Required { name, message });
                                }
                                out.push_str(v);
                            }
                        }
                        Ok(())
                    }
                }
            }
            Some(c) if c.is_ascii_alphanumeric() || c == '_' => {
                let name = self.name();
                if let Some(v) = self.vars.get(&name) {
                    out.push_str(v);
                }
                Ok(())
            }
            _ => {
                out.push('$');
                Ok(())
            }
        }
    }
}

impl Instruction {
    /// This instruction with variable substitution and quote removal applied
    /// where Docker applies them, using `vars` (the ARG and ENV values in
    /// scope) and `escape` (see [`Dockerfile::escape`]). EXPOSE ports are
    /// validated after substitution.
    pub fn expanded(
        &self,
        vars: &HashMap<String, String>,
        escape: char,
    ) -> Result<Instruction, DockerfileError> {
        let line = self.line;
        let ex = |s: &str| {
            expand_with_escape(s, vars, escape)
                .map_err(|source| DockerfileError::Expand { line, source })
        };
        let ex_opt = |s: &Option<String>| s.as_deref().map(ex).transpose();
        let ex_copy = |c: &CopySpec| -> Result<CopySpec, DockerfileError> {
            Ok(CopySpec {
                sources: c.sources.iter().map(|s| ex(s)).collect::<Result<_, _>>()?,
                dest: ex(&c.dest)?,
                chown: ex_opt(&c.chown)?,
                chmod: ex_opt(&c.chmod)?,
                from: ex_opt(&c.from)?,
            })
        };
        let ex_pairs = |p: &[(String, String)]| -> Result<Vec<(String, String)>, DockerfileError> {
            p.iter().map(|(k, v)| Ok((ex(k)?, ex(v)?))).collect()
        };
        let kind = match &self.kind {
            InstructionKind::From {
                image,
                name,
                platform,
            } => InstructionKind::From {
                image: ex(image)?,
                name: name.clone(),
                platform: ex_opt(platform)?,
            },
            InstructionKind::Copy(c) => InstructionKind::Copy(ex_copy(c)?),
            InstructionKind::Add(c) => InstructionKind::Add(ex_copy(c)?),
            InstructionKind::Env(p) => InstructionKind::Env(ex_pairs(p)?),
            InstructionKind::Label(p) => InstructionKind::Label(ex_pairs(p)?),
            InstructionKind::Arg(a) => InstructionKind::Arg(
                a.iter()
                    .map(|(n, d)| Ok((n.clone(), ex_opt(d)?)))
                    .collect::<Result<_, DockerfileError>>()?,
            ),
            InstructionKind::Workdir(s) => InstructionKind::Workdir(ex(s)?),
            InstructionKind::User(s) => InstructionKind::User(ex(s)?),
            InstructionKind::StopSignal(s) => InstructionKind::StopSignal(ex(s)?),
            InstructionKind::Expose(words) => {
                let mut out = Vec::with_capacity(words.len());
                for w in words {
                    let e = ex(w)?;
                    if Port::parse(&e).is_none() {
                        return Err(syntax(line, format!("invalid port {:?}", truncate(&e))));
                    }
                    out.push(e);
                }
                InstructionKind::Expose(out)
            }
            other @ (InstructionKind::Run(_)
            | InstructionKind::Cmd(_)
            | InstructionKind::Entrypoint(_)
            | InstructionKind::Shell(_)) => other.clone(),
        };
        Ok(Instruction { line, kind })
    }
}

/// One build stage: its FROM and the instructions up to the next FROM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    /// 0-based position among the stages.
    pub index: usize,
    /// Name from `AS name`, lowercased.
    pub name: Option<String>,
    /// The stage's FROM instruction.
    pub from: Instruction,
    /// The instructions after FROM.
    pub instructions: Vec<Instruction>,
}

/// A Dockerfile split into build stages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stages {
    /// ARG instructions before the first FROM (usable in FROM lines).
    pub global_args: Vec<Instruction>,
    pub stages: Vec<Stage>,
}

impl Stages {
    /// The values of the global ARGs (those before the first FROM), for
    /// expanding FROM lines: a build argument overrides the default; a
    /// default may refer to earlier global ARGs; an ARG with neither is
    /// left out (so it expands to "").
    pub fn global_arg_values(
        &self,
        build_args: &HashMap<String, String>,
        escape: char,
    ) -> Result<HashMap<String, String>, DockerfileError> {
        let mut values = HashMap::new();
        for inst in &self.global_args {
            let InstructionKind::Arg(args) = &inst.kind else {
                continue;
            };
            for (name, default) in args {
                let value = match (build_args.get(name), default) {
                    (Some(v), _) => Some(v.clone()),
                    (None, Some(d)) => {
                        Some(expand_with_escape(d, &values, escape).map_err(|source| {
                            DockerfileError::Expand {
                                line: inst.line,
                                source,
                            }
                        })?)
                    }
                    (None, None) => None,
                };
                if let Some(v) = value {
                    values.insert(name.clone(), v);
                }
            }
        }
        Ok(values)
    }

    /// The stage with this name (case-insensitive), or at this index.
    pub fn find(&self, name_or_index: &str) -> Option<&Stage> {
        let lower = name_or_index.to_ascii_lowercase();
        self.stages
            .iter()
            .find(|s| s.name.as_deref() == Some(lower.as_str()))
            .or_else(|| {
                name_or_index
                    .parse::<usize>()
                    .ok()
                    .and_then(|i| self.stages.get(i))
            })
    }
}

impl Dockerfile {
    /// Splits the instructions into stages at each FROM. Only ARG may precede
    /// the first FROM; stage names must be unique.
    pub fn stages(&self) -> Result<Stages, DockerfileError> {
        let mut global_args = Vec::new();
        let mut stages: Vec<Stage> = Vec::new();
        for inst in &self.instructions {
            match &inst.kind {
                InstructionKind::From { name, .. } => {
                    if let Some(n) = name {
                        if stages.iter().any(|s| s.name.as_ref() == Some(n)) {
                            return Err(syntax(inst.line, format!("duplicate stage name {n:?}")));
                        }
                    }
                    stages.push(Stage {
                        index: stages.len(),
                        name: name.clone(),
                        from: inst.clone(),
                        instructions: Vec::new(),
                    });
                }
                _ => match stages.last_mut() {
                    Some(stage) => stage.instructions.push(inst.clone()),
                    None if matches!(inst.kind, InstructionKind::Arg(_)) => {
                        global_args.push(inst.clone())
                    }
                    None => {
                        return Err(syntax(inst.line, "only ARG may come before the first FROM"))
                    }
                },
            }
        }
        if stages.is_empty() {
            let line = self.instructions.last().map_or(1, |i| i.line);
            return Err(syntax(line, "no FROM instruction"));
        }
        Ok(Stages {
            global_args,
            stages,
        })
    }
}

#[cfg(test)]
#[path = "dockerfile_tests.rs"]
mod tests;
