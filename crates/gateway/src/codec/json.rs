//! The proto3 JSON mapping, for Connect's JSON codec, driven by a descriptor
//! pool so the gateway needs no generated types.
//!
//! Decisions, where the mapping leaves room:
//! - Unknown fields in a request are refused (`INVALID_ARGUMENT`): a typo in
//!   a field name would otherwise be silently dropped.
//! - An empty body is refused: it is not JSON. connect-go answers the same
//!   ("zero-length payload is not a valid JSON object"); send `{}` for an
//!   empty message. (Binary `application/proto` bodies never come here: the
//!   empty protobuf message is the empty body, passed through.)
//! - Nesting is bounded by serde_json's recursion limit (128 levels of
//!   arrays and objects), so a deeply nested body is an error, not a stack
//!   overflow; protobuf decoding has prost's limit of 100 nested messages.
//! - Output is what protojson writes by default: lowerCamelCase names,
//!   fields at their default value left out, enums as names, 64-bit
//!   integers as strings.

use bytes::Bytes;
use prost::Message as _;
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, MessageDescriptor, SerializeOptions,
};

use super::{CodecError, bounded};

/// JSON to protobuf and back for the messages of one descriptor pool.
/// Cheap to clone (the pool is reference-counted).
#[derive(Debug, Clone)]
pub struct JsonCodec {
    pool: DescriptorPool,
}

impl JsonCodec {
    /// A codec over `pool`: the contract's `agora_proto::FILE_DESCRIPTOR_SET`
    /// plus whatever else the gateway serves (health, reflection). A
    /// `google.protobuf.Any` can only be converted when its type is in the
    /// pool.
    pub fn new(pool: DescriptorPool) -> Self {
        Self { pool }
    }

    /// The descriptor pool, to look message types up by method.
    pub fn pool(&self) -> &DescriptorPool {
        &self.pool
    }

    /// Converts a JSON request body to the protobuf encoding of `input`.
    /// Errors are [`CodecError::InvalidJson`], naming the problem (the
    /// parser's message, cut short) but never quoting more than a field name
    /// or value excerpt.
    pub fn json_to_proto(
        &self,
        input: &MessageDescriptor,
        json: &[u8],
    ) -> Result<Bytes, CodecError> {
        if json.iter().all(u8::is_ascii_whitespace) {
            return Err(CodecError::InvalidJson(format!(
                "the body is empty; send {{}} for an empty {}",
                input.full_name()
            )));
        }
        let mut deserializer = serde_json::Deserializer::from_slice(json);
        let message = DynamicMessage::deserialize_with_options(
            input.clone(),
            &mut deserializer,
            &DeserializeOptions::new().deny_unknown_fields(true),
        )
        .map_err(|error| json_error(input, error))?;
        // Trailing characters after the object are an error too.
        deserializer
            .end()
            .map_err(|error| json_error(input, error))?;
        Ok(Bytes::from(message.encode_to_vec()))
    }

    /// Converts the protobuf encoding of `output` to proto3 JSON. Errors are
    /// [`CodecError::InvalidProto`] (the bytes come from a backend, so the
    /// gateway answers `INTERNAL`).
    pub fn proto_to_json(
        &self,
        output: &MessageDescriptor,
        proto: &[u8],
    ) -> Result<Bytes, CodecError> {
        let message = DynamicMessage::decode(output.clone(), proto).map_err(|error| {
            CodecError::InvalidProto(format!(
                "not a valid {}: {}",
                output.full_name(),
                bounded(error)
            ))
        })?;
        let mut serializer = serde_json::Serializer::new(Vec::new());
        message
            .serialize_with_options(&mut serializer, &SerializeOptions::new())
            .map_err(|error| {
                CodecError::InvalidProto(format!(
                    "{} has no JSON form: {}",
                    output.full_name(),
                    bounded(error)
                ))
            })?;
        Ok(Bytes::from(serializer.into_inner()))
    }
}

