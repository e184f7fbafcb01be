//! Texts as sequences of units for a restore: one per character (or embed) with the
//! formatting around it, so the diff keeps what did not change, and the delta inserts that
//! write units back. Offsets count in the live document's unit (bytes or UTF-16).
//!
//! Owns: [`TextUnit`], reading and writing units. Must not touch: the diff (see
//! [`super::diff`]) or how embedded values are copied (see [`super::copy`]).

use yrs::types::text::{Diff, YChange};
use yrs::types::{Attrs, Delta};
use yrs::{Any, In, OffsetKind, Out, ReadTxn};

use super::copy::{copy_of, plain_if_empty, Content, NotCopyable};

/// One visible unit of a text (a character or an embed) with the formatting around it.
pub(super) struct TextUnit<'a> {
    content: UnitContent<'a>,
    attrs: Option<&'a Attrs>,
}

enum UnitContent<'a> {
    Char(char),
    Embed { value: &'a Out, content: Content },
}

pub(super) fn text_units<'a, T: ReadTxn>(
    chunks: &'a [Diff<YChange>],
    txn: &T,
) -> Vec<TextUnit<'a>> {
    let mut units = Vec::new();
    for chunk in chunks {
        let attrs = plain_if_empty(chunk.attributes.as_deref());
        match &chunk.insert {
            Out::Any(Any::String(s)) => units.extend(s.chars().map(|c| TextUnit {
                content: UnitContent::Char(c),
                attrs,
            })),
            embed => units.push(TextUnit {
                content: UnitContent::Embed {
                    value: embed,
                    content: Content::of(embed, txn),
                },
                attrs,
            }),
        }
    }
    units
}

impl TextUnit<'_> {
    /// Its length in text offsets: what yrs counts for `offset_kind`; an embed counts one.
    pub(super) fn len(&self, offset_kind: OffsetKind) -> u32 {
        match (&self.content, offset_kind) {
            (UnitContent::Char(c), OffsetKind::Bytes) => c.len_utf8() as u32,
            (UnitContent::Char(c), OffsetKind::Utf16) => c.len_utf16() as u32,
            (UnitContent::Embed { .. }, _) => 1,
        }
    }

    pub(super) fn same_as(&self, other: &TextUnit) -> bool {
        let same_content = match (&self.content, &other.content) {
            (UnitContent::Char(a), UnitContent::Char(b)) => a == b,
            (UnitContent::Embed { content: a, .. }, UnitContent::Embed { content: b, .. }) => {
                a == b
            }
            _ => false,
        };
        same_content && self.attrs == other.attrs
    }
}

/// The delta inserts that write `units`: runs of characters with the same formatting become
/// one string chunk; embeds are copied one by one.
pub(super) fn insertions<T: ReadTxn>(
    units: &[TextUnit],
    txn: &T,
) -> Result<Vec<Delta<In>>, NotCopyable> {
    fn flush(run: &mut String, attrs: Option<&Attrs>, deltas: &mut Vec<Delta<In>>) {
        if !run.is_empty() {
            let chunk = In::Any(Any::from(std::mem::take(run)));
            deltas.push(Delta::Inserted(chunk, attrs.cloned().map(Box::new)));
        }
    }
    let mut deltas = Vec::new();
    let mut run = String::new();
    let mut run_attrs: Option<&Attrs> = None;
    for unit in units {
        if unit.attrs != run_attrs {
            flush(&mut run, run_attrs, &mut deltas);
            run_attrs = unit.attrs;
        }
        match &unit.content {
            UnitContent::Char(c) => run.push(*c),
            UnitContent::Embed { value, content } => {
                flush(&mut run, run_attrs, &mut deltas);
                let embed = copy_of(value, content, txn)?;
                deltas.push(Delta::Inserted(embed, unit.attrs.cloned().map(Box::new)));
            }
        }
    }
    flush(&mut run, run_attrs, &mut deltas);
    Ok(deltas)
}
