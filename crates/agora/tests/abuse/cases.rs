//! The hostile requests, generated from the contract: every RPC of every
//! Agora service comes from the descriptor pool (never a hand list, so a
//! new RPC is covered the day it is added), and its cases from the fields
//! of its input message.
//!
//! Each case is one call: a body (protobuf bytes, or whole gRPC frames for
//! the framing cases), the `authorization` it carries, an optional raw
//! `grpc-timeout`, and where it goes (the service's own port, or the
//! gateway). Cases are deterministic: random bodies come from an RNG seeded
//! per RPC and case, so a failure reproduces run after run.

use std::fmt;

use agora_platform::access::{AccessLevel, AccessTable};
use agora_platform::limits::LimitsTable;
use bytes::Bytes;
use prost::Message as _;
use prost_reflect::{
    DescriptorPool, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, Value,
};
use rand::{Rng as _, SeedableRng as _};
use tonic::Code;

use super::tokens::Tokens;
use super::wire;

/// The largest message a service accepts (`server.max_request_bytes`'s
/// default, 256 KiB; a test keeps them equal): "huge list" cases stay just
/// under it, and one case per list goes just over it.
pub const MAX_MESSAGE: usize = 256 * 1024;
/// A string "alone at 1 MiB".
const ONE_MIB: usize = 1024 * 1024;
/// Elements of a "huge list" (fewer if that would not fit in
/// [`MAX_MESSAGE`]).
const HUGE_LIST: usize = 100_000;
/// String length of the "maximal" case where the contract declares no
/// limit: a plausibly long name or description.
const PLAUSIBLE_MAX_BYTES: usize = 256;
/// List length of the "maximal" case where the contract declares no limit.
const PLAUSIBLE_MAX_ITEMS: usize = 50;
/// How deep field paths go into nested messages.
const MAX_DEPTH: usize = 4;
/// The packages of the services under test.
const AGORA_PACKAGE_PREFIX: &str = "agora.";

/// One RPC of the contract.
#[derive(Clone, Debug)]
pub struct Rpc {
    /// `/agora.users.v1.UserService/CreateUser`.
    pub path: String,
    /// The service's name in configuration (`users`), which is also the
    /// audience of service tokens addressed to it.
    pub service: String,
    /// The full name of the gRPC service, for `Health/Check`.
    pub grpc_service: String,
    pub level: AccessLevel,
    /// Services allowed to call it with a service token.
    pub callers: Vec<String>,
    pub server_streaming: bool,
    input: MessageDescriptor,
}

/// Every RPC of every `agora.*` service in the contract, with its declared
/// access rule.
pub fn rpcs() -> anyhow::Result<Vec<Rpc>> {
    let pool = DescriptorPool::decode(agora_proto::FILE_DESCRIPTOR_SET)?;
    let access = AccessTable::contract()?;
    let mut rpcs = Vec::new();
    for service in pool.services() {
        if !service.full_name().starts_with(AGORA_PACKAGE_PREFIX) {
            continue;
        }
        // `agora.users.v1` -> `users`.
        let name = service
            .package_name()
            .split('.')
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        for method in service.methods() {
            let path = format!("/{}/{}", service.full_name(), method.name());
            let rule = access
                .get(&path)
                .ok_or_else(|| anyhow::anyhow!("{path} declares no access"))?;
            anyhow::ensure!(!method.is_client_streaming(), "{path}: client streaming");
            rpcs.push(Rpc {
                path,
                service: name.clone(),
                grpc_service: service.full_name().to_owned(),
                level: rule.level,
                callers: rule.callers.clone(),
                server_streaming: method.is_server_streaming(),
                input: method.input(),
            });
        }
    }
    Ok(rpcs)
}

/// The `authorization` a case sends.
#[derive(Clone, Debug)]
pub enum Auth {
    None,
    /// `Bearer <token>`.
    Bearer(String),
    /// The header's raw bytes (not necessarily text).
    Raw(Vec<u8>),
    /// Two `authorization` headers.
    Twice(String, String),
}

/// Where a case is sent and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Through tonic (`Grpc<Channel>` and a pass-through codec) to the
    /// service's own port: `body` is one message.
    Service,
    /// The same through the gateway's port.
    Gateway,
    /// Hand-made HTTP/2 request to the service's port (hyper, no tonic on
    /// the client side, so that nothing enforces or rewrites a deadline or
    /// a frame): `body` is the whole request body, frames included.
    Raw,
}

