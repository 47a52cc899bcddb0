//! The copy of a message that goes to the dead-letter queue, and how redrive undoes it.
//!
//! SQS allows 10 message attributes and 256 KiB (body plus attribute names, types and
//! values) per message, and ferry adds up to four of its own. So that the copy is the same
//! whatever order the original's attributes came in, and nothing is dropped without a
//! word:
//!
//! 1. ferry's own attributes come first (reason, attempts, route, last status);
//! 2. then the original attributes in name order, as long as there is room;
//! 3. the originals that do not fit travel together as JSON in one attribute,
//!    [`ORIGINAL_ATTRIBUTES`] (`{"name": {"DataType": ..., "StringValue" | "BinaryValue": ...}}`,
//!    binary values in base64), which redrive unpacks again.
//!
//! A copy that would exceed the size limit still goes out, smaller: first the reason is
//! cut, then the JSON attribute goes, then original attributes from the last, then
//! ferry's own. Whatever had to go is named in a warning. A copy SQS refuses would
//! otherwise return to the queue and fail the same way forever.

use std::collections::{BTreeMap, HashMap};

use aws_sdk_sqs::primitives::Blob;
use aws_sdk_sqs::types::MessageAttributeValue;
use base64::Engine as _;
use ferry_core::DeadLetter;
use serde::{Deserialize, Serialize};

use crate::convert::Original;

/// The attribute that carries, as JSON, the original attributes that did not fit.
pub const ORIGINAL_ATTRIBUTES: &str = "ferry_original_attributes";
/// The dead-letter reason.
pub(crate) const REASON: &str = "ferry_dead_letter_reason";
/// How many attempts were made.
pub(crate) const ATTEMPTS: &str = "ferry_attempts";
/// The route that dead-lettered the message.
pub(crate) const ROUTE: &str = "ferry_route";
/// The endpoint's last status, or what the last attempt came to (`timeout`, `error`).
pub(crate) const LAST_STATUS: &str = "ferry_last_status";

/// SQS's limit on message attributes per message.
const MAX_ATTRIBUTES: usize = 10;
/// SQS's limit on a message: body and attributes (names, types and values) together.
pub(crate) const MAX_SIZE: usize = 262_144;
/// The longest reason kept, in characters.
const MAX_REASON_CHARS: usize = 1024;

/// A dead letter ready to send.
#[derive(Debug)]
pub(crate) struct Copy {
    pub(crate) body: String,
    /// In the order described in the module documentation.
    pub(crate) attributes: Vec<(String, MessageAttributeValue)>,
    /// Attributes left out to stay within the size limit (for the warning).
    pub(crate) dropped: Vec<String>,
}

/// One attribute in [`ORIGINAL_ATTRIBUTES`], spelled as the SQS API spells it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Packed {
    data_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    string_value: Option<String>,
    /// Base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    binary_value: Option<String>,
}

/// Builds the dead-letter copy of `original`.
pub(crate) fn copy(original: Original, dl: &DeadLetter, route: &str) -> Copy {
    let mut reason: String = dl.reason.chars().take(MAX_REASON_CHARS).collect();
    if reason.is_empty() {
        reason.push('-');
    }
    let mut own = vec![
        (REASON.to_owned(), string(reason)),
        (ATTEMPTS.to_owned(), number(dl.attempts.to_string())),
        (ROUTE.to_owned(), string(route.to_owned())),
    ];
    // A status as a number; without one, what the last attempt came to (`timeout`).
    match dl.status {
        Some(status) => own.push((LAST_STATUS.to_owned(), number(status.to_string()))),
        None => own.push((LAST_STATUS.to_owned(), string(dl.last_status()))),
    }
    // An original that shares a name with one of ferry's own is packed, so neither is lost.
    let (clashing, sorted): (BTreeMap<_, _>, BTreeMap<_, _>) = original
        .attributes
        .into_iter()
        .partition(|(name, _)| own.iter().any(|(o, _)| o == name));
    let room = MAX_ATTRIBUTES - own.len();
    let mut direct: Vec<(String, MessageAttributeValue)> = sorted.into_iter().collect();
    let mut packed: BTreeMap<String, MessageAttributeValue> = clashing;
    if direct.len() + usize::from(!packed.is_empty()) > room {
        for (name, value) in direct.split_off(room - 1) {
            packed.insert(name, value);
        }
    }
    let packed_names: Vec<String> = packed.keys().cloned().collect();
    let mut packed = (!packed.is_empty()).then(|| (ORIGINAL_ATTRIBUTES.to_owned(), pack(packed)));

    let mut copy = Copy {
        body: original.body,
        attributes: Vec::new(),
        dropped: Vec::new(),
    };
    let size = |own: &[(String, MessageAttributeValue)],
                direct: &[(String, MessageAttributeValue)],
                packed: &Option<(String, MessageAttributeValue)>| {
        own.iter()
            .chain(direct)
            .chain(packed)
            .map(|(n, v)| attribute_size(n, v))
            .sum::<usize>()
    };
    let over = |attributes: usize| (copy.body.len() + attributes).saturating_sub(MAX_SIZE);
    // 1. A shorter reason.
    let excess = over(size(&own, &direct, &packed));
    if excess > 0 {
        if let Some(text) = own[0].1.string_value.as_deref() {
            let keep = text.len().saturating_sub(excess).max(1);
            own[0].1 = string(cut(text, keep));
        }
    }
    // 2. No JSON attribute.
    if over(size(&own, &direct, &packed)) > 0 && packed.take().is_some() {
        copy.dropped.extend(packed_names);
    }
    // 3. Originals, from the last; 4. ferry's own, from the last.
    while over(size(&own, &direct, &packed)) > 0 {
        let Some((name, _)) = direct.pop().or_else(|| own.pop()) else {
            break;
        };
        copy.dropped.push(name);
    }
    copy.attributes = own.into_iter().chain(direct).chain(packed).collect();
    copy
}

