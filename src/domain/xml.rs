//! Streaming parser for libvirt domain XML.
//!
//! [`parse_domain_xml`] reads a document with a quick-xml [`NsReader`] (zero-copy over the input
//! slice) and keeps only what the agent needs:
//!
//! * the root `<domain type='…'>` attribute (raw, and classified with
//!   [`HypervisorType::from_domain_type`]);
//! * the top-level `<name>` and `<uuid>` text;
//! * whether `<metadata>` holds KubeVirt's `<kubevirt xmlns="http://kubevirt.io">` element,
//!   matched by **namespace URI**, so the default-namespace form and any prefix
//!   (`<kv:kubevirt xmlns:kv="http://kubevirt.io">`) are accepted, while a `<kubevirt>` element
//!   in another namespace (or none) is not KubeVirt metadata. Its content is not read: current
//!   launchers (KubeVirt v0.59 and later) write an empty `<uid/>` there, older ones the VMI UID
//!   and a `<graceperiod>`, and the agent needs neither;
//! * only when [`Wants::os`]: `<os><type arch='…' machine='…'>`;
//! * only when [`Wants::emulator`]: `<devices><emulator>` text.
//!
//! # Early exit
//!
//! libvirt always writes `<name>`, `<uuid>`, `<genid>`, `<title>`, `<description>` and
//! `<metadata>` first. These six top-level elements are the *header*. The header is over at the
//! first top-level element that is not one of them (`<memory>` in practice), or right after
//! `</metadata>` when both `<name>` and `<uuid>` have been seen. Then:
//!
//! * with the default [`Wants`], the parser returns at once: nothing after the header is
//!   tokenized, so a broken, truncated, non-UTF-8 or absurdly nested `<devices>` section does not
//!   matter (and costs nothing);
//! * with [`Wants::os`], it returns after the first top-level `</os>`;
//! * with [`Wants::emulator`], it reads into `<devices>` and returns after the first
//!   `</emulator>` (or `</devices>` if there is none);
//! * with both, after both; if something wanted is missing, it reads to `</domain>`.
//!
//! Header elements are only honoured **while the header lasts**: a `<metadata>`, `<name>` or
//! `<uuid>` that comes after another top-level element (an ordering libvirt never produces) is
//! ignored, whatever [`Wants`] says, so the identity of a domain never depends on what else was
//! asked for. Content after `</domain>` is never read.
//!
//! # Values
//!
//! * Text values (`name`, `uuid`, `emulator`) are the concatenation of the element's
//!   direct text, CDATA and references, with XML line-end normalization, trimmed of XML
//!   whitespace; empty after trimming means `None`. Comments inside are skipped, text of nested
//!   child elements is ignored. When an element is repeated, the first one wins.
//! * References: the five predefined entities (`&amp;` `&lt;` `&gt;` `&apos;` `&quot;`) and
//!   numeric character references are resolved; any other entity (e.g. one declared in a DTD)
//!   is an error ([`MalformedKind::InvalidReference`]). DTDs are never expanded.
//! * Attribute values (`type`, `arch`, `machine`) are normalized as XML 1.0 specifies (references
//!   resolved, tab/newline become spaces) and otherwise kept as written (an empty `type=''` gives
//!   `domain_type = Some("")`, classified `unknown`).
//! * Any kept value (text or attribute) longer than [`MAX_VALUE_LEN`] bytes is an **error**
//!   ([`XmlError::ValueTooLong`]), not a truncation: a truncated name or UUID would be a wrong
//!   identity. Values the parser does not keep may be of any size.
//! * Elements nested deeper than [`MAX_DEPTH`] (counting the root as 1) in the part of the
//!   document that is read are an error ([`XmlError::TooDeep`]).
//!
//! # Errors
//!
//! Any error means "this XML could not be parsed": the agent classifies the domain as
//! `unknown`, even when the root `type` had already been read before the error (no partial
//! results are returned). Error messages carry byte positions, limits and element names (cut to
//! [`MAX_NAME_IN_ERROR`] bytes) but never text or attribute values from the document, so they
//! are safe to log. quick-xml's own errors are mapped to the content-free [`MalformedKind`].
//!
//! The input must be UTF-8 (what libvirt produces); an `encoding` declaration is ignored and
//! invalid UTF-8 in the part that is read gives [`XmlError::NotUtf8`]. A UTF-8 BOM is accepted.

use quick_xml::errors::{IllFormedError, SyntaxError};
use quick_xml::events::{BytesRef, BytesStart, Event};
use quick_xml::name::ResolveResult;
use quick_xml::{NsReader, XmlVersion};