/// One hostile request.
#[derive(Clone, Debug)]
pub struct Case {
    /// Index into the RPC list.
    pub rpc: usize,
    /// What is hostile about it, e.g. `string-1MiB:items[].product_id`.
    pub name: String,
    pub route: Route,
    pub body: Bytes,
    pub auth: Auth,
    /// A raw `grpc-timeout` value (raw route only).
    pub timeout: Option<&'static str>,
    /// Other metadata, raw (not necessarily text).
    pub headers: Vec<(&'static str, Vec<u8>)>,
    /// `content-type` and `grpc-encoding` of a raw request.
    pub content_type: &'static str,
    pub encoding: Option<&'static str>,
    /// Codes allowed for this case beyond [`ALLOWED`], with why.
    pub also_allowed: &'static [Code],
}

/// The codes any case may end with: the client's mistake answered for what
/// it is, or the service's limits doing their job. Never INTERNAL, UNKNOWN,
/// DATA_LOSS, UNIMPLEMENTED (every RPC here is real) or UNAVAILABLE (the
/// whole mesh is up: no case here takes a dependency away).
pub const ALLOWED: &[Code] = &[
    Code::Ok,
    Code::InvalidArgument,
    Code::NotFound,
    Code::AlreadyExists,
    Code::FailedPrecondition,
    Code::Aborted,
    Code::Unauthenticated,
    Code::PermissionDenied,
    Code::ResourceExhausted,
    Code::DeadlineExceeded,
    Code::OutOfRange,
];

/// A deadline case may also end CANCELLED: the deadline passing while the
/// call is in flight cancels it.
const DEADLINE_ALSO: &[Code] = &[Code::Cancelled];
/// A request compressed with an encoding the server does not support is
/// UNIMPLEMENTED by the gRPC compression spec (with `grpc-accept-encoding`
/// listing what it does support): the RPC exists, the encoding does not.
/// (The same spec asks for INTERNAL when the compressed flag is set without
/// any `grpc-encoding`; Agora answers that client mistake
/// INVALID_ARGUMENT like every other malformed request, and the suite
/// holds it to that.)
const SPEC_UNIMPLEMENTED: &[Code] = &[Code::Unimplemented];

impl Case {
    fn new(rpc: usize, name: impl Into<String>, body: impl Into<Bytes>, auth: Auth) -> Self {
        Self {
            rpc,
            name: name.into(),
            route: Route::Service,
            body: body.into(),
            auth,
            timeout: None,
            headers: Vec::new(),
            content_type: "application/grpc",
            encoding: None,
            also_allowed: &[],
        }
    }

    /// A case with no token sent to the service's own port.
    pub fn plain(rpc: usize, name: &str, body: Bytes) -> Self {
        Self::new(rpc, name, body, Auth::None)
    }

    /// Whether `code` is an acceptable end for this case.
    pub fn allows(&self, code: Code) -> bool {
        ALLOWED.contains(&code) || self.also_allowed.contains(&code)
    }
}

/// A field path from the input message to one field, e.g. `items[].quantity`.
#[derive(Clone)]
struct FieldPath(Vec<FieldDescriptor>);

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, field) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            f.write_str(field.name())?;
            if field.is_list() && i + 1 < self.0.len() {
                f.write_str("[]")?;
            }
        }
        Ok(())
    }
}

impl FieldPath {
    fn leaf(&self) -> &FieldDescriptor {
        // Paths are never empty: `paths` builds each from one field up.
        &self.0[self.0.len() - 1]
    }

    /// The field numbers of the messages enclosing the leaf, outermost first.
    fn parent_numbers(&self) -> Vec<u32> {
        self.0[..self.0.len() - 1]
            .iter()
            .map(FieldDescriptor::number)
            .collect()
    }
}

/// Every field path of `message`, depth first, not entering a message type
/// already on the path (no recursion) nor deeper than [`MAX_DEPTH`]. Map
/// fields are left out (no request has one).
fn paths(message: &MessageDescriptor) -> Vec<FieldPath> {
    fn walk(
        message: &MessageDescriptor,
        prefix: &mut Vec<FieldDescriptor>,
        out: &mut Vec<FieldPath>,
    ) {
        for field in message.fields() {
            if field.is_map() {
                continue;
            }
            prefix.push(field.clone());
            out.push(FieldPath(prefix.clone()));
            if let Kind::Message(nested) = field.kind() {
                let enclosing = |f: &FieldDescriptor| matches!(f.kind(), Kind::Message(m) if m.full_name() == nested.full_name());
                let seen = nested.full_name() == message.full_name()
                    || prefix[..prefix.len() - 1].iter().any(enclosing);
                if !seen && prefix.len() < MAX_DEPTH {
                    walk(&nested, prefix, out);
                }
            }
            prefix.pop();
        }
    }
    let mut out = Vec::new();
    walk(message, &mut Vec::new(), &mut out);
    out
}