/// The attributes a redriven message goes back with: ferry's own removed, the packed
/// originals unpacked. Errors name what could not be unpacked; the caller keeps
/// [`ORIGINAL_ATTRIBUTES`] as it is then, so nothing is lost.
pub(crate) fn restore(
    attributes: &HashMap<String, MessageAttributeValue>,
) -> Result<Vec<(String, MessageAttributeValue)>, String> {
    let mut restored: Vec<(String, MessageAttributeValue)> = attributes
        .iter()
        .filter(|(name, _)| !crate::DEAD_LETTER_ATTRIBUTES.contains(&name.as_str()))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    if let Some(packed) = attributes.get(ORIGINAL_ATTRIBUTES) {
        let text = packed.string_value.as_deref().unwrap_or_default();
        let unpacked: BTreeMap<String, Packed> = serde_json::from_str(text)
            .map_err(|e| format!("{ORIGINAL_ATTRIBUTES}: not the JSON ferry writes: {e}"))?;
        for (name, p) in unpacked {
            restored.push((name.clone(), unpack(&name, p)?));
        }
    }
    restored.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(restored)
}

fn pack(attributes: BTreeMap<String, MessageAttributeValue>) -> MessageAttributeValue {
    let packed: BTreeMap<String, Packed> = attributes
        .into_iter()
        .map(|(name, v)| {
            let p = Packed {
                data_type: v.data_type,
                string_value: v.string_value,
                binary_value: v
                    .binary_value
                    .map(|b| base64::engine::general_purpose::STANDARD.encode(b.as_ref())),
            };
            (name, p)
        })
        .collect();
    // Maps of strings always serialise.
    string(serde_json::to_string(&packed).unwrap_or_default())
}

fn unpack(name: &str, p: Packed) -> Result<MessageAttributeValue, String> {
    let binary = p
        .binary_value
        .map(|b| base64::engine::general_purpose::STANDARD.decode(b))
        .transpose()
        .map_err(|e| format!("{ORIGINAL_ATTRIBUTES}: {name}: BinaryValue is not base64: {e}"))?;
    MessageAttributeValue::builder()
        .data_type(p.data_type)
        .set_string_value(p.string_value)
        .set_binary_value(binary.map(Blob::new))
        .build()
        .map_err(|e| format!("{ORIGINAL_ATTRIBUTES}: {name}: {e}"))
}

/// What SQS counts of an attribute toward the message size.
pub(crate) fn attribute_size(name: &str, value: &MessageAttributeValue) -> usize {
    name.len()
        + value.data_type.len()
        + value.string_value.as_ref().map_or(0, String::len)
        + value.binary_value.as_ref().map_or(0, |b| b.as_ref().len())
}

