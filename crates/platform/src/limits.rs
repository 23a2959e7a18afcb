//! Length limits of every string and list a request can carry, as the
//! contract declares them, checked on the encoded request before any
//! handler (and so before any database work) runs.
//!
//! Every string, bytes and repeated field reachable from an RPC's input
//! message carries the field option `(agora.common.v1.limits)`
//! (`proto/agora/common/v1/limits.proto`): `max_bytes` for a string or
//! bytes value (UTF-8 bytes; each element of a repeated one), `max_items`
//! for a list. Clients in any language read them from the same contract.
//! [`LimitsTable`] compiles them, per RPC input type, from an encoded
//! `FileDescriptorSet` (the contract's is [`agora_proto::FILE_DESCRIPTOR_SET`]).
//!
//! [`LimitsTable::check`] walks the protobuf wire bytes of a request
//! without decoding them: varint keys, length-delimited fields, nested
//! messages and packed lists, in one pass (O(bytes)), allocating nothing per
//! field, nesting bounded by [`MAX_NESTING`]. It answers INVALID_ARGUMENT
//! with a `google.rpc.BadRequest` naming each field over its limit the way
//! services name fields (`items[3].product_id`, `product.categories[2]`), at
//! most [`MAX_VIOLATIONS`] of them (and how many more there were): lists
//! over their `max_items` first, then values in wire order. Elements past a
//! list's `max_items` are not looked into. Strings must be valid UTF-8.
//! Wire data prost could not decode is INVALID_ARGUMENT "malformed request
//! message", reason `MALFORMED_MESSAGE`: a client's mistake, which tonic
//! would otherwise answer with INTERNAL.
//!
//! [`RequestLimitsLayer`] runs the check in every server ([`crate::server`])
//! for the unary-request RPCs of the services it hosts: it reads the one
//! request message whole (never more than `server.max_request_bytes` plus
//! its 5-byte frame header, refused with RESOURCE_EXHAUSTED on the length
//! prefix alone when larger), checks it, and hands the same bytes to the
//! handler. What all calls together hold buffered is bounded too: a
//! message is read only once its length is granted by the server's
//! [`RequestBudget`] (`server.max_buffered_request_bytes`), else refused at
//! once with RESOURCE_EXHAUSTED (`OVERLOADED`) and `RetryInfo`; nothing is
//! allocated for it before. And the message must arrive whole within
//! `server.body_read_timeout_ms` of the call's headers, whatever deadline
//! the caller states, else DEADLINE_EXCEEDED: a caller that stalls its body
//! holds neither a slot nor buffered bytes for long.
//!
//! Limits are outer bounds: services still apply their own rules within
//! them (a product name is at most 200 characters, an id is a UUID).
//!
//! A singular message field sent several times is merged by decoders; the
//! walk checks each occurrence on its own, so lists split across such
//! occurrences are counted per occurrence (still bounded by the message
//! size, and counted again by the service).

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::pin::pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf as _, Bytes, BytesMut};
use futures::future::BoxFuture;
use http_body_util::BodyExt as _;
use prost_reflect::{
    DescriptorPool, ExtensionDescriptor, FieldDescriptor, Kind, MessageDescriptor,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::ServerConfig;
use crate::error::{Error, ErrorKind, Violations};

pub use crate::error::MAX_VIOLATIONS;

/// The full name of the field option declaring a field's limits.
pub const LIMITS_EXTENSION: &str = "agora.common.v1.limits";

/// How deep messages (and groups of unknown fields) may nest in a request.
/// The contract nests three levels at most; a deeper request is malformed,
/// so a crafted one cannot exhaust the stack.
pub const MAX_NESTING: usize = 32;

/// The gRPC frame header: a compression flag and a big-endian length.
const FRAME_HEADER: usize = 5;

/// The `ErrorInfo` reason of a request whose wire data does not decode.
pub const MALFORMED_MESSAGE: &str = "MALFORMED_MESSAGE";
/// The `ErrorInfo` reason of a request message over the size limit.
pub const MESSAGE_TOO_LARGE: &str = "MESSAGE_TOO_LARGE";

/// The declared limits of one field; `None` means none declared (a 0 in
/// the option is "not set", as proto3 has it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FieldLimits {
    /// The most bytes a string or bytes value may have.
    pub max_bytes: Option<u32>,
    /// The most elements a repeated field may have.
    pub max_items: Option<u32>,
}

/// Limits of fields of well-known types, which the contract cannot
/// annotate; `limits.proto` documents them for clients.
pub const WELL_KNOWN_LIMITS: [(&str, FieldLimits); 1] = [(
    "google.protobuf.FieldMask.paths",
    FieldLimits {
        max_bytes: Some(128),
        max_items: Some(16),
    },
)];

/// The description of a value over its `max_bytes`.
pub fn too_long(max_bytes: u32) -> String {
    format!("must be at most {max_bytes} bytes")
}

/// The description of a list over its `max_items`.
pub fn too_many(max_items: u32) -> String {
    format!("must have at most {max_items} items")
}

/// The description of a string that is not UTF-8.
pub const NOT_UTF8: &str = "must be valid UTF-8";

/// The limits of every request message of a contract. Cheap to clone.
#[derive(Clone, Debug)]
pub struct LimitsTable {
    inner: Arc<TableInner>,
}

#[derive(Debug)]
struct TableInner {
    /// Compiled rules of every message reachable from an RPC input.
    messages: Vec<MessageRules>,
    /// Message full name -> index in `messages`.
    by_name: HashMap<String, usize>,
    /// gRPC path -> the RPC's request.
    methods: HashMap<String, MethodRequest>,
    /// Reachable string, bytes and repeated fields that have no limit.
    unlimited: Vec<String>,
}

/// What the layer needs to know of one RPC.
#[derive(Clone, Debug)]
struct MethodRequest {
    /// The full service name, e.g. `agora.orders.v1.OrderService`.
    service: String,
    /// The input message, in `messages`.
    input: usize,
    /// Whether the client sends a stream of messages.
    client_streaming: bool,
}

#[derive(Debug, Default)]
struct MessageRules {
    /// Known fields, by ascending number.
    fields: Vec<FieldRule>,
    /// How many of them are repeated (each has a counter slot).
    repeated: usize,
}

impl MessageRules {
    fn field(&self, number: u32) -> Option<&FieldRule> {
        self.fields
            .binary_search_by_key(&number, |field| field.number)
            .ok()
            .and_then(|index| self.fields.get(index))
    }
}

#[derive(Debug)]
struct FieldRule {
    number: u32,
    /// The field's name in violation paths.
    name: Box<str>,
    shape: Shape,
    /// The counter slot of a repeated field (or map) in its message.
    slot: Option<usize>,
    max_items: Option<u32>,
}

/// What a field holds, as far as the walk cares.
#[derive(Clone, Copy, Debug)]
enum Shape {
    /// int32, int64, uint32, uint64, sint32, sint64, bool, enum.
    Varint,
    /// fixed32, sfixed32, float.
    Fixed32,
    /// fixed64, sfixed64, double.
    Fixed64,
    /// A string: UTF-8, at most this many bytes.
    Text(Option<u32>),
    /// Bytes: at most this many.
    Bytes(Option<u32>),
    /// A message, by index in the table.
    Message(usize),
    /// A proto2 group: skipped, never looked into.
    Group,
}

impl LimitsTable {
    /// The limits of every RPC input (and the messages inside it) of an
    /// encoded `FileDescriptorSet`. FAILED_PRECONDITION when it does not
    /// decode, or when a field declares a limit that means nothing for it
    /// (`max_bytes` on a number, `max_items` on a singular field).
    pub fn from_descriptor_set(bytes: &[u8]) -> Result<Self, Error> {
        Self::from_pool(&crate::access::decode_descriptor_set(bytes)?)
    }

