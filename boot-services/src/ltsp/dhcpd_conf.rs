//! ISC dhcpd.conf, read as dhcpd reads it: tokens (words, quoted strings, `{ } ; , =`), `#`
//! comments, statements that end with `;` or with a `{ ... }` block. Only the syntax is known
//! here; what the statements mean is up to the importer.

use super::ParseError;

/// A token and the line it starts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// 1-based line.
    pub line: usize,
    /// The token's text, without quotes for a string.
    pub text: String,
    /// Whether it was a quoted string.
    pub quoted: bool,
}

/// A statement: its words, and the block it opened, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// Line of the first word.
    pub line: usize,
    /// Line of the `;` or of the block's `}`.
    pub last_line: usize,
    /// The words before `;` or `{`.
    pub words: Vec<Token>,
    /// The statements inside `{ ... }`.
    pub block: Option<Vec<Statement>>,
}

impl Statement {
    /// The `index`th word's text, or "".
    pub fn word(&self, index: usize) -> &str {
        self.words
            .get(index)
            .map_or("", |token| token.text.as_str())
    }

    /// The statement as one line, the way an operator would recognise it in the file.
    pub fn display(&self) -> String {
        let mut text = String::new();
        for token in &self.words {
            let is_punctuation = matches!(token.text.as_str(), "," | ")");
            if !text.is_empty() && !is_punctuation && !text.ends_with('(') {
                text.push(' ');
            }
            if token.quoted {
                text.push('"');
                text.push_str(&token.text);
                text.push('"');
            } else {
                text.push_str(&token.text);
            }
        }
        if self.block.is_some() {
            text.push_str(" { ... }");
        } else {
            text.push(';');
        }
        text
    }
}

/// Nesting deeper than this is refused: no real dhcpd.conf comes close, and a hostile file
/// must not overflow the parser's stack.
const NESTING_MAX: usize = 32;

/// Splits `text` into tokens.
pub fn tokenize(text: &str) -> Result<Vec<Token>, ParseError> {
    let mut tokens = Vec::new();
    let mut characters = text.chars().peekable();
    let mut line = 1;
    while let Some(&character) = characters.peek() {
        match character {
            '\n' => {
                line += 1;
                characters.next();
            }
            character if character.is_whitespace() => {
                characters.next();
            }
            '#' => {
                while characters.peek().is_some_and(|&next| next != '\n') {
                    characters.next();
                }
            }
            '"' => {
                let start = line;
                characters.next();
                let mut value = String::new();
                loop {
                    match characters.next() {
                        None => {
                            return Err(ParseError {
                                file: "dhcpd.conf",
                                line: start,
                                reason: "a quoted string is not closed".into(),
                            });
                        }
                        Some('"') => break,
                        Some('\\') => match characters.next() {
                            Some('n') => value.push('\n'),
                            Some('t') => value.push('\t'),
                            Some(escaped) => value.push(escaped),
                            None => {}
                        },
                        Some(inner) => {
                            if inner == '\n' {
                                line += 1;
                            }
                            value.push(inner);
                        }
                    }
                }
                tokens.push(Token {
                    line: start,
                    text: value,
                    quoted: true,
                });
            }
            '{' | '}' | ';' | ',' | '(' | ')' => {
                characters.next();
                tokens.push(Token {
                    line,
                    text: character.to_string(),
                    quoted: false,
                });
            }
            _ => {
                let mut word = String::new();
                while let Some(&next) = characters.peek() {
                    if next.is_whitespace() || "{};,()\"#".contains(next) {
                        break;
                    }
                    word.push(next);
                    characters.next();
                }
                tokens.push(Token {
                    line,
                    text: word,
                    quoted: false,
                });
            }
        }
    }
    Ok(tokens)
}

/// A parsed file, and the blocks it left open at its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// The statements.
    pub statements: Vec<Statement>,
    /// Lines of blocks the file never closed. dhcpd refuses such a file; the importer closes
    /// them at the end and says so, because a `}` lost in copying is the likely cause.
    pub unclosed: Vec<usize>,
}

/// Parses `text` into statements.
pub fn parse(text: &str) -> Result<Parsed, ParseError> {
    let tokens = tokenize(text)?;
    let mut position = 0;
    let mut unclosed = Vec::new();
    let statements = parse_block(&tokens, &mut position, 0, &mut unclosed)?;
    if let Some(token) = tokens.get(position) {
        return Err(syntax(token.line, "a `}` closes no block"));
    }
    Ok(Parsed {
        statements,
        unclosed,
    })
}