/// The longest prefix of `text` of at most `bytes` bytes that ends on a character.
fn cut(text: &str, bytes: usize) -> String {
    let mut end = bytes.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

pub(crate) fn string(value: String) -> MessageAttributeValue {
    attr("String", value)
}

fn number(value: String) -> MessageAttributeValue {
    attr("Number", value)
}

fn attr(kind: &str, value: String) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type(kind)
        .string_value(value)
        .build()
        .expect("data_type is always set")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn original(n: usize, body: &str) -> Original {
        Original {
            body: body.to_owned(),
            attributes: (0..n)
                .map(|i| (format!("a{i:02}"), string(format!("v{i}"))))
                .collect(),
            group: None,
        }
    }

    fn dead(status: Option<u16>) -> DeadLetter {
        DeadLetter {
            reason: "bad".to_owned(),
            status,
            last_class: if status.is_some() { "4xx" } else { "timeout" },
            attempts: 2,
        }
    }

    fn names(copy: &Copy) -> Vec<&str> {
        copy.attributes.iter().map(|(n, _)| n.as_str()).collect()
    }

    #[test]
    fn few_attributes_are_copied_as_they_are() {
        let copy = copy(original(3, "x"), &dead(Some(400)), "r");
        assert_eq!(
            names(&copy),
            [REASON, ATTEMPTS, ROUTE, LAST_STATUS, "a00", "a01", "a02"]
        );
        assert!(copy.dropped.is_empty());
    }

    #[test]
    fn what_does_not_fit_is_packed_and_restored() {
        let original = original(12, "x");
        let expected: BTreeMap<String, MessageAttributeValue> =
            original.attributes.clone().into_iter().collect();
        let copy = copy(original, &dead(Some(400)), "r");
        assert_eq!(
            names(&copy),
            [
                REASON,
                ATTEMPTS,
                ROUTE,
                LAST_STATUS,
                "a00",
                "a01",
                "a02",
                "a03",
                "a04",
                ORIGINAL_ATTRIBUTES
            ]
        );
        let stored: HashMap<String, MessageAttributeValue> = copy.attributes.into_iter().collect();
        let restored: BTreeMap<String, MessageAttributeValue> =
            restore(&stored).expect("restores").into_iter().collect();
        assert_eq!(restored, expected);
    }

    #[test]
    fn the_order_does_not_depend_on_the_hash_order() {
        let a = copy(original(12, "x"), &dead(None), "r");
        for _ in 0..20 {
            let b = copy(original(12, "x"), &dead(None), "r");
            assert_eq!(format!("{:?}", a.attributes), format!("{:?}", b.attributes));
        }
    }

    #[test]
    fn binary_and_clashing_originals_survive_the_round_trip() {
        let mut original = original(9, "x");
        let blob = MessageAttributeValue::builder()
            .data_type("Binary")
            .binary_value(Blob::new(vec![0u8, 1, 255]))
            .build()
            .expect("attribute");
        original.attributes.insert("zz".to_owned(), blob.clone());
        original
            .attributes
            .insert(ROUTE.to_owned(), string("theirs".to_owned()));
        let copy = copy(original, &dead(None), "r");
        assert!(copy.attributes.len() <= MAX_ATTRIBUTES);
        let stored: HashMap<String, MessageAttributeValue> = copy.attributes.into_iter().collect();
        assert_eq!(stored[ROUTE].string_value.as_deref(), Some("r"));
        let restored: HashMap<String, MessageAttributeValue> =
            restore(&stored).expect("restores").into_iter().collect();
        assert_eq!(restored.len(), 11);
        assert_eq!(restored["zz"], blob);
        assert_eq!(restored[ROUTE].string_value.as_deref(), Some("theirs"));
    }

    #[test]
    fn a_copy_near_the_size_limit_gives_up_the_reason_then_the_packed_attributes() {
        let body = "b".repeat(MAX_SIZE - 600);
        let mut dl = dead(Some(400));
        dl.reason = "r".repeat(1000);
        let copy = copy(original(12, &body), &dl, "r");
        let size = copy.body.len()
            + copy
                .attributes
                .iter()
                .map(|(n, v)| attribute_size(n, v))
                .sum::<usize>();
        assert!(size <= MAX_SIZE, "{size}");
        assert!(
            names(&copy).contains(&ORIGINAL_ATTRIBUTES),
            "{:?}",
            copy.dropped
        );
        assert!(copy.dropped.is_empty());
        let reason = copy.attributes[0]
            .1
            .string_value
            .as_deref()
            .unwrap_or_default();
        assert!(
            !reason.is_empty() && reason.len() < 1000,
            "{}",
            reason.len()
        );

        let body = "b".repeat(MAX_SIZE - 100);
        let copy = super::copy(original(12, &body), &dl, "r");
        assert!(!names(&copy).contains(&ORIGINAL_ATTRIBUTES));
        assert!(
            copy.dropped.contains(&"a11".to_owned()),
            "{:?}",
            copy.dropped
        );

        let body = "b".repeat(MAX_SIZE);
        let copy = super::copy(original(2, &body), &dl, "r");
        assert!(copy.attributes.is_empty(), "{:?}", names(&copy));
        assert_eq!(copy.body.len(), MAX_SIZE);
    }

    #[test]
    fn packed_attributes_that_are_not_ferrys_json_are_an_error() {
        let stored = HashMap::from([(ORIGINAL_ATTRIBUTES.to_owned(), string("{".to_owned()))]);
        let e = restore(&stored).expect_err("not JSON");
        assert!(e.starts_with(ORIGINAL_ATTRIBUTES), "{e}");
    }
}