/// The declared limits of a field (`(agora.common.v1.limits)`), if the
/// contract has that option and the field sets it.
#[derive(Clone, Copy, Debug, Default)]
struct Limits {
    max_bytes: Option<usize>,
    max_items: Option<usize>,
}

fn limits(field: &FieldDescriptor) -> Limits {
    // The servers' own reading of the contract, so the suite aims exactly
    // at the limits they enforce.
    let declared = LimitsTable::limits_of(field.parent_pool(), field);
    let size = |n: Option<u32>| n.and_then(|n| usize::try_from(n).ok());
    Limits {
        max_bytes: size(declared.max_bytes),
        max_items: size(declared.max_items),
    }
}

/// Real values for fields whose name says what they hold, so that
/// plausible requests get past the first checks and into the handler.
pub struct Known {
    /// A product that exists, with stock.
    pub product_id: String,
    /// The suite's user.
    pub user_id: String,
}

/// A plausible value of a field (one element for a list).
fn plausible_scalar(field: &FieldDescriptor, known: &Known, depth: usize) -> Option<Value> {
    let name = field.name();
    Some(match field.kind() {
        Kind::String => Value::String(if name.contains("email") || name == "recipient" {
            "abuse@example.com".to_owned()
        } else if name.contains("currency") {
            "EUR".to_owned()
        } else if name.contains("card") {
            "4242424242424242".to_owned()
        } else if name.contains("password") {
            "correct horse battery".to_owned()
        } else if name == "product_id" {
            known.product_id.clone()
        } else if name == "user_id" {
            known.user_id.clone()
        } else if name == "id" || name.ends_with("_id") {
            uuid::Uuid::now_v7().to_string()
        } else if name.contains("token") {
            String::new()
        } else {
            format!("abuse-{name}")
        }),
        Kind::Bytes => Value::Bytes(Bytes::from_static(b"abuse")),
        Kind::Bool => Value::Bool(true),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            Value::I32(if name.contains("page_size") { 10 } else { 1 })
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => Value::I64(if name.contains("amount") {
            1_000
        } else if name == "seconds" {
            agora_platform::time::now_micros() / 1_000_000
        } else {
            1
        }),
        Kind::Uint32 | Kind::Fixed32 => Value::U32(1),
        Kind::Uint64 | Kind::Fixed64 => Value::U64(1),
        Kind::Float => Value::F32(1.0),
        Kind::Double => Value::F64(1.0),
        Kind::Enum(e) => Value::EnumNumber(
            e.values()
                .map(|v| v.number())
                .find(|n| *n != 0)
                .unwrap_or(0),
        ),
        Kind::Message(m) => {
            if depth >= MAX_DEPTH {
                return None;
            }
            Value::Message(plausible(&m, known, depth + 1))
        }
    })
}

/// A message with every field set to something plausible, lists to one
/// element.
fn plausible(message: &MessageDescriptor, known: &Known, depth: usize) -> DynamicMessage {
    let mut out = DynamicMessage::new(message.clone());
    for field in message.fields() {
        if field.is_map() {
            continue;
        }
        if let Some(value) = plausible_scalar(&field, known, depth) {
            out.set_field(&field, in_list(&field, value));
        }
    }
    out
}

/// `value` as the value of `field`: wrapped in a one-element list for a
/// repeated field.
fn in_list(field: &FieldDescriptor, value: Value) -> Value {
    if field.is_list() && !matches!(value, Value::List(_)) {
        Value::List(vec![value])
    } else {
        value
    }
}

/// Every string at its declared limit (or [`PLAUSIBLE_MAX_BYTES`]) and
/// every list at its declared item limit (or [`PLAUSIBLE_MAX_ITEMS`]).
fn maximal(message: &MessageDescriptor, known: &Known, depth: usize) -> DynamicMessage {
    let mut out = DynamicMessage::new(message.clone());
    for field in message.fields() {
        if field.is_map() {
            continue;
        }
        let limit = limits(&field);
        let one = match field.kind() {
            Kind::String => Some(Value::String(
                "m".repeat(limit.max_bytes.unwrap_or(PLAUSIBLE_MAX_BYTES).min(ONE_MIB)),
            )),
            Kind::Bytes => Some(Value::Bytes(Bytes::from(vec![
                b'm';
                limit
                    .max_bytes
                    .unwrap_or(PLAUSIBLE_MAX_BYTES)
                    .min(ONE_MIB)
            ]))),
            Kind::Message(m) if depth < MAX_DEPTH => {
                Some(Value::Message(maximal(&m, known, depth + 1)))
            }
            _ => plausible_scalar(&field, known, depth),
        };
        let Some(one) = one else { continue };
        let value = if field.is_list() {
            let items = limit.max_items.unwrap_or(PLAUSIBLE_MAX_ITEMS);
            // Lists inside lists at their maximum would multiply: one level
            // of maximal lists is what a caller can really send.
            let items = if depth > 0 { items.min(4) } else { items };
            Value::List(vec![one; items])
        } else {
            one
        };
        out.set_field(&field, value);
    }
    out
}