fn syntax(line: usize, reason: &str) -> ParseError {
    ParseError {
        file: "dhcpd.conf",
        line,
        reason: reason.to_owned(),
    }
}

fn parse_block(
    tokens: &[Token],
    position: &mut usize,
    depth: usize,
    unclosed: &mut Vec<usize>,
) -> Result<Vec<Statement>, ParseError> {
    let mut statements = Vec::new();
    let mut words: Vec<Token> = Vec::new();
    while let Some(token) = tokens.get(*position) {
        if token.quoted {
            words.push(token.clone());
            *position += 1;
            continue;
        }
        match token.text.as_str() {
            ";" => {
                *position += 1;
                if !words.is_empty() {
                    statements.push(Statement {
                        line: words[0].line,
                        last_line: token.line,
                        words: std::mem::take(&mut words),
                        block: None,
                    });
                }
            }
            "{" => {
                if depth >= NESTING_MAX {
                    return Err(syntax(token.line, "blocks nested too deeply"));
                }
                let opened = token.line;
                *position += 1;
                let inner = parse_block(tokens, position, depth + 1, unclosed)?;
                let last_line = match tokens.get(*position) {
                    Some(close) => close.line,
                    None => {
                        unclosed.push(words.first().map_or(opened, |word| word.line));
                        tokens.last().map_or(opened, |token| token.line)
                    }
                };
                *position += 1;
                statements.push(Statement {
                    line: words.first().map_or(opened, |word| word.line),
                    last_line,
                    words: std::mem::take(&mut words),
                    block: Some(inner),
                });
            }
            "}" => {
                if let Some(first) = words.first() {
                    return Err(syntax(first.line, "a statement before `}` lacks its `;`"));
                }
                if depth == 0 {
                    return Err(syntax(token.line, "a `}` closes no block"));
                }
                return Ok(statements);
            }
            _ => {
                words.push(token.clone());
                *position += 1;
            }
        }
    }
    if let Some(first) = words.first() {
        return Err(syntax(
            first.line,
            "the file ends inside this statement (no `;`)",
        ));
    }
    Ok(statements)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_blocks_and_comments() {
        let text = "option domain-name \"example.org\"; # a comment\n\
                    subnet 10.9.0.0 netmask 255.255.0.0 {\n  range 10.9.200.0 10.9.250.254;\n}\n\
                    if option architecture = 00:07 { filename \"a\"; } else { filename \"b\"; }\n";
        let parsed = parse(text).unwrap();
        assert!(parsed.unclosed.is_empty());
        let statements = parsed.statements;
        assert_eq!(statements.len(), 4);
        assert_eq!(
            statements[0].display(),
            "option domain-name \"example.org\";"
        );
        assert_eq!(statements[1].word(0), "subnet");
        let inner = statements[1].block.as_ref().unwrap();
        assert_eq!(inner[0].line, 3);
        assert_eq!(inner[0].display(), "range 10.9.200.0 10.9.250.254;");
        assert_eq!(statements[2].word(3), "=");
        assert_eq!(statements[2].word(4), "00:07");
        assert_eq!(statements[3].word(0), "else");
    }

    #[test]
    fn broken_files_name_the_line() {
        for (text, line, reason) in [
            ("option routers 10.0.0.1\n}", 1, ";"),
            ("\n\noption domain-name \"open", 3, "quoted"),
            ("}", 1, "closes no block"),
            ("range 10.0.0.1", 1, "no `;`"),
        ] {
            let error = parse(text).unwrap_err().to_string();
            assert!(
                error.contains(&format!("dhcpd.conf:{line}:")) && error.contains(reason),
                "{text:?}: {error}"
            );
        }
        let deep = "group {".repeat(100);
        assert!(parse(&deep).unwrap_err().to_string().contains("nested"));
    }

    #[test]
    fn blocks_left_open_at_the_end_are_closed_and_named() {
        let text = "shared-network lab {\nsubnet 10.0.0.0 netmask 255.0.0.0 {\n range 10.0.0.1 10.0.0.9;\n}\n";
        let parsed = parse(text).unwrap();
        assert_eq!(parsed.unclosed, vec![1]);
        let subnet = &parsed.statements[0].block.as_ref().unwrap()[0];
        assert_eq!(subnet.block.as_ref().unwrap()[0].word(0), "range");
    }
}