use super::{DomainFacts, HypervisorType, Wants, KUBEVIRT_NS};

/// Maximum element depth (the root `<domain>` is depth 1) in the part of a document that is read.
pub const MAX_DEPTH: usize = 64;

/// Maximum size in bytes of any single value the parser keeps (text or attribute, after
/// reference resolution).
pub const MAX_VALUE_LEN: usize = 4096;

/// Element names quoted in error messages are cut to this many bytes.
pub const MAX_NAME_IN_ERROR: usize = 64;

/// Why a domain XML document could not be read.
///
/// The `Display` text never contains document content (only positions, limits, element names):
/// it can be logged as is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum XmlError {
    /// The document is not well-formed XML (as far as it was read).
    #[error("malformed XML at byte {position}: {kind}")]
    Malformed {
        /// Byte offset in the input (start of the offending markup, approximately).
        position: u64,
        kind: MalformedKind,
    },
    /// No root element at all (empty input, only whitespace, comments or declarations).
    #[error("document has no root element")]
    NoRoot,
    /// The root element is not a `<domain>` in no namespace.
    #[error("root element is <{found}>, expected <domain> (in no namespace)")]
    WrongRoot {
        /// The root element's qualified name, cut to [`MAX_NAME_IN_ERROR`] bytes.
        found: String,
    },
    /// The part of the input that was read is not valid UTF-8.
    #[error("document is not valid UTF-8 (in the markup starting at byte {position})")]
    NotUtf8 { position: u64 },
    /// Elements are nested deeper than [`MAX_DEPTH`].
    #[error("elements nested deeper than {limit} levels at byte {position}")]
    TooDeep { position: u64, limit: usize },
    /// A value the parser keeps is longer than [`MAX_VALUE_LEN`].
    #[error("{what} is longer than {limit} bytes (at byte {position})")]
    ValueTooLong {
        /// Which value, e.g. `"<name> text"` or `"root type attribute"`.
        what: &'static str,
        position: u64,
        limit: usize,
    },
}

impl XmlError {
    /// A short, stable, low-cardinality label for metrics (`malformed`, `no_root`, `wrong_root`,
    /// `not_utf8`, `too_deep`, `too_long`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Malformed { .. } => "malformed",
            Self::NoRoot => "no_root",
            Self::WrongRoot { .. } => "wrong_root",
            Self::NotUtf8 { .. } => "not_utf8",
            Self::TooDeep { .. } => "too_deep",
            Self::ValueTooLong { .. } => "too_long",
        }
    }
}

/// What is wrong with a malformed document. Content-free by construction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MalformedKind {
    /// Broken markup (unclosed tag, comment, CDATA, attribute quote…).
    #[error("{0}")]
    Syntax(SyntaxError),
    /// An end tag that does not close the open element, or closes nothing.
    #[error("end tag does not match the open element")]
    MismatchedEndTag,
    /// The input ends before the root element is closed.
    #[error("input ends inside the root element")]
    UnexpectedEof,
    /// Bad XML declaration, DOCTYPE or comment.
    #[error("ill-formed declaration, DOCTYPE or comment")]
    IllFormedMarkup,
    /// Attribute syntax error (missing quotes, missing `=`…).
    #[error("invalid attribute syntax")]
    InvalidAttribute,
    /// The root element has more than one `type` attribute.
    #[error("duplicate `type` attribute on the root element")]
    DuplicateTypeAttribute,
    /// An unknown entity, a bad character reference, or a lone `&`.
    #[error("unknown entity or invalid character reference")]
    InvalidReference,
    /// An undeclared prefix, a reserved prefix rebound, or too many namespace bindings.
    #[error("namespace error")]
    Namespace,
    /// Text, CDATA or references outside the root element.
    #[error("content outside the root element")]
    ContentOutsideRoot,
    /// Reading failed (cannot happen for an in-memory slice; kept for completeness).
    #[error("read error")]
    Io,
}

