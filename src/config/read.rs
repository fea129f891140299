//! Reading the config file, bounded: the file is only ever small, trusted-looking text, so
//! anything else is refused before the YAML parser builds a tree from it.
//!
//! - Only regular files are read (opened non-blocking, so a FIFO cannot hang the agent, and
//!   checked on the open handle, so `/dev/zero` or a directory is refused), and at most
//!   [`MAX_CONFIG_BYTES`] of them.
//! - The text must be UTF-8 without NUL bytes (a NUL used to end the document silently); the
//!   error gives the byte offset. A leading UTF-8 byte order mark is skipped.
//! - Before the `config` crate parses the YAML into a tree (recursively, expanding every alias
//!   by copying), the same parser's event stream is walked once, iteratively, to bound the
//!   nesting depth ([`MAX_YAML_DEPTH`]) and the number of values after alias expansion
//!   ([`MAX_YAML_NODES`]). Anchors and aliases stay usable for what a config needs them for;
//!   a "billion laughs" document is refused in microseconds. Syntax errors are left to the real
//!   parse, which reports them with the file name.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use yaml_rust2::parser::Parser;
use yaml_rust2::Event;

use super::error::ConfigError;
use super::limits::{MAX_CONFIG_BYTES, MAX_YAML_DEPTH, MAX_YAML_NODES};
use super::DEFAULT_CONFIG_PATH;

/// The config file to read: the given path (which must exist), else the default path if it
/// exists. Returns the path and its text, with a leading byte order mark removed.
pub(super) fn read_file(given: Option<&Path>) -> Result<Option<(PathBuf, String)>, ConfigError> {
    let path = match given {
        Some(path) => path.to_path_buf(),
        None if Path::new(DEFAULT_CONFIG_PATH).exists() => PathBuf::from(DEFAULT_CONFIG_PATH),
        None => return Ok(None),
    };
    let text = decode(&path, read_bounded(&path)?)?;
    check_yaml(&path, &text)?;
    Ok(Some((path, text)))
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, ConfigError> {
    let read_err = |source: std::io::Error| {
        if source.kind() == std::io::ErrorKind::NotFound {
            ConfigError::NotFound {
                path: path.to_path_buf(),
            }
        } else {
            ConfigError::Read {
                path: path.to_path_buf(),
                source,
            }
        }
    };
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer. It has no
    // effect on regular files, the only kind read below.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(read_err)?;
    let kind = file.metadata().map_err(read_err)?.file_type();
    if !kind.is_file() {
        return Err(ConfigError::NotRegular {
            path: path.to_path_buf(),
            kind: file_kind(kind),
        });
    }
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(ConfigError::TooLarge {
            path: path.to_path_buf(),
            limit: MAX_CONFIG_BYTES,
        });
    }
    Ok(bytes)
}

fn file_kind(kind: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// UTF-8 without NUL bytes, a leading byte order mark removed.
fn decode(path: &Path, bytes: Vec<u8>) -> Result<String, ConfigError> {
    let encoding = |offset: usize, what: &'static str| ConfigError::Encoding {
        path: path.to_path_buf(),
        offset,
        what,
    };
    if let Some(offset) = bytes.iter().position(|b| *b == 0) {
        return Err(encoding(offset, "NUL byte"));
    }
    let mut text = String::from_utf8(bytes)
        .map_err(|e| encoding(e.utf8_error().valid_up_to(), "invalid UTF-8"))?;
    if text.starts_with('\u{feff}') {
        text.drain(..'\u{feff}'.len_utf8());
    }
    Ok(text)
}

/// Size of an anchored value, as an alias to it would expand.
#[derive(Clone, Copy, Debug)]
struct Extent {
    nodes: u64,
    /// Levels of nesting, 1 for a scalar.
    height: usize,
}

/// A collection being read.
#[derive(Debug)]
struct Open {
    anchor: usize,
    /// [`MAX_YAML_NODES`]-counter value at its start.
    start: u64,
    /// Height of its tallest child so far.
    height: usize,
}