    /// As [`LimitsTable::from_descriptor_set`], from decoded descriptors.
    pub fn from_pool(pool: &DescriptorPool) -> Result<Self, Error> {
        let extension = pool.get_extension_by_name(LIMITS_EXTENSION);
        let misplaced: Vec<String> = pool
            .all_messages()
            .flat_map(|message| message.fields().collect::<Vec<_>>())
            .filter_map(|field| misplaced_limit(&field, extension.as_ref()))
            .collect();
        if !misplaced.is_empty() {
            return Err(Error::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "`({LIMITS_EXTENSION})` declared where it means nothing: {}",
                    misplaced.join(", ")
                ),
            ));
        }
        let mut compiler = Compiler {
            extension,
            messages: Vec::new(),
            by_name: HashMap::new(),
            pending: Vec::new(),
            unlimited: Vec::new(),
        };
        let mut methods = HashMap::new();
        for service in pool.services() {
            for method in service.methods() {
                let input = compiler.index_of(&method.input());
                methods.insert(
                    format!("/{}/{}", service.full_name(), method.name()),
                    MethodRequest {
                        service: service.full_name().to_owned(),
                        input,
                        client_streaming: method.is_client_streaming(),
                    },
                );
            }
        }
        compiler.run();
        let Compiler {
            messages,
            by_name,
            mut unlimited,
            ..
        } = compiler;
        unlimited.sort();
        Ok(Self {
            inner: Arc::new(TableInner {
                messages,
                by_name,
                methods,
                unlimited,
            }),
        })
    }

    /// The table of the Agora contract ([`agora_proto::FILE_DESCRIPTOR_SET`]),
    /// built once per process from the descriptors the contract's
    /// [`AccessTable`](crate::access::AccessTable) already decoded.
    pub fn contract() -> Result<&'static LimitsTable, Error> {
        static CONTRACT: OnceLock<Result<LimitsTable, String>> = OnceLock::new();
        crate::access::built_once(&CONTRACT, || {
            Self::from_pool(crate::access::AccessTable::contract()?.pool())
        })
    }

    /// The limits `field` has: declared with `(agora.common.v1.limits)` in
    /// `pool`, or, for fields of well-known types, [`WELL_KNOWN_LIMITS`].
    pub fn limits_of(pool: &DescriptorPool, field: &FieldDescriptor) -> FieldLimits {
        let extension = pool.get_extension_by_name(LIMITS_EXTENSION);
        field_limits(field, extension.as_ref())
    }

    /// The string, bytes and repeated fields reachable from an RPC input
    /// that declare no limit, by full name with what is missing (for
    /// example `agora.foo.v1.Bar.name (max_bytes)`); empty for a complete
    /// contract. Such fields are only checked for UTF-8 and wire format.
    pub fn unlimited_fields(&self) -> &[String] {
        &self.inner.unlimited
    }

    /// Whether `message` (full name) is an RPC input or inside one.
    pub fn covers(&self, message: &str) -> bool {
        self.inner.by_name.contains_key(message)
    }

    /// Checks the encoded `message` (protobuf wire bytes) of type
    /// `message_type` (full name) against the limits. `Ok` for a type the
    /// table does not cover.
    pub fn check(&self, message_type: &str, message: &[u8]) -> Result<(), Error> {
        match self.inner.by_name.get(message_type) {
            Some(&index) => self.check_index(index, message),
            None => Ok(()),
        }
    }

    fn check_index(&self, index: usize, message: &[u8]) -> Result<(), Error> {
        let mut walk = Walk {
            messages: &self.inner.messages,
            path: String::new(),
            counters: Vec::new(),
            lists: Violations::default(),
            values: Violations::default(),
        };
        walk.message(index, message, 0).map_err(|problem| {
            Error::new(
                ErrorKind::InvalidArgument,
                format!("malformed request message: {problem}"),
            )
            .with_reason(MALFORMED_MESSAGE)
        })?;
        let mut violations = walk.lists;
        violations.append(walk.values);
        violations.finish()
    }

    fn method(&self, path: &str) -> Option<&MethodRequest> {
        self.inner.methods.get(path)
    }
}

/// Builds [`MessageRules`] for every message reachable from the inputs.
struct Compiler {
    extension: Option<ExtensionDescriptor>,
    messages: Vec<MessageRules>,
    by_name: HashMap<String, usize>,
    /// Messages given an index whose rules are not built yet.
    pending: Vec<(usize, MessageDescriptor)>,
    unlimited: Vec<String>,
}

impl Compiler {
    /// The index of `message`, queued for compilation the first time.
    fn index_of(&mut self, message: &MessageDescriptor) -> usize {
        if let Some(&index) = self.by_name.get(message.full_name()) {
            return index;
        }
        let index = self.messages.len();
        self.messages.push(MessageRules::default());
        self.by_name.insert(message.full_name().to_owned(), index);
        self.pending.push((index, message.clone()));
        index
    }

    fn run(&mut self) {
        while let Some((index, message)) = self.pending.pop() {
            let mut fields: Vec<FieldDescriptor> = message.fields().collect();
            fields.sort_by_key(FieldDescriptor::number);
            let mut rules = MessageRules::default();
            for field in fields {
                let limits = field_limits(&field, self.extension.as_ref());
                let repeated = field.is_list() || field.is_map();
                let shape = match field.kind() {
                    Kind::Message(_) if field.is_group() => Shape::Group,
                    Kind::Message(nested) => Shape::Message(self.index_of(&nested)),
                    Kind::String => Shape::Text(limits.max_bytes),
                    Kind::Bytes => Shape::Bytes(limits.max_bytes),
                    Kind::Double | Kind::Fixed64 | Kind::Sfixed64 => Shape::Fixed64,
                    Kind::Float | Kind::Fixed32 | Kind::Sfixed32 => Shape::Fixed32,
                    Kind::Int32
                    | Kind::Int64
                    | Kind::Uint32
                    | Kind::Uint64
                    | Kind::Sint32
                    | Kind::Sint64
                    | Kind::Bool
                    | Kind::Enum(_) => Shape::Varint,
                };
                let text = matches!(field.kind(), Kind::String | Kind::Bytes);
                if text && limits.max_bytes.is_none() {
                    self.unlimited
                        .push(format!("{} (max_bytes)", field.full_name()));
                }
                if repeated && limits.max_items.is_none() {
                    self.unlimited
                        .push(format!("{} (max_items)", field.full_name()));
                }
                let slot = repeated.then(|| {
                    rules.repeated += 1;
                    rules.repeated - 1
                });
                rules.fields.push(FieldRule {
                    number: field.number(),
                    name: field.name().into(),
                    shape,
                    slot,
                    max_items: limits.max_items,
                });
            }
            if let Some(entry) = self.messages.get_mut(index) {
                *entry = rules;
            }
        }
    }
}

/// The limits `field` declares, or the well-known ones.
fn field_limits(field: &FieldDescriptor, extension: Option<&ExtensionDescriptor>) -> FieldLimits {
    if let Some((_, limits)) = WELL_KNOWN_LIMITS
        .iter()
        .find(|(name, _)| *name == field.full_name())
    {
        return *limits;
    }
    let options = field.options();
    let Some(extension) = extension.filter(|extension| options.has_extension(extension)) else {
        return FieldLimits::default();
    };
    let value = options.get_extension(extension);
    let Some(limits) = value.as_message() else {
        return FieldLimits::default();
    };
    let number = |name: &str| {
        limits
            .get_field_by_name(name)
            .and_then(|value| value.as_u32())
            .filter(|&n| n > 0)
    };
    FieldLimits {
        max_bytes: number("max_bytes"),
        max_items: number("max_items"),
    }
}

/// What is wrong with the limits `field` declares, if anything.
fn misplaced_limit(
    field: &FieldDescriptor,
    extension: Option<&ExtensionDescriptor>,
) -> Option<String> {
    let limits = field_limits(field, extension);
    let text = matches!(field.kind(), Kind::String | Kind::Bytes);
    let repeated = field.is_list() || field.is_map();
    if limits.max_bytes.is_some() && !text {
        Some(format!(
            "{} (max_bytes on a field that is no string or bytes)",
            field.full_name()
        ))
    } else if limits.max_items.is_some() && !repeated {
        Some(format!(
            "{} (max_items on a singular field)",
            field.full_name()
        ))
    } else {
        None
    }
}

/// Wire types.
const VARINT: u8 = 0;
const I64: u8 = 1;
const LEN: u8 = 2;
const START_GROUP: u8 = 3;
const END_GROUP: u8 = 4;
const I32: u8 = 5;

/// What makes wire data undecodable, for the error message.
type Malformed = &'static str;