/// Parse the facts the agent needs from a domain XML document (see the [module docs](self)
/// for what is read, when it stops, and the limits).
pub fn parse_domain_xml(xml: &[u8], wants: Wants) -> Result<DomainFacts, XmlError> {
    let mut reader = NsReader::from_reader(xml);
    let mut st = State::new(wants);

    loop {
        let (ns, event) = match reader.read_resolved_event() {
            Ok((ns, event)) => (Ns::of(&ns), event),
            Err(err) => {
                let position = match err {
                    // Namespace errors are raised by the resolver after the reader has moved on.
                    quick_xml::Error::Namespace(_) => reader.buffer_position(),
                    _ => reader.error_position(),
                };
                return Err(map_quick_xml_error(&err, position));
            }
        };
        let position = reader.buffer_position();

        let flow = match event {
            Event::Start(e) => st.start(&e, ns, position, false)?,
            Event::Empty(e) => st.start(&e, ns, position, true)?,
            Event::End(_) => st.end(),
            Event::Text(t) => {
                if st.depth == 0 {
                    if !t.chars().all(is_xml_whitespace) {
                        return Err(malformed(position, MalformedKind::ContentOutsideRoot));
                    }
                } else if st.capturing() {
                    st.push_text(&t.xml10_content(), position)?;
                }
                Flow::Continue
            }
            Event::CData(c) => {
                if st.depth == 0 {
                    return Err(malformed(position, MalformedKind::ContentOutsideRoot));
                }
                if st.capturing() {
                    st.push_text(&c.xml10_content(), position)?;
                }
                Flow::Continue
            }
            Event::GeneralRef(r) => {
                if st.depth == 0 {
                    return Err(malformed(position, MalformedKind::ContentOutsideRoot));
                }
                if st.capturing() {
                    st.push_reference(&r, position)?;
                }
                Flow::Continue
            }
            Event::Comment(_) | Event::Decl(_) | Event::PI(_) | Event::DocType(_) => Flow::Continue,
            Event::Eof => {
                return Err(if st.root_seen {
                    malformed(position, MalformedKind::UnexpectedEof)
                } else {
                    XmlError::NoRoot
                });
            }
        };
        if let Flow::Done = flow {
            return Ok(st.facts);
        }
    }
}

/// The namespace of an element, reduced to what the parser cares about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ns {
    /// No namespace: libvirt's own elements.
    None,
    /// `http://kubevirt.io`.
    Kubevirt,
    /// Any other namespace, or an unknown prefix.
    Other,
}

impl Ns {
    fn of(resolved: &ResolveResult<'_>) -> Self {
        match resolved {
            ResolveResult::Unbound => Self::None,
            ResolveResult::Bound(ns) if ns.as_ref() == KUBEVIRT_NS => Self::Kubevirt,
            ResolveResult::Bound(_) | ResolveResult::Unknown(_) => Self::Other,
        }
    }
}

/// Which text value is being collected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Name,
    Uuid,
    Emulator,
}

impl Field {
    fn what(self) -> &'static str {
        match self {
            Self::Name => "<name> text",
            Self::Uuid => "<uuid> text",
            Self::Emulator => "<emulator> text",
        }
    }
}

/// The top-level element (child of `<domain>`) the reader is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Top {
    /// Not inside a top-level element, or inside one whose content is irrelevant.
    Other,
    Metadata,
    Os,
    Devices,
}

enum Flow {
    Continue,
    Done,
}

struct State {
    wants: Wants,
    facts: DomainFacts,
    /// Number of open elements (0 = outside the root).
    depth: usize,
    root_seen: bool,
    header_done: bool,
    top: Top,
    os_done: bool,
    /// The first `<os><type>` has been read (later ones are ignored).
    os_type_seen: bool,
    emulator_done: bool,
    /// The field being collected and the depth of its element.
    capture: Option<(Field, usize)>,
    text: String,
}

impl State {
    fn new(wants: Wants) -> Self {
        Self {
            wants,
            facts: DomainFacts::unknown(None, None),
            depth: 0,
            root_seen: false,
            header_done: false,
            top: Top::Other,
            os_done: false,
            os_type_seen: false,
            emulator_done: false,
            capture: None,
            text: String::new(),
        }
    }

    fn done(&self) -> bool {
        self.header_done
            && (!self.wants.os || self.os_done)
            && (!self.wants.emulator || self.emulator_done)
    }

    /// Text goes to the capture only when its element is the innermost open one.
    fn capturing(&self) -> bool {
        matches!(self.capture, Some((_, d)) if d == self.depth)
    }