/// `message` with the field at `path` set to `leaf` (already a list for a
/// repeated leaf), creating plausible enclosing messages (the first element
/// of an enclosing list) on the way.
fn set_at(message: &mut DynamicMessage, path: &[FieldDescriptor], leaf: Value, known: &Known) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    if rest.is_empty() {
        message.set_field(first, in_list(first, leaf));
        return;
    }
    let Kind::Message(nested_desc) = first.kind() else {
        return;
    };
    let slot = message.get_field_mut(first);
    let nested = match slot {
        Value::List(items) => {
            if items.is_empty() {
                items.push(Value::Message(plausible(&nested_desc, known, 1)));
            }
            match items.first_mut() {
                Some(Value::Message(m)) => m,
                _ => return,
            }
        }
        Value::Message(m) => m,
        _ => return,
    };
    set_at(nested, rest, leaf, known);
}

/// What the generator needs beyond the RPC: tokens and real ids.
pub struct Context<'a> {
    pub tokens: &'a Tokens,
    pub known: &'a Known,
}

/// The token an RPC needs: none for public RPCs, the user's for user-level,
/// the admin's for admin-level, a service token of its first allowed caller
/// for service-level ones.
pub fn right_auth(rpc: &Rpc, ctx: &Context<'_>) -> anyhow::Result<Auth> {
    Ok(match rpc.level {
        AccessLevel::Public => Auth::None,
        AccessLevel::User => Auth::Bearer(ctx.tokens.user.clone()),
        AccessLevel::Admin => Auth::Bearer(ctx.tokens.admin.clone()),
        AccessLevel::Service => {
            let caller = rpc
                .callers
                .first()
                .ok_or_else(|| anyhow::anyhow!("{}: no caller allowed", rpc.path))?;
            Auth::Bearer(ctx.tokens.service(caller, &rpc.service)?)
        }
    })
}

/// A caller the RPC does not list, for "wrong caller" tokens.
fn other_service(rpc: &Rpc) -> &'static str {
    agora_testkit::SERVICES
        .iter()
        .copied()
        .find(|s| *s != rpc.service && !rpc.callers.iter().any(|c| c == s))
        .unwrap_or("notifications")
}