/// One check of one request message.
struct Walk<'t> {
    messages: &'t [MessageRules],
    /// The path of the message being walked, with a trailing dot (empty at
    /// the top): `items[3].`.
    path: String,
    /// Element counts of the repeated fields of the messages being walked,
    /// one frame per nesting level.
    counters: Vec<u64>,
    /// Lists over their `max_items`: named first, as they are what a caller
    /// most needs to fix (and the values past the maximum go unchecked).
    lists: Violations,
    /// Values over their `max_bytes` or not UTF-8, in wire order.
    values: Violations,
}

impl<'t> Walk<'t> {
    fn message(&mut self, index: usize, mut buf: &[u8], depth: usize) -> Result<(), Malformed> {
        let messages = self.messages;
        let Some(rules) = messages.get(index) else {
            return Ok(());
        };
        let frame = self.counters.len();
        self.counters.resize(frame + rules.repeated, 0);
        while !buf.is_empty() {
            let (number, wire) = read_key(&mut buf)?;
            match rules.field(number) {
                Some(rule) => self.field(rule, wire, &mut buf, frame, depth)?,
                None => skip_field(number, wire, &mut buf, depth)?,
            }
        }
        self.counters.truncate(frame);
        Ok(())
    }

    fn field(
        &mut self,
        rule: &'t FieldRule,
        wire: u8,
        buf: &mut &[u8],
        frame: usize,
        depth: usize,
    ) -> Result<(), Malformed> {
        match rule.shape {
            Shape::Varint | Shape::Fixed32 | Shape::Fixed64 => {
                let expected = match rule.shape {
                    Shape::Varint => VARINT,
                    Shape::Fixed32 => I32,
                    _ => I64,
                };
                if wire == expected {
                    skip_scalar(wire, buf)?;
                    self.count(rule, frame, 1);
                } else if wire == LEN && rule.slot.is_some() {
                    // A packed list: any number of values in one field.
                    let values = count_packed(rule.shape, read_len(buf)?)?;
                    self.count(rule, frame, values);
                } else {
                    return Err(WRONG_WIRE_TYPE);
                }
            }
            Shape::Text(max_bytes) | Shape::Bytes(max_bytes) => {
                if wire != LEN {
                    return Err(WRONG_WIRE_TYPE);
                }
                let value = read_len(buf)?;
                let element = self.count(rule, frame, 1);
                if element == Element::PastMax {
                    return Ok(());
                }
                if let Some(max) = max_bytes.filter(|&max| value.len() > max as usize) {
                    self.violation(rule, element, || too_long(max));
                } else if matches!(rule.shape, Shape::Text(_))
                    && std::str::from_utf8(value).is_err()
                {
                    self.violation(rule, element, || NOT_UTF8.to_owned());
                }
            }
            Shape::Message(nested) => {
                if wire != LEN {
                    return Err(WRONG_WIRE_TYPE);
                }
                let value = read_len(buf)?;
                let element = self.count(rule, frame, 1);
                if element == Element::PastMax {
                    return Ok(());
                }
                if depth >= MAX_NESTING {
                    return Err("messages nested too deeply");
                }
                let mark = self.path.len();
                // Writing to a String cannot fail.
                let _ = match element {
                    Element::At(index) => write!(self.path, "{}[{index}].", rule.name),
                    _ => write!(self.path, "{}.", rule.name),
                };
                self.message(nested, value, depth + 1)?;
                self.path.truncate(mark);
            }
            Shape::Group => {
                if wire != START_GROUP {
                    return Err(WRONG_WIRE_TYPE);
                }
                skip_group(rule.number, buf, depth + 1)?;
                self.count(rule, frame, 1);
            }
        }
        Ok(())
    }

    /// Counts `added` elements of `rule` (nothing to count for a singular
    /// field) and records a violation when the list grows past its
    /// `max_items`. Says where the (first) element added stands.
    fn count(&mut self, rule: &FieldRule, frame: usize, added: u64) -> Element {
        let Some(counter) = rule
            .slot
            .and_then(|slot| self.counters.get_mut(frame + slot))
        else {
            return Element::Singular;
        };
        let before = *counter;
        let after = before.saturating_add(added);
        *counter = after;
        let Some(max) = rule.max_items.map(u64::from) else {
            return Element::At(before);
        };
        if before <= max && after > max {
            let path = &self.path;
            let max_items = rule.max_items.unwrap_or_default();
            self.lists
                .add_with(|| (format!("{path}{}", rule.name), too_many(max_items)));
        }
        if before < max {
            Element::At(before)
        } else {
            Element::PastMax
        }
    }

    /// Records that `element` of `rule` is invalid; the path is only
    /// formatted when the violation is kept.
    fn violation(
        &mut self,
        rule: &FieldRule,
        element: Element,
        description: impl FnOnce() -> String,
    ) {
        let path = &self.path;
        self.values.add_with(|| {
            let field = match element {
                Element::At(index) => format!("{path}{}[{index}]", rule.name),
                _ => format!("{path}{}", rule.name),
            };
            (field, description())
        });
    }
}

/// Where a field's value stands among its field's values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Element {
    /// The field is not repeated.
    Singular,
    /// Element `index` of a list, within its `max_items`.
    At(u64),
    /// An element past the list's `max_items`: counted, not looked into.
    PastMax,
}

const WRONG_WIRE_TYPE: Malformed = "a field sent with the wrong wire type";

/// Reads a base-128 varint as prost does: at most ten bytes, the tenth at
/// most 1.
fn read_varint(buf: &mut &[u8]) -> Result<u64, Malformed> {
    let mut value = 0u64;
    for shift in 0..10 {
        let Some((&byte, rest)) = buf.split_first() else {
            return Err("a truncated varint");
        };
        *buf = rest;
        if shift == 9 && byte > 1 {
            return Err("a varint longer than 64 bits");
        }
        value |= u64::from(byte & 0x7f) << (7 * shift);
        if byte < 0x80 {
            return Ok(value);
        }
    }
    Err("a varint longer than 64 bits")
}

/// A field key: its number and wire type, refused as prost refuses them.
fn read_key(buf: &mut &[u8]) -> Result<(u32, u8), Malformed> {
    let key = read_varint(buf)?;
    let key = u32::try_from(key).map_err(|_| "a field key out of range")?;
    let wire = (key & 0x7) as u8;
    let number = key >> 3;
    if number == 0 {
        return Err("a field numbered 0");
    }
    if wire > I32 {
        return Err("an invalid wire type");
    }
    Ok((number, wire))
}

/// The payload of a length-delimited field.
fn read_len<'b>(buf: &mut &'b [u8]) -> Result<&'b [u8], Malformed> {
    let len = read_varint(buf)?;
    let len = usize::try_from(len)
        .ok()
        .filter(|&len| len <= buf.len())
        .ok_or("a length past the end of the message")?;
    let (value, rest) = buf.split_at(len);
    *buf = rest;
    Ok(value)
}

fn take(buf: &mut &[u8], n: usize) -> Result<(), Malformed> {
    if buf.len() < n {
        return Err("a truncated fixed-size value");
    }
    *buf = &buf[n..];
    Ok(())
}

/// Skips a scalar of wire type `wire` (VARINT, I32 or I64).
fn skip_scalar(wire: u8, buf: &mut &[u8]) -> Result<(), Malformed> {
    match wire {
        VARINT => read_varint(buf).map(drop),
        I32 => take(buf, 4),
        _ => take(buf, 8),
    }
}

/// The number of values in a packed list.
fn count_packed(shape: Shape, mut packed: &[u8]) -> Result<u64, Malformed> {
    let width = match shape {
        Shape::Fixed32 => 4,
        Shape::Fixed64 => 8,
        _ => {
            let mut values = 0u64;
            while !packed.is_empty() {
                read_varint(&mut packed)?;
                values += 1;
            }
            return Ok(values);
        }
    };
    if !packed.len().is_multiple_of(width) {
        return Err("a packed list cut in the middle of a value");
    }
    Ok((packed.len() / width) as u64)
}

/// Skips a field the message does not declare, as prost does.
fn skip_field(number: u32, wire: u8, buf: &mut &[u8], depth: usize) -> Result<(), Malformed> {
    match wire {
        VARINT | I32 | I64 => skip_scalar(wire, buf),
        LEN => read_len(buf).map(drop),
        START_GROUP => skip_group(number, buf, depth + 1),
        _ => Err("an end-group key without its start"),
    }
}