    fn start(
        &mut self,
        e: &BytesStart<'_>,
        ns: Ns,
        position: u64,
        empty: bool,
    ) -> Result<Flow, XmlError> {
        let parent_depth = self.depth;
        let depth = parent_depth + 1;
        if depth > MAX_DEPTH {
            return Err(XmlError::TooDeep {
                position,
                limit: MAX_DEPTH,
            });
        }
        let local = e.local_name();
        let local = local.as_ref();

        match parent_depth {
            0 => {
                if self.root_seen {
                    // A second root: only reachable after `</domain>`, which returns first.
                    return Err(malformed(position, MalformedKind::ContentOutsideRoot));
                }
                if local != "domain" || ns != Ns::None {
                    return Err(XmlError::WrongRoot {
                        found: cut_name(e.name().as_ref()),
                    });
                }
                self.root_seen = true;
                self.read_root_type(e, position)?;
                self.facts.hypervisor_type =
                    HypervisorType::from_domain_type(self.facts.domain_type.as_deref());
                if empty {
                    return Ok(Flow::Done);
                }
            }
            1 => {
                self.top = Top::Other;
                let header_element = ns == Ns::None
                    && matches!(
                        local,
                        "name" | "uuid" | "genid" | "title" | "description" | "metadata"
                    );
                if !self.header_done && header_element {
                    match local {
                        "name" if self.facts.name.is_none() => {
                            self.capture = Some((Field::Name, depth));
                        }
                        "uuid" if self.facts.uuid.is_none() => {
                            self.capture = Some((Field::Uuid, depth));
                        }
                        "metadata" => self.top = Top::Metadata,
                        _ => {}
                    }
                } else {
                    self.header_done = true;
                    if self.done() {
                        return Ok(Flow::Done);
                    }
                    if ns == Ns::None {
                        match local {
                            "os" if self.wants.os && !self.os_done => self.top = Top::Os,
                            "devices" if self.wants.emulator && !self.emulator_done => {
                                self.top = Top::Devices;
                            }
                            _ => {}
                        }
                    }
                }
            }
            2 => match self.top {
                Top::Metadata => {
                    if local == "kubevirt" && ns == Ns::Kubevirt {
                        self.facts.kubevirt = true;
                    }
                }
                Top::Os => {
                    if local == "type" && ns == Ns::None && !self.os_type_seen {
                        self.os_type_seen = true;
                        self.read_os_type(e, position)?;
                    }
                }
                Top::Devices => {
                    if local == "emulator" && ns == Ns::None && !self.emulator_done {
                        self.capture = Some((Field::Emulator, depth));
                    }
                }
                Top::Other => {}
            },
            _ => {}
        }

        self.depth = depth;
        if empty {
            Ok(self.end())
        } else {
            Ok(Flow::Continue)
        }
    }

    /// Close the innermost open element (quick-xml has checked that the end tag matches).
    fn end(&mut self) -> Flow {
        let depth = self.depth;
        if let Some((field, d)) = self.capture {
            if d == depth {
                self.capture = None;
                self.finish_capture(field);
            }
        }
        self.depth = depth.saturating_sub(1);
        match depth {
            // `</domain>`: nothing after it is read.
            1 => return Flow::Done,
            2 => {
                match self.top {
                    Top::Metadata => {
                        if self.facts.name.is_some() && self.facts.uuid.is_some() {
                            self.header_done = true;
                        }
                    }
                    Top::Os => self.os_done = true,
                    Top::Devices => self.emulator_done = true,
                    Top::Other => {}
                }
                self.top = Top::Other;
            }
            _ => {}
        }
        if self.done() {
            Flow::Done
        } else {
            Flow::Continue
        }
    }

    fn finish_capture(&mut self, field: Field) {
        let text = std::mem::take(&mut self.text);
        let trimmed = text.trim_matches(is_xml_whitespace);
        let value = if trimmed.is_empty() {
            None
        } else if trimmed.len() == text.len() {
            Some(text)
        } else {
            Some(trimmed.to_owned())
        };
        match field {
            Field::Name => self.facts.name = value,
            Field::Uuid => self.facts.uuid = value,
            Field::Emulator => {
                self.facts.emulator = value;
                self.emulator_done = true;
            }
        }
    }

    fn push_text(&mut self, piece: &str, position: u64) -> Result<(), XmlError> {
        if let Some((field, _)) = self.capture {
            if self.text.len().saturating_add(piece.len()) > MAX_VALUE_LEN {
                return Err(too_long(field.what(), position));
            }
            self.text.push_str(piece);
        }
        Ok(())
    }

    fn push_reference(&mut self, r: &BytesRef<'_>, position: u64) -> Result<(), XmlError> {
        let invalid = || malformed(position, MalformedKind::InvalidReference);
        match r.resolve_char_ref() {
            Ok(Some(c)) => {
                let mut buf = [0u8; 4];
                self.push_text(c.encode_utf8(&mut buf), position)
            }
            Ok(None) => {
                let s = predefined_entity(r).ok_or_else(invalid)?;
                self.push_text(s, position)
            }
            Err(_) => Err(invalid()),
        }
    }