/// Bound nesting and alias expansion, walking the parser's events (without building a tree).
fn check_yaml(path: &Path, text: &str) -> Result<(), ConfigError> {
    let bounds = |line: usize, what: String| ConfigError::Bounds {
        path: path.to_path_buf(),
        line,
        what,
    };
    let too_deep = format!("nested deeper than {MAX_YAML_DEPTH} levels");
    let mut parser = Parser::new_from_str(text);
    let mut stack: Vec<Open> = Vec::new();
    let mut anchors: HashMap<usize, Extent> = HashMap::new();
    let mut nodes: u64 = 0;
    loop {
        // A syntax error is reported by the real parse, with the file name and position.
        let Ok((event, mark)) = parser.next_token() else {
            return Ok(());
        };
        let (anchor, extent) = match event {
            Event::StreamEnd => return Ok(()),
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                if stack.len() >= MAX_YAML_DEPTH {
                    return Err(bounds(mark.line(), too_deep));
                }
                stack.push(Open {
                    anchor,
                    start: nodes,
                    height: 0,
                });
                nodes += 1;
                continue;
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let Some(open) = stack.pop() else { continue };
                let extent = Extent {
                    nodes: nodes - open.start,
                    height: open.height + 1,
                };
                (open.anchor, extent)
            }
            Event::Scalar(_, _, anchor, _) => {
                nodes += 1;
                let extent = Extent {
                    nodes: 1,
                    height: 1,
                };
                (anchor, extent)
            }
            Event::Alias(id) => {
                // An unknown anchor is a syntax error the real parse reports.
                let extent = anchors.get(&id).copied().unwrap_or(Extent {
                    nodes: 1,
                    height: 1,
                });
                if stack.len() + extent.height > MAX_YAML_DEPTH {
                    return Err(bounds(mark.line(), too_deep));
                }
                nodes += extent.nodes;
                (0, extent)
            }
            _ => continue,
        };
        if nodes > MAX_YAML_NODES {
            return Err(bounds(
                mark.line(),
                format!(
                    "more than {MAX_YAML_NODES} values once aliases are expanded (a YAML alias bomb?)"
                ),
            ));
        }
        if anchor != 0 {
            anchors.insert(anchor, extent);
        }
        if let Some(parent) = stack.last_mut() {
            parent.height = parent.height.max(extent.height);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<(), String> {
        check_yaml(Path::new("t.yaml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn aliases_within_bounds_are_accepted() {
        let text = "a: &hdr {x: \"1\"}\nb: [*hdr, *hdr]\nc: &s scalar\nd: *s\n";
        assert_eq!(check(text), Ok(()));
    }

    #[test]
    fn alias_bomb_is_refused_by_expanded_size() {
        let mut text = String::from(
            "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
        );
        for (prev, name) in ["a", "b", "c", "d", "e", "f", "g", "h"]
            .iter()
            .zip(["b", "c", "d", "e", "f", "g", "h", "i"])
        {
            let items = vec![format!("*{prev}"); 9].join(",");
            text.push_str(&format!("{name}: &{name} [{items}]\n"));
        }
        let err = check(&text).expect_err("bomb");
        assert!(err.contains("aliases are expanded"), "{err}");
        // Refused where the count first passes the bound (the sixth level), not at the end.
        assert!(err.contains("line 6"), "{err}");
    }

    #[test]
    fn nesting_is_bounded_for_block_flow_and_alias_forms() {
        let block = format!("node_name:\n{}x\n", "- ".repeat(10_000));
        assert!(check(&block).expect_err("deep").contains("deeper than 32"));
        let ok = format!("node_name:\n{}x\n", "- ".repeat(MAX_YAML_DEPTH - 1));
        assert_eq!(check(&ok), Ok(()));
        // Each alias stays shallow, but splices its anchor's depth where it is used.
        let half = MAX_YAML_DEPTH / 2 + 1;
        let nested = |n: usize| format!("{}x{}", "[".repeat(n), "]".repeat(n));
        let text = format!(
            "a: &a {}\nb: {}*a{}\n",
            nested(half),
            "[".repeat(half),
            "]".repeat(half)
        );
        assert!(check(&text).expect_err("deep").contains("deeper than 32"));
    }

    #[test]
    fn nul_and_invalid_utf8_are_refused_with_their_offset() {
        let p = Path::new("t.yaml");
        let err = decode(p, b"node_name: good\n\0\nlibvirt: {}\n".to_vec()).expect_err("nul");
        assert_eq!(
            err.to_string(),
            "config file t.yaml: NUL byte at byte 16 (expected UTF-8 text without NUL bytes)"
        );
        let err = decode(p, b"node_name: go\xffod\n".to_vec()).expect_err("utf8");
        assert_eq!(
            err.to_string(),
            "config file t.yaml: invalid UTF-8 at byte 13 (expected UTF-8 text without NUL bytes)"
        );
    }

    #[test]
    fn a_leading_byte_order_mark_is_skipped() {
        let text = decode(Path::new("t.yaml"), b"\xef\xbb\xbfnode_name: n\n".to_vec());
        assert_eq!(text.expect("decodes"), "node_name: n\n");
    }
}