/// Skips a group up to its end-group key (of the same number).
fn skip_group(number: u32, buf: &mut &[u8], depth: usize) -> Result<(), Malformed> {
    if depth > MAX_NESTING {
        return Err("groups nested too deeply");
    }
    loop {
        if buf.is_empty() {
            return Err("a group without its end");
        }
        let (inner, wire) = read_key(buf)?;
        if wire == END_GROUP {
            return if inner == number {
                Ok(())
            } else {
                Err("a group ended by another field's end-group key")
            };
        }
        skip_field(inner, wire, buf, depth)?;
    }
}

/// Checks every request of the services a server hosts against the
/// contract's limits before its handler runs (see the module docs): reads
/// the one message of a unary-request RPC whole, at most `max_message_bytes`
/// (refusing a larger one from its length prefix with RESOURCE_EXHAUSTED),
/// and answers INVALID_ARGUMENT (trailers-only, with `BadRequest`) when a
/// field is over its limit or the message does not decode. Otherwise the
/// handler gets the same bytes. Paths outside the table or of services not
/// hosted here (health, reflection, unknown) and client-streaming RPCs (the
/// contract has none) pass untouched.
///
/// Memory and time: the message is read only once its length is granted by
/// the layer's [`RequestBudget`] (else RESOURCE_EXHAUSTED, `OVERLOADED`,
/// with `RetryInfo`), and its bytes count against the budget until the
/// handler has answered (tonic has decoded them by then). The message must
/// arrive whole within the body read timeout of the call's headers, else
/// DEADLINE_EXCEEDED; either way the bytes are given back at once.
///
/// Compression: the servers accept none (tonic is built without it), so a
/// request with a `grpc-encoding` other than `identity` is UNIMPLEMENTED,
/// and a message flagged compressed without one is INVALID_ARGUMENT (the
/// gRPC spec says INTERNAL, which would blame the server for a client's
/// mistake). Enabling compression means decompressing here first.
#[derive(Clone, Debug)]
pub struct RequestLimitsLayer {
    policy: Arc<LimitsPolicy>,
}

#[derive(Clone, Debug)]
struct LimitsPolicy {
    table: LimitsTable,
    /// Full names of the services hosted here.
    hosted: HashSet<String>,
    /// The largest request message, in bytes (without the frame header).
    max_message_bytes: usize,
    /// Request bytes all calls together may hold buffered.
    budget: RequestBudget,
    /// How long the message may take to arrive once the headers are in.
    read_timeout: Option<Duration>,
}

impl RequestLimitsLayer {
    /// Enforces `table` on the RPCs of `hosted` (full gRPC service names),
    /// with request messages of at most `max_message_bytes`
    /// (`server.max_request_bytes`), a budget of its own of the default
    /// `server.max_buffered_request_bytes` and the default body read
    /// timeout (see [`Self::with_budget`], [`Self::with_read_timeout`]).
    pub fn new<'a>(
        table: LimitsTable,
        hosted: impl IntoIterator<Item = &'a str>,
        max_message_bytes: usize,
    ) -> Self {
        let defaults = ServerConfig::default();
        Self {
            policy: Arc::new(LimitsPolicy {
                table,
                hosted: hosted.into_iter().map(str::to_owned).collect(),
                max_message_bytes,
                budget: RequestBudget::new(defaults.max_buffered_request_bytes),
                read_timeout: read_timeout(defaults.body_read_timeout_ms),
            }),
        }
    }

    /// Counts buffered request messages against `budget`, which may be
    /// shared with other servers of the process.
    pub fn with_budget(mut self, budget: RequestBudget) -> Self {
        Arc::make_mut(&mut self.policy).budget = budget;
        self
    }

    /// Answers DEADLINE_EXCEEDED when a request message has not arrived
    /// whole within `timeout` of the call's headers; `None`: only the
    /// caller's deadline bounds the read.
    pub fn with_read_timeout(mut self, timeout: Option<Duration>) -> Self {
        Arc::make_mut(&mut self.policy).read_timeout = timeout;
        self
    }
}

/// `server.body_read_timeout_ms` as a timeout: 0 is none.
pub fn read_timeout(millis: u64) -> Option<Duration> {
    (millis > 0).then(|| Duration::from_millis(millis))
}

/// Request bytes that calls may hold buffered at once, all together
/// (`server.max_buffered_request_bytes`): a message is read whole before
/// its handler runs, so without this bound the calls in flight times the
/// largest message could exceed a pod's memory. A call takes its message's
/// length (header included) once its length prefix is in, without ever
/// waiting: when that much is not free the call is refused at once with
/// RESOURCE_EXHAUSTED (`OVERLOADED`) and `RetryInfo`. Cheap to clone:
/// clones share the bytes, so that the servers of one process (`agora
/// serve all`) can share one budget ([`crate::server::Server::request_budget`]).
#[derive(Clone, Debug)]
pub struct RequestBudget {
    bytes: Arc<Semaphore>,
    size: usize,
}

impl RequestBudget {
    /// A budget of `bytes` (capped at what a semaphore can count).
    pub fn new(bytes: usize) -> Self {
        let size = bytes.min(Semaphore::MAX_PERMITS);
        Self {
            bytes: Arc::new(Semaphore::new(size)),
            size,
        }
    }

    /// The budget's size, in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Bytes free right now.
    pub fn available(&self) -> usize {
        self.bytes.available_permits()
    }

    /// `bytes` of the budget, held until the permit is dropped; refused at
    /// once when they are not free.
    fn take(&self, bytes: usize) -> Result<OwnedSemaphorePermit, tonic::Status> {
        u32::try_from(bytes)
            .ok()
            .and_then(|bytes| Arc::clone(&self.bytes).try_acquire_many_owned(bytes).ok())
            .ok_or_else(|| {
                tracing::debug!(
                    bytes,
                    budget = self.size,
                    free = self.available(),
                    "request bytes over the buffer budget: call refused"
                );
                tonic::Status::from(Error::overloaded(
                    format!(
                        "the server holds as many request bytes as it may ({}): \
                         try again shortly",
                        self.size
                    ),
                    crate::error::OVERLOADED,
                    crate::server::OVERLOADED_RETRY_AFTER,
                ))
            })
    }
}

impl RequestLimitsLayer {
    /// [`RequestLimitsLayer::new`] with the contract's table
    /// ([`LimitsTable::contract`]).
    pub fn contract<'a>(
        hosted: impl IntoIterator<Item = &'a str>,
        max_message_bytes: usize,
    ) -> Result<Self, Error> {
        Ok(Self::new(
            LimitsTable::contract()?.clone(),
            hosted,
            max_message_bytes,
        ))
    }
}

impl LimitsPolicy {
    /// The input message of the RPC at `path`, when its requests are checked.
    fn input_of(&self, path: &str) -> Option<usize> {
        self.table
            .method(path)
            .filter(|method| !method.client_streaming && self.hosted.contains(&method.service))
            .map(|method| method.input)
    }

    /// The request's one message, whole and within its limits, as the gRPC
    /// frame it arrived in, with its share of the budget; or the status to
    /// answer with.
    async fn admit<B>(
        &self,
        input: usize,
        headers: &http::HeaderMap,
        body: B,
    ) -> Result<(Bytes, OwnedSemaphorePermit), tonic::Status>
    where
        B: http_body::Body<Data = Bytes>,
    {
        if let Some(encoding) = headers
            .get("grpc-encoding")
            .filter(|encoding| encoding.as_bytes() != b"identity")
        {
            let mut status = tonic::Status::unimplemented(format!(
                "requests compressed with {} are not supported; send them uncompressed",
                String::from_utf8_lossy(encoding.as_bytes())
            ));
            status.metadata_mut().insert(
                "grpc-accept-encoding",
                tonic::metadata::MetadataValue::from_static("identity"),
            );
            return Err(status);
        }
        let read = read_one_frame(body, self.max_message_bytes, &self.budget);
        // Dropping the read (on timeout) drops the bytes and their share of
        // the budget with it.
        let (frame, granted) = match self.read_timeout {
            None => read.await?,
            Some(limit) => tokio::time::timeout(limit, read)
                .await
                .map_err(|_elapsed| body_too_slow(limit))??,
        };
        self.table
            .check_index(input, frame.get(FRAME_HEADER..).unwrap_or_default())
            .map_err(tonic::Status::from)?;
        Ok((frame, granted))
    }
}