    /// The root's `type` attribute, and whether it has an `id` (live XML). The attribute
    /// iterator runs without its (quadratic) duplicate check; a duplicate `type` is detected here.
    fn read_root_type(&mut self, e: &BytesStart<'_>, position: u64) -> Result<(), XmlError> {
        let mut attrs = e.attributes();
        attrs.with_checks(false);
        for attr in attrs {
            let attr = attr.map_err(|_| malformed(position, MalformedKind::InvalidAttribute))?;
            if attr.key.as_ref() == "type" {
                if self.facts.domain_type.is_some() {
                    return Err(malformed(position, MalformedKind::DuplicateTypeAttribute));
                }
                self.facts.domain_type = Some(attr_value(&attr, "root type attribute", position)?);
            } else if attr.key.as_ref() == "id" {
                self.facts.live = true;
            }
        }
        Ok(())
    }

    /// `<os><type arch='…' machine='…'>` (duplicate attributes are not checked: first wins).
    fn read_os_type(&mut self, e: &BytesStart<'_>, position: u64) -> Result<(), XmlError> {
        let mut attrs = e.attributes();
        attrs.with_checks(false);
        for attr in attrs {
            let attr = attr.map_err(|_| malformed(position, MalformedKind::InvalidAttribute))?;
            match attr.key.as_ref() {
                "arch" if self.facts.arch.is_none() => {
                    self.facts.arch = non_empty(attr_value(&attr, "os arch attribute", position)?);
                }
                "machine" if self.facts.machine.is_none() => {
                    self.facts.machine =
                        non_empty(attr_value(&attr, "os machine attribute", position)?);
                }
                _ => {}
            }
        }
        Ok(())
    }
}

fn attr_value(
    attr: &quick_xml::events::attributes::Attribute<'_>,
    what: &'static str,
    position: u64,
) -> Result<String, XmlError> {
    // Borrowed unless normalization changes something, so a huge value is checked, not copied.
    let value = attr
        .normalized_value(XmlVersion::Implicit1_0)
        .map_err(|_| malformed(position, MalformedKind::InvalidReference))?;
    if value.len() > MAX_VALUE_LEN {
        return Err(too_long(what, position));
    }
    Ok(value.into_owned())
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn predefined_entity(name: &str) -> Option<&'static str> {
    match name {
        "amp" => Some("&"),
        "lt" => Some("<"),
        "gt" => Some(">"),
        "apos" => Some("'"),
        "quot" => Some("\""),
        _ => None,
    }
}

fn is_xml_whitespace(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n')
}

/// An element name for an error message: at most [`MAX_NAME_IN_ERROR`] bytes, on a char
/// boundary, with anything but name characters replaced.
fn cut_name(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        let c = if c.is_alphanumeric() || matches!(c, ':' | '_' | '-' | '.') {
            c
        } else {
            '?'
        };
        if out.len() + c.len_utf8() > MAX_NAME_IN_ERROR {
            out.push('…');
            break;
        }
        out.push(c);
    }
    out
}

fn malformed(position: u64, kind: MalformedKind) -> XmlError {
    XmlError::Malformed { position, kind }
}

fn too_long(what: &'static str, position: u64) -> XmlError {
    XmlError::ValueTooLong {
        what,
        position,
        limit: MAX_VALUE_LEN,
    }
}

/// Map a quick-xml error to ours, dropping anything that could carry document content.
fn map_quick_xml_error(err: &quick_xml::Error, position: u64) -> XmlError {
    use quick_xml::Error as E;
    let kind = match err {
        E::Encoding(_) => return XmlError::NotUtf8 { position },
        E::Syntax(s) => MalformedKind::Syntax(*s),
        E::IllFormed(i) => match i {
            IllFormedError::MismatchedEndTag { .. }
            | IllFormedError::UnmatchedEndTag(_)
            | IllFormedError::MissingEndTag(_) => MalformedKind::MismatchedEndTag,
            IllFormedError::UnclosedReference => MalformedKind::InvalidReference,
            _ => MalformedKind::IllFormedMarkup,
        },
        E::InvalidAttr(_) => MalformedKind::InvalidAttribute,
        E::Escape(_) => MalformedKind::InvalidReference,
        E::Namespace(_) => MalformedKind::Namespace,
        E::Io(_) => MalformedKind::Io,
    };
    malformed(position, kind)
}

#[cfg(test)]
mod tests;
