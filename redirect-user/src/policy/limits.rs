//! Bounds on what a pod or a file can make the daemon parse. YAML and JSON parsers take time
//! that grows faster than the input with its nesting (a 78 KB YAML document nested a few
//! thousand levels deep took 6-8 s to parse), so every document fed by a pod or a file is
//! checked here first, in one linear pass, and refused with the limit it broke.

use std::fmt;

/// Largest pods file read (a node's pods, each with its annotations, fit many times over).
pub const MAX_PODS_FILE_BYTES: usize = 8 << 20;

/// Largest document a pod can hand the daemon in one annotation or request (Kubernetes caps
/// all of a pod's annotations together at 256 KiB).
pub const MAX_POD_DOCUMENT_BYTES: usize = 256 << 10;

/// Deepest nesting accepted: flow collections (`[`, `{`) open at once, or block levels
/// (indentation, and `- ` / `? ` / `: ` indicators before a line's content, two columns a
/// level). Real configurations nest fewer than ten levels.
pub const MAX_NESTING: usize = 64;

/// A document refused before parsing, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TooLarge {
    Bytes { len: usize, max: usize },
    Nesting { line: usize, max: usize },
}

impl fmt::Display for TooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TooLarge::Bytes { len, max } => {
                write!(f, "{len} bytes, over the limit of {max} bytes")
            }
            TooLarge::Nesting { line, max } => write!(
                f,
                "nested deeper than {max} levels (line {line}); refused before parsing"
            ),
        }
    }
}

impl std::error::Error for TooLarge {}

/// Checks a pods file.
pub fn check_yaml(text: &str) -> Result<(), TooLarge> {
    check(text, MAX_PODS_FILE_BYTES)
}

/// Checks a YAML or JSON document a pod gives (an annotation, a CNI request).
pub fn check_pod_document(text: &str) -> Result<(), TooLarge> {
    check(text, MAX_POD_DOCUMENT_BYTES)
}

/// One pass over `text`: its size, the depth of its flow collections and the depth its block
/// structure could reach (a line's leading indentation and indicators). Conservative: quotes
/// are followed so brackets inside strings do not count, comments are skipped; anything this
/// counts as deeper than the limit is refused, whatever the parser would make of it.
fn check(text: &str, max_bytes: usize) -> Result<(), TooLarge> {
    if text.len() > max_bytes {
        return Err(TooLarge::Bytes {
            len: text.len(),
            max: max_bytes,
        });
    }
    let mut flow = 0usize;
    let mut quote: Option<u8> = None;
    for (n, line) in text.lines().enumerate() {
        let nested = |depth: usize| -> Result<(), TooLarge> {
            if depth > MAX_NESTING {
                return Err(TooLarge::Nesting {
                    line: n + 1,
                    max: MAX_NESTING,
                });
            }
            Ok(())
        };
        if quote.is_none() && flow == 0 {
            nested(block_depth(line))?;
        }
        let bytes = line.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            match quote {
                Some(b'"') if b == b'\\' => i += 1,
                Some(q) if b == q => quote = None,
                Some(_) => {}
                None => match b {
                    b'"' | b'\'' => quote = Some(b),
                    b'#' if i == 0 || bytes[i - 1].is_ascii_whitespace() => break,
                    b'[' | b'{' => {
                        flow += 1;
                        nested(flow)?;
                    }
                    b']' | b'}' => flow = flow.saturating_sub(1),
                    _ => {}
                },
            }
            i += 1;
        }
    }
    Ok(())
}

/// How many block levels a line's start could open: its indentation and the `- `, `? `, `: `
/// indicators before its content, two columns a level.
fn block_depth(line: &str) -> usize {
    let bytes = line.as_bytes();
    let mut col = 0;
    while col < bytes.len() {
        match bytes[col] {
            b' ' | b'\t' => col += 1,
            b'-' | b'?' | b':' if bytes.get(col + 1).is_none_or(|c| *c == b' ') => col += 2,
            _ => break,
        }
    }
    col.div_ceil(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_documents_pass() {
        let pods = "pods:\n  - name: a\n    netns: /run/netns/a\n    annotations:\n      x: \"[{not nested}]\"\n";
        assert_eq!(check_yaml(pods), Ok(()));
        let json = r#"{"cniVersion":"1.0.0","plugins":[{"type":"bridge","ipam":{"routes":[{"dst":"0.0.0.0/0"}]}}]}"#;
        assert_eq!(check_pod_document(json), Ok(()));
    }

    #[test]
    fn deep_flow_nesting_is_refused() {
        let deep = format!("a: {}{}", "[".repeat(65), "]".repeat(65));
        assert!(matches!(
            check_pod_document(&deep),
            Err(TooLarge::Nesting { line: 1, max: 64 })
        ));
        let ok = format!("a: {}{}", "[".repeat(64), "]".repeat(64));
        assert_eq!(check_pod_document(&ok), Ok(()));
        // Brackets in strings and comments do not count.
        let quoted = format!("a: \"{}\" # {}", "[".repeat(100), "{".repeat(100));
        assert_eq!(check_pod_document(&quoted), Ok(()));
    }

    #[test]
    fn deep_block_nesting_is_refused() {
        let mut doc = String::new();
        for i in 0..70 {
            doc.push_str(&format!("{}k{i}:\n", "  ".repeat(i)));
        }
        assert!(matches!(
            check_pod_document(&doc),
            Err(TooLarge::Nesting { line: 66, .. })
        ));
        let dashes = format!("{}x\n", "- ".repeat(70));
        assert!(check_pod_document(&dashes).is_err());
    }

    #[test]
    fn size_is_bounded() {
        let big = "a".repeat(MAX_POD_DOCUMENT_BYTES + 1);
        assert!(matches!(
            check_pod_document(&big),
            Err(TooLarge::Bytes { .. })
        ));
    }
}