/// Put in the extensions of the answer to a call whose request message did
/// not arrive in time ([`RequestLimitsLayer`]): its DEADLINE_EXCEEDED is
/// the caller's doing, so the server logs it as a client's refusal, at
/// debug, not as a failure of its own.
#[derive(Clone, Copy, Debug)]
pub struct CallerStalled;

/// DEADLINE_EXCEEDED for a request message that did not arrive whole in time.
fn body_too_slow(limit: Duration) -> tonic::Status {
    tracing::debug!(?limit, "request body too slow: call refused");
    tonic::Status::deadline_exceeded(format!(
        "the request body was too slow: its message must arrive whole within {} ms of the \
         call's headers",
        limit.as_millis()
    ))
}

/// Reads the body of a unary-request call: exactly one uncompressed gRPC
/// frame of at most `max_message_bytes`, never buffering more than that
/// plus the header. The frame's length is taken from `budget` as soon as
/// its header is in, before anything is allocated for it; the share comes
/// back with the frame.
async fn read_one_frame<B>(
    body: B,
    max_message_bytes: usize,
    budget: &RequestBudget,
) -> Result<(Bytes, OwnedSemaphorePermit), tonic::Status>
where
    B: http_body::Body<Data = Bytes>,
{
    let malformed = |problem: &str| {
        tonic::Status::from(
            Error::new(
                ErrorKind::InvalidArgument,
                format!("malformed request message: {problem}"),
            )
            .with_reason(MALFORMED_MESSAGE),
        )
    };
    let mut body = pin!(body);
    // The header, on the stack until the frame's length is granted.
    let mut header = [0u8; FRAME_HEADER];
    let mut header_len = 0;
    // The frame being read, its whole length and its share of the budget.
    let mut frame: Option<(BytesMut, usize, OwnedSemaphorePermit)> = None;
    while let Some(next) = body.frame().await {
        let next = next.map_err(|_| tonic::Status::cancelled("the request body broke off"))?;
        let Ok(mut data) = next.into_data() else {
            // Request trailers carry nothing a unary call uses.
            continue;
        };
        while data.has_remaining() {
            match &mut frame {
                None => {
                    let n = (FRAME_HEADER - header_len).min(data.remaining());
                    header[header_len..header_len + n].copy_from_slice(&data[..n]);
                    data.advance(n);
                    header_len += n;
                    if header_len == FRAME_HEADER {
                        let total = frame_length(&header, max_message_bytes)?;
                        let granted = budget.take(total)?;
                        let mut buffer = BytesMut::with_capacity(total);
                        buffer.extend_from_slice(&header);
                        frame = Some((buffer, total, granted));
                    }
                }
                Some((buffer, total, _)) if buffer.len() == *total => {
                    return Err(malformed("a unary request carries exactly one message"));
                }
                Some((buffer, total, _)) => {
                    let n = (*total - buffer.len()).min(data.remaining());
                    buffer.extend_from_slice(&data[..n]);
                    data.advance(n);
                }
            }
        }
    }
    match frame {
        None if header_len == 0 => Err(malformed("the request has no message")),
        Some((buffer, total, granted)) if buffer.len() == total => Ok((buffer.freeze(), granted)),
        _ => Err(malformed("the request message is cut short")),
    }
}

/// The length of the whole frame whose 5-byte header is `header`, or the
/// refusal of its flag or size.
fn frame_length(header: &[u8], max_message_bytes: usize) -> Result<usize, tonic::Status> {
    let invalid = |message: String| {
        tonic::Status::from(
            Error::new(ErrorKind::InvalidArgument, message).with_reason(MALFORMED_MESSAGE),
        )
    };
    match header.first() {
        Some(0) => {}
        Some(1) => {
            return Err(invalid(
                "the request message is flagged compressed but no grpc-encoding names how"
                    .to_owned(),
            ));
        }
        flag => {
            let flag = flag.copied().unwrap_or_default();
            return Err(invalid(format!(
                "malformed request message: compression flag {flag} (0 or 1)"
            )));
        }
    }
    let mut length = [0u8; 4];
    length.copy_from_slice(header.get(1..FRAME_HEADER).unwrap_or(&[0; 4]));
    let length = u32::from_be_bytes(length) as usize;
    if length > max_message_bytes {
        return Err(tonic::Status::from(
            Error::new(
                ErrorKind::ResourceExhausted,
                format!(
                    "request message too large: {length} bytes, the limit is {max_message_bytes}"
                ),
            )
            .with_reason(MESSAGE_TOO_LARGE),
        ));
    }
    Ok(FRAME_HEADER + length)
}

impl<S> tower::Layer<S> for RequestLimitsLayer {
    type Service = RequestLimits<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestLimits {
            inner,
            policy: Arc::clone(&self.policy),
        }
    }
}

/// The service made by [`RequestLimitsLayer`].
#[derive(Clone, Debug)]
pub struct RequestLimits<S> {
    inner: S,
    policy: Arc<LimitsPolicy>,
}