fn json_error(input: &MessageDescriptor, error: serde_json::Error) -> CodecError {
    CodecError::InvalidJson(format!(
        "not a valid {}: {}",
        input.full_name(),
        bounded(error)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn codec() -> JsonCodec {
        let pool = DescriptorPool::decode(agora_proto::FILE_DESCRIPTOR_SET).expect("contract");
        JsonCodec::new(pool)
    }

    fn message(codec: &JsonCodec, name: &str) -> MessageDescriptor {
        codec.pool().get_message_by_name(name).expect(name)
    }

    fn to_value(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).expect("json")
    }

    #[test]
    fn request_json_becomes_the_same_bytes_as_prost() {
        use agora_proto::orders::v1::{LineItem, PlaceOrderRequest};
        let codec = codec();
        let input = message(&codec, "agora.orders.v1.PlaceOrderRequest");
        let expected = PlaceOrderRequest {
            items: vec![LineItem {
                product_id: "p1".into(),
                quantity: 3,
            }],
            ..Default::default()
        };
        // int64 accepted both as a string (canonical) and as a number;
        // field names both lowerCamelCase and as in the .proto.
        for body in [
            r#"{"items":[{"productId":"p1","quantity":"3"}]}"#,
            r#"{"items":[{"product_id":"p1","quantity":3}]}"#,
        ] {
            let bytes = codec.json_to_proto(&input, body.as_bytes()).expect(body);
            assert_eq!(
                PlaceOrderRequest::decode(bytes).expect("proto"),
                expected,
                "{body}"
            );
        }
    }

    #[test]
    fn response_json_uses_camel_case_names_string_int64_and_enum_names() {
        use agora_proto::common::v1::Money;
        use agora_proto::orders::v1::{Order, OrderItem, OrderStatus};
        let codec = codec();
        let output = message(&codec, "agora.orders.v1.Order");
        let order = Order {
            id: "o1".into(),
            items: vec![OrderItem {
                product_id: "p1".into(),
                quantity: 2,
                unit_price: Some(Money {
                    currency_code: "EUR".into(),
                    amount_minor: 9_007_199_254_740_993,
                }),
            }],
            status: OrderStatus::Completed as i32,
            created_at: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            ..Default::default()
        };
        let json = codec
            .proto_to_json(&output, &order.encode_to_vec())
            .expect("valid");
        assert_eq!(
            to_value(&json),
            json!({
                "id": "o1",
                "items": [{
                    "productId": "p1",
                    "quantity": "2",
                    "unitPrice": {"currencyCode": "EUR", "amountMinor": "9007199254740993"}
                }],
                "status": "ORDER_STATUS_COMPLETED",
                "createdAt": "2023-11-14T22:13:20Z"
            })
        );
        // Defaults left out: the empty message is `{}`.
        assert_eq!(
            &codec.proto_to_json(&output, b"").expect("empty")[..],
            b"{}"
        );
    }

    #[test]
    fn enum_names_and_numbers_are_accepted_unknown_names_refused() {
        use agora_proto::users::v1::{User, UserStatus};
        let codec = codec();
        let input = message(&codec, "agora.users.v1.User");
        for body in [r#"{"status":"USER_STATUS_ACTIVE"}"#, r#"{"status":2}"#] {
            let bytes = codec.json_to_proto(&input, body.as_bytes()).expect(body);
            assert_eq!(
                User::decode(bytes).expect("proto").status,
                UserStatus::Active as i32
            );
        }
        let error = codec
            .json_to_proto(&input, br#"{"status":"USER_STATUS_SUPREME"}"#)
            .expect_err("unknown enum name");
        assert_eq!(error.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn unknown_fields_are_refused_and_named() {
        let codec = codec();
        let input = message(&codec, "agora.users.v1.GetUserRequest");
        let error = codec
            .json_to_proto(&input, br#"{"id":"u1","idd":"u2"}"#)
            .expect_err("unknown field");
        let text = error.to_string();
        assert!(
            text.contains("idd") && text.contains("agora.users.v1.GetUserRequest"),
            "{text}"
        );
        assert_eq!(error.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn malformed_json_is_refused() {
        let codec = codec();
        let input = message(&codec, "agora.users.v1.GetUserRequest");
        for body in [
            &b""[..],
            b"  \n",
            b"{",
            b"{\"id\":}",
            b"[]",
            b"null",
            b"{\"id\":\"u1\"} trailing",
            b"{\"id\":1}",
            b"\xff",
        ] {
            let error = codec.json_to_proto(&input, body).expect_err("malformed");
            assert!(
                matches!(error, CodecError::InvalidJson(_)),
                "{body:?}: {error:?}"
            );
        }
        let error = codec.json_to_proto(&input, b"").expect_err("empty");
        assert!(error.to_string().contains("{}"), "{error}");
    }

    #[test]
    fn int64_out_of_range_is_refused() {
        let codec = codec();
        let input = message(&codec, "agora.orders.v1.LineItem");
        for body in [
            r#"{"quantity":"9223372036854775808"}"#,
            r#"{"quantity":1.5}"#,
            r#"{"quantity":"abc"}"#,
        ] {
            assert!(
                codec.json_to_proto(&input, body.as_bytes()).is_err(),
                "{body}"
            );
        }
        assert!(
            codec
                .json_to_proto(&input, br#"{"quantity":"-9223372036854775808"}"#)
                .is_ok()
        );
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let codec = codec();
        let input = message(&codec, "agora.users.v1.GetUserRequest");
        let deep = format!("{{\"id\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(codec.json_to_proto(&input, deep.as_bytes()).is_err());
    }

    #[test]
    fn errors_do_not_echo_long_input() {
        let codec = codec();
        let input = message(&codec, "agora.users.v1.GetUserRequest");
        let key = "k".repeat(100_000);
        let body = format!("{{\"{key}\":1}}");
        let text = codec
            .json_to_proto(&input, body.as_bytes())
            .expect_err("unknown")
            .to_string();
        assert!(text.len() < 600, "{} chars", text.len());
    }

    #[test]
    fn invalid_protobuf_is_an_internal_error() {
        let codec = codec();
        let output = message(&codec, "agora.users.v1.User");
        // Field 1 (string) announcing 100 bytes, with 1.
        let error = codec
            .proto_to_json(&output, b"\x0a\x64a")
            .expect_err("truncated");
        assert_eq!(error.code(), tonic::Code::Internal);
        // Invalid UTF-8 in a string field.
        assert!(codec.proto_to_json(&output, b"\x0a\x01\xff").is_err());
    }

    #[test]
    fn json_round_trips_through_protobuf() {
        let codec = codec();
        let input = message(&codec, "agora.users.v1.UserEvent");
        let body = json!({
            "eventId": "e1",
            "userId": "u1",
            "version": "7",
            "occurredAt": "2024-01-02T03:04:05.500Z",
            "userCreated": {"email": "a@example.com"}
        });
        let proto = codec.json_to_proto(&input, body.to_string().as_bytes());
        let proto = match proto {
            Ok(proto) => proto,
            Err(error) => panic!("{error}"),
        };
        let back = codec.proto_to_json(&input, &proto).expect("valid");
        let back = to_value(&back);
        assert_eq!(back["userCreated"]["email"], "a@example.com");
        assert_eq!(back["version"], "7");
        assert_eq!(back["occurredAt"], "2024-01-02T03:04:05.500Z");
    }
}