/// A deterministic seed for case `name` of RPC `path`.
fn seed(path: &str, name: &str) -> u64 {
    // FNV-1a: stable across runs and platforms (std's hasher is not).
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in path.bytes().chain([0]).chain(name.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

fn random_bytes(path: &str, name: &str, len: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed(path, name));
    let mut out = vec![0; len];
    rng.fill(out.as_mut_slice());
    out
}

/// The sizes of random bodies: empty, tiny (where a decoder misreads a
/// key), a page, a frame's worth, 1 MiB.
const RANDOM_SIZES: [usize; 12] = [0, 1, 2, 3, 5, 8, 16, 64, 256, 4096, 65_536, ONE_MIB];

/// Every case for RPC number `index`.
pub fn cases_for(index: usize, rpc: &Rpc, ctx: &Context<'_>) -> anyhow::Result<Vec<Case>> {
    let auth = right_auth(rpc, ctx)?;
    let known = ctx.known;
    let base = plausible(&rpc.input, known, 0);
    let base_bytes = base.encode_to_vec();
    let mut cases = Vec::new();
    let mut body = |name: String, bytes: Vec<u8>| {
        cases.push(Case::new(index, name, bytes, auth.clone()));
    };

    body("empty".into(), Vec::new());
    body("plausible".into(), base_bytes.clone());
    body(
        "maximal".into(),
        maximal(&rpc.input, known, 0).encode_to_vec(),
    );

    let all_paths = paths(&rpc.input);
    for path in &all_paths {
        let leaf = path.leaf();
        let limit = limits(leaf);
        let with = |value: Value| {
            let mut message = base.clone();
            set_at(&mut message, &path.0, value, known);
            message.encode_to_vec()
        };
        match leaf.kind() {
            Kind::String => {
                body(
                    format!("string-1MiB:{path}"),
                    with(Value::String("s".repeat(ONE_MIB))),
                );
                if let Some(max) = limit.max_bytes {
                    body(
                        format!("string-limit+1:{path}"),
                        with(Value::String("s".repeat(max + 1))),
                    );
                    // Within the limit in characters, four times over it in
                    // bytes: a limit must count bytes (or say it counts
                    // characters and bound them).
                    body(
                        format!("string-limit-4-byte-chars:{path}"),
                        with(Value::String("\u{1F600}".repeat(max))),
                    );
                }
                // Valid UTF-8 a database may still refuse: NUL, controls,
                // a right-to-left override, a lone combining mark.
                body(
                    format!("string-nul-and-controls:{path}"),
                    with(Value::String("a\0b\u{1}\u{7f}\u{202e}\u{301}".into())),
                );
                // Invalid UTF-8 cannot be built with a DynamicMessage: the
                // field appended by hand to the plausible message.
                let mut raw = base_bytes.clone();
                raw.extend(wire::nest(
                    &path.parent_numbers(),
                    wire::len_field(leaf.number(), b"\xff\xfe\xc3\x28abuse\xed\xa0\x80"),
                ));
                body(format!("invalid-utf8:{path}"), raw);
            }
            Kind::Bytes => {
                body(
                    format!("bytes-1MiB:{path}"),
                    with(Value::Bytes(Bytes::from(vec![0xff; ONE_MIB]))),
                );
            }
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
                for (label, n) in [("min", i32::MIN), ("max", i32::MAX), ("-1", -1), ("0", 0)] {
                    body(format!("i32-{label}:{path}"), with(Value::I32(n)));
                }
            }
            Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
                for (label, n) in [("min", i64::MIN), ("max", i64::MAX), ("-1", -1), ("0", 0)] {
                    body(format!("i64-{label}:{path}"), with(Value::I64(n)));
                }
            }
            Kind::Uint32 | Kind::Fixed32 => {
                body(format!("u32-max:{path}"), with(Value::U32(u32::MAX)));
            }
            Kind::Uint64 | Kind::Fixed64 => {
                body(format!("u64-max:{path}"), with(Value::U64(u64::MAX)));
            }
            Kind::Float | Kind::Double => {
                for (label, x) in [("nan", f64::NAN), ("inf", f64::INFINITY)] {
                    let value = if matches!(leaf.kind(), Kind::Float) {
                        Value::F32(x as f32)
                    } else {
                        Value::F64(x)
                    };
                    body(format!("float-{label}:{path}"), with(value));
                }
            }
            Kind::Enum(_) => {
                for n in [999, -1] {
                    body(format!("enum-{n}:{path}"), with(Value::EnumNumber(n)));
                }
            }
            Kind::Bool | Kind::Message(_) => {}
        }

        if leaf.is_list() {
            // One element, then repeated: the element's encoded size tells
            // how many fit under the message limit.
            let element = match plausible_scalar(leaf, known, path.0.len()) {
                Some(element) => element,
                None => continue,
            };
            let mut probe = base.clone();
            set_at(&mut probe, &path.0, Value::List(vec![]), known);
            let empty_len = probe.encode_to_vec().len();
            let mut one = base.clone();
            set_at(&mut one, &path.0, Value::List(vec![element.clone()]), known);
            let per_item = one.encode_to_vec().len().saturating_sub(empty_len).max(1);
            let fit = (MAX_MESSAGE - empty_len - 1024) / per_item;
            let huge = HUGE_LIST.min(fit);
            body(
                format!("list-{huge}-items:{path}"),
                with(Value::List(vec![element.clone(); huge])),
            );
            let over = (MAX_MESSAGE - empty_len) / per_item + 16;
            body(
                format!("list-over-4MiB:{path}"),
                with(Value::List(vec![element.clone(); over])),
            );
            if let Some(max) = limit.max_items {
                body(
                    format!("list-limit+1:{path}"),
                    with(Value::List(vec![element; max + 1])),
                );
            }
        }

        // Wrong wire types: a length-delimited field (string, bytes,
        // message) as a varint and as fixed64; a varint as length-delimited
        // and fixed32; a fixed-width one as a varint; and any field as a
        // (deprecated) group.
        let wrong: &[(&str, u8)] = match leaf.kind() {
            Kind::String | Kind::Bytes | Kind::Message(_) => {
                &[("varint", wire::VARINT), ("fixed64", wire::FIXED64)]
            }
            Kind::Fixed64 | Kind::Sfixed64 | Kind::Double => &[("varint", wire::VARINT)],
            Kind::Fixed32 | Kind::Sfixed32 | Kind::Float => &[("varint", wire::VARINT)],
            _ if leaf.is_list() => &[("fixed64", wire::FIXED64)],
            _ => &[("len", wire::LEN), ("fixed32", wire::FIXED32)],
        };
        for (label, wire_type) in wrong.iter().chain(&[("group", wire::START_GROUP)]) {
            let mut raw = base_bytes.clone();
            raw.extend(wire::nest(
                &path.parent_numbers(),
                wire::field_as(leaf.number(), *wire_type),
            ));
            body(format!("wire-as-{label}:{path}"), raw);
        }
    }

    // The message as a whole.
    let with_tail = |tail: &[u8]| {
        let mut raw = base_bytes.clone();
        raw.extend_from_slice(tail);
        raw
    };
    let mut unknown = Vec::new();
    wire::key(1000, wire::VARINT, &mut unknown);
    wire::varint(u64::MAX, &mut unknown);
    body("unknown-field-1000".into(), with_tail(&unknown));
    body(
        "unknown-field-max-number-64KiB".into(),
        with_tail(&wire::len_field((1 << 29) - 1, &[0xab; 65_536])),
    );
    body("field-number-0".into(), with_tail(&[0x02, 0x01, 0x00]));
    body("wire-type-6".into(), with_tail(&[0x0e, 0x01]));
    body("wire-type-7".into(), with_tail(&[0x0f, 0x01]));
    body("end-group-unopened".into(), with_tail(&[0x0c]));
    body(
        "groups-nested-100000".into(),
        with_tail(&wire::nested_groups(100_000)),
    );
    body(
        "length-past-end".into(),
        with_tail(&wire::overlong_length()),
    );
    body(
        "varint-11-bytes".into(),
        with_tail(&wire::overlong_varint_key()),
    );
    body(
        "truncated-half".into(),
        base_bytes[..base_bytes.len() / 2].to_vec(),
    );
    body(
        "truncated-last-byte".into(),
        base_bytes[..base_bytes.len().saturating_sub(1)].to_vec(),
    );
    // Field 1 (whatever its type) repeated until the message is nearly
    // the message limit: decoders keep the last value (or, for a list, every one).
    let mut repeated = Vec::new();
    while repeated.len() < MAX_MESSAGE - 64 * 1024 {
        repeated.extend(wire::len_field(1, b"again and again"));
    }
    body("field-1-repeated-to-the-limit".into(), repeated);

    for size in RANDOM_SIZES {
        let name = format!("random-{size}B");
        let bytes = random_bytes(&rpc.path, &name, size);
        body(name, bytes);
    }
    let name = "random-limit+1";
    body(name.into(), random_bytes(&rpc.path, name, MAX_MESSAGE + 1));
    // Far over the limit: refused from the length prefix alone.
    let name = "random-4MiB";
    body(name.into(), random_bytes(&rpc.path, name, 4 * ONE_MIB));

    metadata_cases(index, rpc, ctx, &base_bytes, &mut cases)?;
    deadline_cases(index, &base_bytes, &auth, &mut cases);
    frame_cases(index, &base_bytes, &auth, &mut cases);
    gateway_cases(index, rpc, ctx, &base_bytes, &auth, &mut cases)?;
    Ok(cases)
}