impl<S, B, RB> tower::Service<http::Request<B>> for RequestLimits<S>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<RB>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    RB: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        futures::future::Either<S::Future, BoxFuture<'static, Result<Self::Response, Self::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let Some(input) = self.policy.input_of(request.uri().path()) else {
            return futures::future::Either::Left(
                self.inner.call(request.map(tonic::body::Body::new)),
            );
        };
        // The ready clone is the one we must call; keep a fresh clone in self.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let policy = Arc::clone(&self.policy);
        futures::future::Either::Right(Box::pin(async move {
            let (parts, body) = request.into_parts();
            match policy.admit(input, &parts.headers, body).await {
                Ok((frame, granted)) => {
                    let body = tonic::body::Body::new(http_body_util::Full::new(frame));
                    let answered = inner.call(http::Request::from_parts(parts, body)).await;
                    // The handler has answered (a stream: started), so tonic
                    // has decoded the message and dropped its bytes: give
                    // them back to the budget.
                    drop(granted);
                    answered
                }
                // A trailers-only gRPC response: the status is in the headers.
                Err(refusal) => {
                    // Only a body too slow is DEADLINE_EXCEEDED here.
                    let stalled = refusal.code() == tonic::Code::DeadlineExceeded;
                    let mut answer = refusal.into_http();
                    if stalled {
                        answer.extensions_mut().insert(CallerStalled);
                    }
                    Ok(answer)
                }
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use prost_reflect::prost::Message as _;
    use prost_reflect::{DynamicMessage, ReflectMessage as _, Value};
    use rand::rngs::StdRng;
    use rand::{Rng as _, SeedableRng as _};

    use super::*;

    fn contract() -> &'static LimitsTable {
        LimitsTable::contract().expect("the contract's limits compile")
    }

    fn contract_pool() -> DescriptorPool {
        DescriptorPool::decode(agora_proto::FILE_DESCRIPTOR_SET).expect("contract decodes")
    }

    /// Adding a string, bytes or repeated field to a request without
    /// `(agora.common.v1.limits)` fails here, naming the field.
    #[test]
    fn every_string_and_list_of_every_request_has_a_limit() {
        let table = contract();
        assert!(
            table.unlimited_fields().is_empty(),
            "fields reachable from a request without a length limit: {}",
            table.unlimited_fields().join(", ")
        );
        // Every RPC's input is covered, with the messages inside it.
        let pool = contract_pool();
        let mut inputs = 0;
        for service in pool.services() {
            for method in service.methods() {
                inputs += 1;
                assert!(table.covers(method.input().full_name()));
            }
        }
        assert!(inputs >= 20, "only {inputs} RPCs");
        for nested in [
            "agora.orders.v1.LineItem",
            "agora.catalog.v1.Product",
            "agora.common.v1.Money",
            "google.protobuf.FieldMask",
        ] {
            assert!(table.covers(nested), "{nested}");
        }
        // Response-only messages are not.
        assert!(!table.covers("agora.orders.v1.Order"));
    }

    /// The layer reads one message per call; a client-streaming RPC would
    /// pass unchecked, so adding one must come with a check of its own.
    #[test]
    fn the_contract_has_no_client_streaming_rpc() {
        let pool = contract_pool();
        let streaming: Vec<String> = pool
            .services()
            .flat_map(|service| service.methods().collect::<Vec<_>>())
            .filter(|method| method.is_client_streaming())
            .map(|method| method.full_name().to_owned())
            .collect();
        assert!(streaming.is_empty(), "{streaming:?}");
    }

    #[test]
    fn declared_limits_are_read_from_the_contract() {
        let pool = contract_pool();
        let field = |message: &str, field: &str| {
            let descriptor = pool
                .get_message_by_name(message)
                .and_then(|m| m.get_field_by_name(field))
                .unwrap_or_else(|| panic!("{message}.{field}"));
            LimitsTable::limits_of(&pool, &descriptor)
        };
        assert_eq!(
            field("agora.orders.v1.PlaceOrderRequest", "items").max_items,
            Some(100)
        );
        // The contract and the configuration's default agree.
        let password = crate::config::PasswordConfig::default().max_password_bytes;
        assert_eq!(
            field("agora.users.v1.CreateUserRequest", "password").max_bytes,
            u32::try_from(password).ok()
        );
        assert_eq!(
            field("agora.users.v1.AuthenticateRequest", "password").max_bytes,
            u32::try_from(password).ok()
        );
        assert_eq!(
            field("agora.users.v1.CreateUserRequest", "email").max_bytes,
            Some(254)
        );
        let categories = field("agora.catalog.v1.CreateProductRequest", "categories");
        assert_eq!(
            (categories.max_items, categories.max_bytes),
            (Some(20), Some(50))
        );
        assert_eq!(
            field("google.protobuf.FieldMask", "paths"),
            WELL_KNOWN_LIMITS[0].1
        );
        assert_eq!(
            field("agora.orders.v1.PlaceOrderRequest", "card_number").max_items,
            None
        );
    }

    use crate::access::test_descriptor_set as descriptor_set;

    const PROBE: &str = r#"
        syntax = "proto3";
        package test.v1;
        import "agora/common/v1/limits.proto";
        message Inner {
          string name = 1 [(agora.common.v1.limits).max_bytes = 4];
          repeated int32 codes = 2 [(agora.common.v1.limits).max_items = 3];
          bytes blob = 3 [(agora.common.v1.limits).max_bytes = 2];
          repeated fixed32 fixed = 4 [(agora.common.v1.limits).max_items = 2];
          repeated double ratios = 5 [(agora.common.v1.limits).max_items = 2];
        }
        message Outer {
          repeated Inner items = 1 [(agora.common.v1.limits).max_items = 2];
          Inner single = 2;
          repeated string tags = 3 [(agora.common.v1.limits) = {max_items: 2, max_bytes: 3}];
          Outer next = 4;
          int64 number = 5;
          double ratio = 6;
          fixed32 small = 7;
          bool flag = 8;
        }
        service Probe {
          rpc Call(Outer) returns (Outer);
        }
    "#;

    /// [`PROBE`] compiled once.
    fn probe_set() -> &'static [u8] {
        static SET: OnceLock<Vec<u8>> = OnceLock::new();
        SET.get_or_init(|| descriptor_set(PROBE))
    }

    fn probe() -> LimitsTable {
        LimitsTable::from_descriptor_set(probe_set()).expect("probe compiles")
    }

    /// Hand-written wire bytes.
    mod wire {
        pub fn varint(mut value: u64, out: &mut Vec<u8>) {
            while value >= 0x80 {
                out.push((value as u8 & 0x7f) | 0x80);
                value >>= 7;
            }
            out.push(value as u8);
        }

        pub fn key(number: u32, wire: u8, out: &mut Vec<u8>) {
            varint((u64::from(number) << 3) | u64::from(wire), out);
        }

        pub fn len(number: u32, payload: &[u8]) -> Vec<u8> {
            let mut out = Vec::new();
            key(number, 2, &mut out);
            varint(payload.len() as u64, &mut out);
            out.extend_from_slice(payload);
            out
        }

        pub fn int(number: u32, value: u64) -> Vec<u8> {
            let mut out = Vec::new();
            key(number, 0, &mut out);
            varint(value, &mut out);
            out
        }

        pub fn packed(number: u32, values: &[u64]) -> Vec<u8> {
            let mut payload = Vec::new();
            for &value in values {
                varint(value, &mut payload);
            }
            len(number, &payload)
        }
    }

    fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
        parts.concat()
    }

    /// The fields named by the check's violations, or `malformed: ...`.
    fn verdict(table: &LimitsTable, message: &[u8]) -> Vec<String> {
        match table.check("test.v1.Outer", message) {
            Ok(()) => Vec::new(),
            Err(err) if err.violations().is_empty() => vec![err.message().to_owned()],
            Err(err) => err
                .violations()
                .iter()
                .map(|(field, description)| format!("{field}: {description}"))
                .collect(),
        }
    }

    fn is_malformed(table: &LimitsTable, message: &[u8]) -> bool {
        table.check("test.v1.Outer", message).is_err_and(|err| {
            err.reason() == Some(MALFORMED_MESSAGE)
                && err.message().starts_with("malformed request message")
        })
    }

    #[test]
    fn nested_fields_are_named_by_path() {
        let table = probe();
        let inner_ok = cat(&[wire::len(1, b"abcd"), wire::len(3, b"xy")]);
        let inner_long = cat(&[wire::len(1, b"abcde"), wire::len(3, b"xyz")]);
        let message = cat(&[
            wire::len(1, &inner_ok),
            wire::len(1, &inner_long),
            wire::len(2, &inner_long),
            wire::len(3, b"abc"),
            wire::len(3, b"abcd"),
            wire::len(4, &wire::len(2, &inner_long)),
            wire::int(5, 7),
        ]);
        assert_eq!(
            verdict(&table, &message),
            [
                "items[1].name: must be at most 4 bytes",
                "items[1].blob: must be at most 2 bytes",
                "single.name: must be at most 4 bytes",
                "single.blob: must be at most 2 bytes",
                "tags[1]: must be at most 3 bytes",
                "next.single.name: must be at most 4 bytes",
                "next.single.blob: must be at most 2 bytes",
            ]
        );
        // Within every limit: no violation.
        let fine = cat(&[wire::len(1, &inner_ok), wire::len(3, b"abc")]);
        assert_eq!(verdict(&table, &fine), Vec::<String>::new());
        assert_eq!(verdict(&table, b""), Vec::<String>::new());
    }

    #[test]
    fn lists_are_counted_and_named_first_and_their_excess_left_unread() {
        let table = probe();
        let long_inner = wire::len(1, b"far too long");
        let message = cat(&[
            wire::len(3, b"toolong"),
            wire::len(1, &long_inner),
            wire::len(1, &long_inner),
            // Past the maximum of 2: counted, never looked into (not even
            // for its broken contents).
            wire::len(1, &[0xff]),
            wire::len(3, b"a"),
            wire::len(3, b"b"),
        ]);
        assert_eq!(
            verdict(&table, &message),
            [
                "items: must have at most 2 items",
                "tags: must have at most 2 items",
                "tags[0]: must be at most 3 bytes",
                "items[0].name: must be at most 4 bytes",
                "items[1].name: must be at most 4 bytes",
            ]
        );
    }

    #[test]
    fn packed_and_unpacked_lists_count_alike() {
        let table = probe();
        let within = wire::len(2, &wire::packed(2, &[1, 300, 70_000]));
        assert_eq!(verdict(&table, &within), Vec::<String>::new());
        let packed = wire::len(2, &wire::packed(2, &[1, 300, 70_000, 5]));
        assert_eq!(
            verdict(&table, &packed),
            ["single.codes: must have at most 3 items"]
        );
        let unpacked: Vec<u8> = (0..4).flat_map(|n| wire::int(2, n)).collect();
        assert_eq!(
            verdict(&table, &wire::len(2, &unpacked)),
            ["single.codes: must have at most 3 items"]
        );
        // Split across a packed run and loose values: still one list.
        let mixed = cat(&[wire::packed(2, &[1, 2]), wire::int(2, 3), wire::int(2, 4)]);
        assert_eq!(
            verdict(&table, &wire::len(2, &mixed)),
            ["single.codes: must have at most 3 items"]
        );
        // Fixed-width packed lists: counted by width, refused when cut.
        let fixed = wire::len(4, &[0u8; 12]);
        assert_eq!(
            verdict(&table, &wire::len(2, &fixed)),
            ["single.fixed: must have at most 2 items"]
        );
        let doubles = wire::len(5, &[0u8; 16]);
        assert_eq!(
            verdict(&table, &wire::len(2, &doubles)),
            Vec::<String>::new()
        );
        assert!(is_malformed(
            &table,
            &wire::len(2, &wire::len(4, &[0u8; 5]))
        ));
        assert!(is_malformed(&table, &wire::len(2, &wire::len(2, &[0x80]))));
    }

    #[test]
    fn strings_must_be_utf8_and_bytes_need_not() {
        let table = probe();
        let message = cat(&[
            wire::len(
                2,
                &cat(&[wire::len(1, &[0xc3]), wire::len(3, &[0xff, 0xfe])]),
            ),
            wire::len(3, &[0xe2, 0x82]),
        ]);
        assert_eq!(
            verdict(&table, &message),
            [
                "single.name: must be valid UTF-8",
                "tags[0]: must be valid UTF-8"
            ]
        );
        // Multi-byte characters count as their bytes: "é" is 2.
        assert_eq!(
            verdict(&table, &wire::len(3, "éé".as_bytes())),
            ["tags[0]: must be at most 3 bytes"]
        );
        assert_eq!(
            verdict(&table, &wire::len(3, "é".as_bytes())),
            Vec::<String>::new()
        );
    }

    #[test]
    fn malformed_wire_data_is_refused() {
        let table = probe();
        let fields = [
            wire::len(1, &cat(&[wire::len(1, b"ab"), wire::packed(2, &[1, 2])])),
            wire::len(3, b"abc"),
            wire::int(5, u64::MAX),
            wire::int(8, 1),
        ];
        let good = cat(&fields);
        assert!(table.check("test.v1.Outer", &good).is_ok());
        // Every cut inside a field leaves something undecodable; a cut
        // between fields leaves a shorter message.
        let boundaries: Vec<usize> = fields
            .iter()
            .scan(0, |end, field| {
                *end += field.len();
                Some(*end)
            })
            .chain([0])
            .collect();
        for cut in 0..good.len() {
            let malformed = is_malformed(&table, &good[..cut]);
            assert_eq!(malformed, !boundaries.contains(&cut), "cut at {cut}");
        }
        let mut key = Vec::new();
        wire::key(5, 2, &mut key); // a number sent length-delimited
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("field number 0", vec![0x00, 0x01]),
            ("wire type 7", vec![0x0f]),
            ("wire type 6", vec![0x0e]),
            ("stray end-group", vec![0x0c]),
            ("wrong wire type", cat(&[key.clone(), vec![0x00]])),
            ("string as varint", wire::int(3, 1)),
            ("message as varint", wire::int(1, 1)),
            (
                "11-byte varint",
                cat(&[vec![0x28], vec![0xff; 10], vec![0x01]]),
            ),
            (
                "10th byte over 1",
                cat(&[vec![0x28], vec![0xff; 9], vec![0x02]]),
            ),
            ("length past the end", vec![0x1a, 0x05, b'a']),
            ("key over 32 bits", vec![0xff, 0xff, 0xff, 0xff, 0x7f]),
            ("group without end", vec![0xc3, 0x3e]),
            ("group with another end", vec![0xc3, 0x3e, 0xcc, 0x3e]),
            ("fixed32 cut", vec![0x3d, 0x00, 0x00]),
        ];
        for (what, bytes) in cases {
            assert!(
                is_malformed(&table, &bytes),
                "{what}: {:?}",
                verdict(&table, &bytes)
            );
        }
        // Unknown fields of every wire type are skipped, as prost does.
        let unknown = cat(&[
            wire::int(100, 1),
            wire::len(101, b"whatever"),
            vec![0xb1, 0x06, 0, 0, 0, 0, 0, 0, 0, 0],
            vec![0xbd, 0x06, 0, 0, 0, 0],
            vec![0xc3, 0x06, 0x08, 0x01, 0xc4, 0x06],
        ]);
        assert_eq!(verdict(&table, &unknown), Vec::<String>::new());
    }

    #[test]
    fn nesting_is_bounded() {
        let table = probe();
        // `next` within `next` ...: fine up to the bound, with its path.
        let nest =
            |depth: usize| (0..depth).fold(wire::len(3, b"long"), |inner, _| wire::len(4, &inner));
        let deep = nest(MAX_NESTING);
        let expected = format!(
            "{}tags[0]: must be at most 3 bytes",
            "next.".repeat(MAX_NESTING)
        );
        assert_eq!(verdict(&table, &deep), [expected]);
        assert!(is_malformed(&table, &nest(MAX_NESTING + 1)));
        // A bomb of a million nested groups in an unknown field: refused
        // at the bound, not a stack overflow.
        let mut bomb = Vec::new();
        for _ in 0..1_000_000 {
            wire::key(1000, 3, &mut bomb);
        }
        let err = table.check("test.v1.Outer", &bomb).expect_err("bomb");
        assert!(err.message().contains("nested too deeply"), "{err}");
        // A few levels are fine.
        let mut groups = Vec::new();
        for _ in 0..5 {
            wire::key(1000, 3, &mut groups);
        }
        for _ in 0..5 {
            wire::key(1000, 4, &mut groups);
        }
        assert_eq!(verdict(&table, &groups), Vec::<String>::new());
    }

    #[test]
    fn violations_are_bounded_with_the_list_named_first() {
        let table = contract();
        let request = agora_proto::orders::v1::PlaceOrderRequest {
            request_id: "r".into(),
            items: (0..100_000)
                .map(|_| agora_proto::orders::v1::LineItem {
                    product_id: "p".repeat(129),
                    quantity: 1,
                })
                .collect(),
            card_number: "4242424242424242".into(),
        };
        let bytes = prost_reflect::prost::Message::encode_to_vec(&request);
        let err = table
            .check("agora.orders.v1.PlaceOrderRequest", &bytes)
            .expect_err("too many");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        let violations = err.violations();
        assert_eq!(violations.len(), MAX_VIOLATIONS);
        assert_eq!(
            violations[0],
            ("items".to_owned(), "must have at most 100 items".to_owned())
        );
        assert_eq!(violations[1].0, "items[0].product_id");
        // 1 list + 100 items looked into; the rest unread.
        assert!(err.message().ends_with("and 81 more"), "{}", err.message());
    }

    #[test]
    fn misplaced_limits_are_refused() {
        let bytes = descriptor_set(
            r#"
            syntax = "proto3";
            package test.v1;
            import "agora/common/v1/limits.proto";
            message Bad {
              int64 count = 1 [(agora.common.v1.limits).max_bytes = 4];
              string name = 2 [(agora.common.v1.limits).max_items = 4];
              repeated string fine = 3 [(agora.common.v1.limits) = {max_items: 1, max_bytes: 1}];
              string unlimited = 4;
            }
            service Probe { rpc Call(Bad) returns (Bad); }
            "#,
        );
        let err = LimitsTable::from_descriptor_set(&bytes).expect_err("misplaced");
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
        assert!(
            err.message().contains("test.v1.Bad.count (max_bytes"),
            "{err}"
        );
        assert!(
            err.message().contains("test.v1.Bad.name (max_items"),
            "{err}"
        );
        assert!(!err.message().contains("fine"), "{err}");
        assert!(LimitsTable::from_descriptor_set(b"\xff\xff").is_err());

        // Unlimited fields are listed, not refused.
        let bytes = descriptor_set(
            r#"
            syntax = "proto3";
            package test.v1;
            message Loose { string name = 1; repeated int32 ids = 2; bytes raw = 3; }
            service Probe { rpc Call(Loose) returns (Loose); }
            "#,
        );
        let table = LimitsTable::from_descriptor_set(&bytes).expect("compiles");
        assert_eq!(
            table.unlimited_fields(),
            [
                "test.v1.Loose.ids (max_items)",
                "test.v1.Loose.name (max_bytes)",
                "test.v1.Loose.raw (max_bytes)",
            ]
        );
    }

    // ---- Property tests: the walk against the decoded message ----------

    /// The straightforward check on a decoded message: the same rules,
    /// read from the descriptors, applied field by field.
    fn reference(pool: &DescriptorPool, message: &DynamicMessage) -> Vec<(String, String)> {
        fn walk(
            pool: &DescriptorPool,
            message: &DynamicMessage,
            prefix: &str,
            lists: &mut Vec<(String, String)>,
            values: &mut Vec<(String, String)>,
        ) {
            let mut fields: Vec<FieldDescriptor> = message.descriptor().fields().collect();
            fields.sort_by_key(FieldDescriptor::number);
            for field in fields {
                if !message.has_field(&field) {
                    continue;
                }
                let limits = LimitsTable::limits_of(pool, &field);
                let path = format!("{prefix}{}", field.name());
                let value = message.get_field(&field);
                match value.as_ref() {
                    Value::List(items) => {
                        let max = limits.max_items.map_or(usize::MAX, |max| max as usize);
                        if items.len() > max {
                            lists.push((path.clone(), too_many(max as u32)));
                        }
                        for (index, item) in items.iter().take(max).enumerate() {
                            value_check(
                                pool,
                                item,
                                &format!("{path}[{index}]"),
                                limits,
                                lists,
                                values,
                            );
                        }
                    }
                    single => value_check(pool, single, &path, limits, lists, values),
                }
            }
        }
        fn value_check(
            pool: &DescriptorPool,
            value: &Value,
            path: &str,
            limits: FieldLimits,
            lists: &mut Vec<(String, String)>,
            values: &mut Vec<(String, String)>,
        ) {
            let max = limits.max_bytes.map_or(usize::MAX, |max| max as usize);
            match value {
                Value::String(text) if text.len() > max => {
                    values.push((path.to_owned(), too_long(max as u32)));
                }
                Value::Bytes(bytes) if bytes.len() > max => {
                    values.push((path.to_owned(), too_long(max as u32)));
                }
                Value::Message(nested) => walk(pool, nested, &format!("{path}."), lists, values),
                _ => {}
            }
        }
        let (mut lists, mut values) = (Vec::new(), Vec::new());
        walk(pool, message, "", &mut lists, &mut values);
        lists.extend(values);
        lists
    }

    /// A byte length near `max` (often just under, at, or just over it).
    fn length_near(rng: &mut StdRng, max: usize) -> usize {
        match rng.gen_range(0..6) {
            0 => 0,
            1 => max.saturating_sub(1),
            2 => max,
            3 => max + 1,
            _ => rng.gen_range(0..=max * 2 + 2),
        }
    }

    /// A string of about `len` bytes mixing 1- to 4-byte characters.
    fn text(rng: &mut StdRng, len: usize) -> String {
        let mut out = String::new();
        while out.len() < len {
            out.push(['a', 'é', '€', '🦀'][rng.gen_range(0..4)]);
        }
        out
    }

    fn random_value(
        pool: &DescriptorPool,
        field: &FieldDescriptor,
        limits: FieldLimits,
        rng: &mut StdRng,
        depth: usize,
    ) -> Value {
        let max = limits.max_bytes.map_or(16, |max| max as usize);
        match field.kind() {
            Kind::String => {
                let len = length_near(rng, max);
                Value::String(text(rng, len))
            }
            Kind::Bytes => {
                let len = length_near(rng, max);
                Value::Bytes(
                    (0..len)
                        .map(|_| rng.r#gen::<u8>())
                        .collect::<Vec<u8>>()
                        .into(),
                )
            }
            Kind::Message(nested) => Value::Message(random_message(pool, &nested, rng, depth + 1)),
            Kind::Enum(_) => Value::EnumNumber(rng.gen_range(-1..5)),
            Kind::Bool => Value::Bool(rng.r#gen()),
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => Value::I32(rng.r#gen()),
            Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => Value::I64(rng.r#gen()),
            Kind::Uint32 | Kind::Fixed32 => Value::U32(rng.r#gen()),
            Kind::Uint64 | Kind::Fixed64 => Value::U64(rng.r#gen()),
            Kind::Float => Value::F32(rng.r#gen()),
            Kind::Double => Value::F64(rng.r#gen()),
        }
    }

    fn random_message(
        pool: &DescriptorPool,
        descriptor: &MessageDescriptor,
        rng: &mut StdRng,
        depth: usize,
    ) -> DynamicMessage {
        let mut message = DynamicMessage::new(descriptor.clone());
        if depth > 4 {
            return message;
        }
        for field in descriptor.fields() {
            if field.is_map() || rng.gen_bool(0.3) {
                continue;
            }
            let limits = LimitsTable::limits_of(pool, &field);
            let value = if field.is_list() {
                let count = length_near(rng, limits.max_items.map_or(4, |max| max as usize));
                Value::List(
                    (0..count)
                        .map(|_| random_value(pool, &field, limits, rng, depth))
                        .collect(),
                )
            } else {
                random_value(pool, &field, limits, rng, depth)
            };
            message.set_field(&field, value);
        }
        message
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// For random requests of every RPC of the contract, with strings
        /// and lists around their limits, the walk over the encoded bytes
        /// names exactly the violations a field-by-field check of the
        /// decoded message finds (the first MAX_VIOLATIONS, and the count
        /// of the rest).
        #[test]
        fn the_walk_agrees_with_the_decoded_message(seed in any::<u64>(), pick in any::<prop::sample::Index>()) {
            let pool = contract_pool();
            let inputs: Vec<MessageDescriptor> = pool
                .services()
                .flat_map(|service| service.methods().map(|m| m.input()).collect::<Vec<_>>())
                .collect();
            let descriptor = pick.get(&inputs);
            let mut rng = StdRng::seed_from_u64(seed);
            let message = random_message(&pool, descriptor, &mut rng, 0);
            let bytes = message.encode_to_vec();
            let expected = reference(&pool, &message);
            match contract().check(descriptor.full_name(), &bytes) {
                Ok(()) => prop_assert!(expected.is_empty(), "missed {expected:?}"),
                Err(err) => {
                    prop_assert_eq!(err.kind(), ErrorKind::InvalidArgument);
                    let shown = expected.len().min(MAX_VIOLATIONS);
                    prop_assert_eq!(err.violations(), &expected[..shown]);
                    let omitted = expected.len() - shown;
                    if omitted > 0 {
                        let suffix = format!(" and {omitted} more");
                        prop_assert!(err.message().ends_with(&suffix), "{}", err.message());
                    }
                }
            }
        }

        /// On arbitrary bytes (and mutations of valid messages), the walk
        /// never lets through what prost cannot decode (which tonic would
        /// answer with INTERNAL), and never calls malformed, or not UTF-8,
        /// what prost decodes.
        #[test]
        fn the_walk_refuses_what_prost_refuses(seed in any::<u64>(), flips in 0usize..4) {
            let table = probe();
            let pool = DescriptorPool::decode(probe_set()).expect("probe");
            let outer = pool.get_message_by_name("test.v1.Outer").expect("Outer");
            let mut rng = StdRng::seed_from_u64(seed);
            let mut bytes = if flips == 0 {
                let len = rng.gen_range(0..64);
                (0..len).map(|_| rng.r#gen::<u8>()).collect::<Vec<u8>>()
            } else {
                random_message(&pool, &outer, &mut rng, 0).encode_to_vec()
            };
            for _ in 0..flips {
                if !bytes.is_empty() {
                    let at = rng.gen_range(0..bytes.len());
                    bytes[at] = rng.r#gen();
                }
            }
            let decoded = DynamicMessage::decode(outer.clone(), bytes.as_slice());
            let checked = table.check("test.v1.Outer", &bytes);
            let undecodable = checked.as_ref().is_err_and(|err| {
                err.reason() == Some(MALFORMED_MESSAGE)
                    || err.violations().iter().any(|(_, d)| d == NOT_UTF8)
            });
            if decoded.is_err() {
                prop_assert!(checked.is_err(), "passed {:?}", decoded.err());
            } else {
                prop_assert!(!undecodable, "{:?}", checked.err());
            }
        }
    }
}
