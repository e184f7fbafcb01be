//! Comparing and copying values across documents: a value's [`Content`], detached from its
//! document, so values of two documents compare by kind and content (never identity), and
//! deep copies (`In`/`XmlIn` preliminaries) to insert into the live document.
//!
//! Owns: [`Content`], copying, and what cannot be copied ([`NotCopyable`]). Must not
//! touch: the live document (it only builds preliminaries the caller inserts).

use std::collections::BTreeMap;

use yrs::types::text::YChange;
use yrs::types::xml::XmlIn;
use yrs::types::{AsPrelim, Attrs};
use yrs::{Any, Array, In, Map, Out, ReadTxn, Text, Xml, XmlFragment};

/// What cannot be copied into the live document (see [`Content::ensure_copyable`]).
pub(super) type NotCopyable = &'static str;

pub(super) fn xml_children<X: XmlFragment, T: ReadTxn>(node: &X, txn: &T) -> Vec<Out> {
    node.children(txn).map(Out::from).collect()
}

pub(super) fn plain_if_empty(attrs: Option<&Attrs>) -> Option<&Attrs> {
    attrs.filter(|attrs| !attrs.is_empty())
}

/// A value's content, detached from its document, so that values of two documents can be
/// compared: shared types are equal when their kind and content are, never by identity.
#[derive(Debug, PartialEq)]
pub(super) enum Content {
    /// `Any`'s own equality: `1` (an integer) equals `1.0` (a float), as in JavaScript.
    Primitive(Any),
    Map(BTreeMap<String, Content>),
    Array(Vec<Content>),
    /// Chunks as a text diff gives them: strings and embeds, each with its formatting.
    Text(Vec<(Content, Option<Attrs>)>),
    XmlElement {
        tag: Option<String>,
        /// XML attributes are strings in Yjs (and copied as such), so compared as strings.
        attributes: BTreeMap<String, String>,
        children: Vec<Content>,
    },
    XmlText {
        attributes: BTreeMap<String, String>,
        text: Vec<(Content, Option<Attrs>)>,
    },
    XmlFragment(Vec<Content>),
    Subdocument(String),
    /// A branch of a type yrs does not know here (a weak link, an XML hook).
    Unknown,
}

impl Content {
    pub(super) fn of<T: ReadTxn>(value: &Out, txn: &T) -> Content {
        match value {
            Out::Any(any) => Content::Primitive(any.clone()),
            Out::YMap(map) => Content::Map(
                map.iter(txn)
                    .map(|(key, item)| (key.to_string(), Content::of(&item, txn)))
                    .collect(),
            ),
            Out::YArray(array) => Content::Array(Content::of_all(array.iter(txn), txn)),
            Out::YText(text) => Content::Text(Content::of_text(text, txn)),
            Out::YXmlElement(element) => Content::XmlElement {
                tag: element.try_tag().map(|tag| tag.to_string()),
                attributes: attribute_strings(element, txn),
                children: Content::of_all(xml_children(element, txn), txn),
            },
            Out::YXmlText(text) => Content::XmlText {
                attributes: attribute_strings(text, txn),
                text: Content::of_text(text, txn),
            },
            Out::YXmlFragment(fragment) => {
                Content::XmlFragment(Content::of_all(xml_children(fragment, txn), txn))
            }
            Out::YDoc(doc) => Content::Subdocument(doc.guid().to_string()),
            _ => Content::Unknown,
        }
    }

    pub(super) fn of_all<T: ReadTxn>(
        values: impl IntoIterator<Item = Out>,
        txn: &T,
    ) -> Vec<Content> {
        values.into_iter().map(|v| Content::of(&v, txn)).collect()
    }

    fn of_text<X: Text, T: ReadTxn>(text: &X, txn: &T) -> Vec<(Content, Option<Attrs>)> {
        text.diff(txn, YChange::identity)
            .into_iter()
            .map(|chunk| {
                let attrs = plain_if_empty(chunk.attributes.as_deref()).cloned();
                (Content::of(&chunk.insert, txn), attrs)
            })
            .collect()
    }

    /// yrs deep-copies every shared type but a subdocument (it would be one document linked
    /// twice) and a branch of a type it does not know.
    fn ensure_copyable(&self) -> Result<(), NotCopyable> {
        match self {
            Content::Primitive(_) => Ok(()),
            Content::Map(entries) => entries.values().try_for_each(Content::ensure_copyable),
            Content::Array(items)
            | Content::XmlFragment(items)
            | Content::XmlElement {
                children: items, ..
            } => items.iter().try_for_each(Content::ensure_copyable),
            Content::Text(chunks) | Content::XmlText { text: chunks, .. } => chunks
                .iter()
                .try_for_each(|(chunk, _)| chunk.ensure_copyable()),
            Content::Subdocument(_) => Err("a subdocument"),
            Content::Unknown => Err("a shared type of an unknown kind (a weak link or XML hook)"),
        }
    }
}

fn attribute_strings<X: Xml, T: ReadTxn>(node: &X, txn: &T) -> BTreeMap<String, String> {
    node.attributes(txn)
        .map(|(key, value)| (key.to_string(), value.to_string(txn)))
        .collect()
}

/// A deep copy of the snapshot's `value` (whose content is `content`), to insert in the live
/// document: primitives as they are, shared types as new ones with the same content.
pub(super) fn copy_of<T: ReadTxn>(
    value: &Out,
    content: &Content,
    txn: &T,
) -> Result<In, NotCopyable> {
    content.ensure_copyable()?;
    Ok(value.as_prelim(txn))
}

pub(super) fn copy_xml_node<T: ReadTxn>(
    node: &Out,
    content: &Content,
    txn: &T,
) -> Result<XmlIn, NotCopyable> {
    content.ensure_copyable()?;
    match node {
        Out::YXmlElement(element) => Ok(XmlIn::from(element.as_prelim(txn))),
        Out::YXmlText(text) => Ok(XmlIn::from(text.as_prelim(txn))),
        Out::YXmlFragment(fragment) => Ok(XmlIn::from(fragment.as_prelim(txn))),
        _ => Err("a value that is not an XML node inside an XML fragment"),
    }
}