/// The plausible request with every kind of bad (or differently good)
/// `authorization`.
fn metadata_cases(
    index: usize,
    rpc: &Rpc,
    ctx: &Context<'_>,
    base: &[u8],
    cases: &mut Vec<Case>,
) -> anyhow::Result<()> {
    let tokens = ctx.tokens;
    let audience = rpc.service.as_str();
    let caller = rpc
        .callers
        .first()
        .map_or("orders", String::as_str)
        .to_owned();
    let other_audience = agora_testkit::SERVICES
        .iter()
        .copied()
        .find(|s| *s != audience)
        .unwrap_or("users");
    let auths: Vec<(&str, Auth)> = vec![
        ("anonymous", Auth::None),
        (
            "auth-invalid-utf8",
            Auth::Raw(b"Bearer \xff\xfe\xc3\x28\x80".to_vec()),
        ),
        ("auth-garbage", Auth::Bearer("not-a-token".into())),
        ("auth-three-garbage-parts", Auth::Bearer("a.b.c".into())),
        ("auth-many-parts", Auth::Bearer("a.b.c.d.e.f.g".into())),
        ("auth-bearer-empty", Auth::Raw(b"Bearer ".to_vec())),
        ("auth-bearer-only", Auth::Raw(b"Bearer".to_vec())),
        (
            "auth-basic",
            Auth::Raw(b"Basic YWJ1c2U6Y29ycmVjdCBob3JzZQ==".to_vec()),
        ),
        ("auth-8KiB-token", Auth::Bearer("a".repeat(8 * 1024))),
        (
            "auth-two-headers",
            Auth::Twice(tokens.user.clone(), "garbage".into()),
        ),
        ("token-user", Auth::Bearer(tokens.user.clone())),
        ("token-admin", Auth::Bearer(tokens.admin.clone())),
        (
            "token-service-allowed-caller",
            Auth::Bearer(tokens.service(&caller, audience)?),
        ),
        (
            "token-service-wrong-caller",
            Auth::Bearer(tokens.service(other_service(rpc), audience)?),
        ),
        (
            "token-service-wrong-audience",
            Auth::Bearer(tokens.service(&caller, other_audience)?),
        ),
        (
            "token-service-unknown-key",
            Auth::Bearer(tokens.service_unknown_key(&caller, audience)?),
        ),
        (
            "token-service-expired",
            Auth::Bearer(tokens.service_expired(&caller, audience)?),
        ),
        (
            "token-user-unknown-key",
            Auth::Bearer(tokens.user_unknown_key()?),
        ),
        ("token-user-expired", Auth::Bearer(tokens.user_expired()?)),
        ("token-alg-none", Auth::Bearer(tokens.alg_none())),
        ("token-kid-traversal", Auth::Bearer(tokens.kid_traversal()?)),
    ];
    for (name, auth) in auths {
        cases.push(Case::new(index, name, base.to_vec(), auth));
    }
    // Other metadata every server reads: trace context (parsed by the
    // telemetry layer before anything else) and the compressions accepted.
    let headers: [(&str, &'static str, Vec<u8>); 5] = [
        (
            "traceparent-garbage",
            "traceparent",
            b"00-zz-zz-zz".to_vec(),
        ),
        (
            "traceparent-invalid-utf8",
            "traceparent",
            b"00-\xff\xfe-\x80-01".to_vec(),
        ),
        ("tracestate-8KiB", "tracestate", vec![b'a'; 8 * 1024]),
        (
            "grpc-accept-encoding-garbage",
            "grpc-accept-encoding",
            b"\xff, gzip;;, *".to_vec(),
        ),
        (
            "unknown-header-invalid-utf8",
            "x-agora-abuse",
            b"\xff".to_vec(),
        ),
    ];
    for (name, header, value) in headers {
        let mut case = Case::new(index, name, base.to_vec(), right_auth(rpc, ctx)?);
        case.headers.push((header, value));
        cases.push(case);
    }
    // A hostile body without a token: the access layer and the decoder
    // meet in another order.
    for (name, bytes) in [
        ("anonymous+empty", Vec::new()),
        (
            "anonymous+random-1KiB",
            random_bytes(&rpc.path, "anonymous+random", 1024),
        ),
    ] {
        cases.push(Case::new(index, name, bytes, Auth::None));
    }
    Ok(())
}

/// `grpc-timeout` of nothing, of years, and malformed, sent raw so that no
/// client-side deadline answers first.
fn deadline_cases(index: usize, base: &[u8], auth: &Auth, cases: &mut Vec<Case>) {
    let framed = wire::frame(0, base.len() as u32, base);
    for timeout in [
        "0n",
        "1n",
        "1u",
        "99999999H",
        "99999999S",
        "abc",
        "-1S",
        "1",
        "123456789S",
        "",
        "1.5S",
    ] {
        let mut case = Case::new(
            index,
            format!("grpc-timeout:{timeout:?}"),
            framed.clone(),
            auth.clone(),
        );
        case.route = Route::Raw;
        case.timeout = Some(timeout);
        case.also_allowed = DEADLINE_ALSO;
        cases.push(case);
    }
}

/// Broken gRPC framing, sent raw.
fn frame_cases(index: usize, base: &[u8], auth: &Auth, cases: &mut Vec<Case>) {
    let len = base.len() as u32;
    let mut frame = |name: &str, bytes: Vec<u8>, content_type, encoding, also| {
        let mut case = Case::new(index, name, bytes, auth.clone());
        case.route = Route::Raw;
        case.content_type = content_type;
        case.encoding = encoding;
        case.also_allowed = also;
        cases.push(case);
    };
    let grpc = "application/grpc";
    frame("frame-ok", wire::frame(0, len, base), grpc, None, &[]);
    frame("frame-no-message", Vec::new(), grpc, None, &[]);
    frame("frame-header-cut", vec![0, 0, 0], grpc, None, &[]);
    frame(
        "frame-truncated",
        wire::frame(0, len + 100, base),
        grpc,
        None,
        &[],
    );
    frame(
        "frame-declares-4GiB",
        wire::frame(0, u32::MAX, base),
        grpc,
        None,
        &[],
    );
    frame(
        "frame-two-messages",
        [wire::frame(0, len, base), wire::frame(0, len, base)].concat(),
        grpc,
        None,
        &[],
    );
    frame(
        "frame-invalid-flag",
        wire::frame(7, len, base),
        grpc,
        None,
        &[],
    );
    frame(
        "frame-compressed-without-encoding",
        wire::frame(1, len, base),
        grpc,
        None,
        &[],
    );
    frame(
        "frame-gzip-garbage",
        wire::frame(1, 8, b"notgzip!"),
        grpc,
        Some("gzip"),
        SPEC_UNIMPLEMENTED,
    );
    frame(
        "frame-unknown-encoding",
        wire::frame(1, len, base),
        grpc,
        Some("abuse-zip"),
        SPEC_UNIMPLEMENTED,
    );
    frame(
        "frame-content-type-grpc-json",
        wire::frame(0, len, base),
        "application/grpc+json",
        None,
        &[],
    );
}

/// A subset through the gateway, as an outside client would send it (the
/// gateway refuses service-level RPCs from outside, so those are expected
/// PERMISSION_DENIED or UNAUTHENTICATED there).
fn gateway_cases(
    index: usize,
    rpc: &Rpc,
    ctx: &Context<'_>,
    base: &[u8],
    right: &Auth,
    cases: &mut Vec<Case>,
) -> anyhow::Result<()> {
    let tokens = ctx.tokens;
    let mut invalid_utf8 = base.to_vec();
    if let Some(field) = rpc
        .input
        .fields()
        .find(|f| matches!(f.kind(), Kind::String))
    {
        invalid_utf8.extend(wire::len_field(field.number(), b"\xff\xfe"));
    }
    let list: Vec<(&str, Vec<u8>, Auth)> = vec![
        ("gateway:empty", Vec::new(), right.clone()),
        ("gateway:plausible", base.to_vec(), right.clone()),
        ("gateway:anonymous", base.to_vec(), Auth::None),
        (
            "gateway:token-user",
            base.to_vec(),
            Auth::Bearer(tokens.user.clone()),
        ),
        (
            "gateway:token-admin",
            base.to_vec(),
            Auth::Bearer(tokens.admin.clone()),
        ),
        (
            "gateway:auth-garbage",
            base.to_vec(),
            Auth::Bearer("garbage".into()),
        ),
        (
            "gateway:auth-invalid-utf8",
            base.to_vec(),
            Auth::Raw(b"Bearer \xff\xfe".to_vec()),
        ),
        (
            "gateway:token-user-expired",
            base.to_vec(),
            Auth::Bearer(tokens.user_expired()?),
        ),
        ("gateway:invalid-utf8", invalid_utf8, right.clone()),
        (
            "gateway:random-1KiB",
            random_bytes(&rpc.path, "gateway:random", 1024),
            right.clone(),
        ),
        (
            "gateway:random-1MiB",
            random_bytes(&rpc.path, "gateway:random-1MiB", ONE_MIB),
            right.clone(),
        ),
        (
            "gateway:random-4MiB+1",
            random_bytes(&rpc.path, "gateway:random-limit+1", MAX_MESSAGE + 1),
            right.clone(),
        ),
    ];
    for (name, bytes, auth) in list {
        let mut case = Case::new(index, name, bytes, auth);
        case.route = Route::Gateway;
        cases.push(case);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_message_is_the_servers_default() {
        assert_eq!(
            MAX_MESSAGE,
            agora_platform::config::ServerConfig::default().max_request_bytes
        );
    }

    #[test]
    fn every_rpc_of_the_six_services_is_found() -> anyhow::Result<()> {
        let rpcs = rpcs()?;
        let services: std::collections::BTreeSet<&str> =
            rpcs.iter().map(|r| r.service.as_str()).collect();
        assert_eq!(
            services.into_iter().collect::<Vec<_>>(),
            [
                "catalog",
                "inventory",
                "notifications",
                "orders",
                "payments",
                "users"
            ]
        );
        assert!(rpcs.iter().any(|r| r.path == "/agora.orders.v1.OrderService/WatchOrder"
            && r.server_streaming));
        Ok(())
    }

    #[test]
    fn seeds_are_stable() {
        assert_eq!(seed("/a/B", "c"), seed("/a/B", "c"));
        assert_ne!(seed("/a/B", "c"), seed("/a/B", "d"));
        assert_eq!(random_bytes("/a/B", "c", 8), random_bytes("/a/B", "c", 8));
    }
}
