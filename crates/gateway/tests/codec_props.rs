//! Property tests of the gateway's wire codecs (`agora_gateway::codec`).
//!
//! Round trips, robustness on arbitrary bytes (no panic, bounded buffering),
//! and chunking invariance: however a body is split into chunks, the
//! decoders give the same frames and the same error.
//!
//! 64 cases a property by default, so `cargo test` stays fast; set
//! `PROPTEST_CASES` (e.g. 10000) for a longer run.

use agora_gateway::codec::CodecError;
use agora_gateway::codec::connect::{
    ConnectCodec, ErrorDetail, code_from_name, code_name, details_from_status_bin, error_body,
    parse_get_query, parse_timeout_ms, status_bin,
};
use agora_gateway::codec::frame::{
    FRAME_HEADER_LEN, Frame, FrameDecoder, FrameLimiter, encode_frame,
};
use agora_gateway::codec::grpc_web::{parse_trailer_block, trailer_frame};
use agora_gateway::codec::json::JsonCodec;
use agora_gateway::codec::status::{decode_grpc_message, encode_grpc_message};
use agora_gateway::codec::text::{Base64Decoder, encode_base64};
use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use proptest::prelude::*;
use prost::Message as _;

/// Cases a property: `PROPTEST_CASES` if set, else a number that keeps the
/// suite to a few seconds.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(64);
    ProptestConfig::with_cases(cases)
}

/// Splits `input` at the given cut points (taken modulo its length).
fn split<'a>(input: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = cuts
        .iter()
        .map(|cut| {
            if input.is_empty() {
                0
            } else {
                cut % (input.len() + 1)
            }
        })
        .collect();
    points.push(0);
    points.push(input.len());
    points.sort_unstable();
    points.windows(2).map(|w| &input[w[0]..w[1]]).collect()
}

/// What decoding a whole body gives: the frames before the first error, and
/// the error (or the result of `finish`).
#[derive(Debug, PartialEq)]
struct Outcome {
    frames: Vec<Frame>,
    end: Result<(), CodecError>,
}

/// Decodes `chunks` as a body, checking the buffering bound after each chunk.
fn decode_frames(chunks: &[&[u8]], max: usize) -> Outcome {
    let mut decoder = FrameDecoder::new(max);
    let mut frames = Vec::new();
    for chunk in chunks {
        decoder.push(chunk);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(error) => {
                    assert_eq!(decoder.buffered(), 0, "a refused body is not kept");
                    return Outcome {
                        frames,
                        end: Err(error),
                    };
                }
            }
        }
        // One incomplete frame at most, and never one above the limit.
        assert!(
            decoder.buffered() < FRAME_HEADER_LEN + max,
            "buffered {} with max {max}",
            decoder.buffered()
        );
    }
    Outcome {
        frames,
        end: decoder.finish(),
    }
}

/// What the zero-copy limiter says about the same chunks.
fn limit_frames(chunks: &[&[u8]], max: usize) -> (u64, Result<(), CodecError>) {
    let mut limiter = FrameLimiter::new(max);
    for chunk in chunks {
        if let Err(error) = limiter.check(chunk) {
            return (limiter.frames(), Err(error));
        }
    }
    (limiter.frames(), limiter.finish())
}

/// Decodes grpc-web-text chunks: all the output, or the error.
fn decode_text(chunks: &[&[u8]]) -> Result<Vec<u8>, CodecError> {
    let mut decoder = Base64Decoder::new();
    let mut out = Vec::new();
    for chunk in chunks {
        out.extend_from_slice(&decoder.push(chunk)?);
    }
    decoder.finish()?;
    Ok(out)
}

fn frames_strategy() -> impl Strategy<Value = Vec<(u8, Vec<u8>)>> {
    prop::collection::vec(
        (any::<u8>(), prop::collection::vec(any::<u8>(), 0..40)),
        0..6,
    )
}

fn cuts() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(any::<usize>(), 0..8)
}

/// Byte soup biased toward small frame headers, so that the decoders get
/// past the first header more often than uniform bytes would let them.
fn soup() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![
            3 => any::<u8>(),
            1 => Just(0u8),
            1 => 0u8..8,
        ],
        0..200,
    )
}

/// The codec over the contract, built once for all cases.
fn json_codec() -> JsonCodec {
    static CODEC: std::sync::OnceLock<JsonCodec> = std::sync::OnceLock::new();
    CODEC
        .get_or_init(|| {
            match prost_reflect::DescriptorPool::decode(agora_proto::FILE_DESCRIPTOR_SET) {
                Ok(pool) => JsonCodec::new(pool),
                Err(error) => panic!("the contract's descriptor set does not load: {error}"),
            }
        })
        .clone()
}

fn order_strategy() -> impl Strategy<Value = agora_proto::orders::v1::Order> {
    use agora_proto::common::v1::Money;
    use agora_proto::orders::v1::{Order, OrderItem};
    let money = (".{0,4}", any::<i64>()).prop_map(|(currency_code, amount_minor)| Money {
        currency_code,
        amount_minor,
    });
    let item = (".{0,8}", any::<i64>(), prop::option::of(money.clone())).prop_map(
        |(product_id, quantity, unit_price)| OrderItem {
            product_id,
            quantity,
            unit_price,
        },
    );
    // Timestamps in the range proto3 JSON can write (years 1 to 9999).
    let timestamp = (-62_135_596_800i64..=253_402_300_799, 0i32..1_000_000_000)
        .prop_map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos });
    (
        ".{0,12}",
        prop::collection::vec(item, 0..4),
        prop::option::of(money),
        // Known statuses and an unknown number (written as a number).
        prop_oneof![0i32..=4, Just(42)],
        ".{0,12}",
        prop::option::of(timestamp),
    )
        .prop_map(
            |(id, items, total, status, failure_code, created_at)| Order {
                id,
                items,
                total,
                status,
                failure_code,
                created_at,
                ..Default::default()
            },
        )
}

/// JSON shaped like a `PlaceOrderRequest` often enough to be accepted,
/// with wrong types, unknown keys and edge-case numbers mixed in.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::{Value, json};
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<i64>().prop_map(|n| Value::from(n.to_string())),
        any::<f64>().prop_map(|f| json!(f)),
        Just(json!("9223372036854775808")),
        Just(json!("1e3")),
        Just(json!(1e3)),
        ".{0,6}".prop_map(Value::from),
    ];
    let key = prop_oneof![
        Just("requestId"),
        Just("request_id"),
        Just("items"),
        Just("productId"),
        Just("quantity"),
        Just("cardNumber"),
        Just("unknown"),
    ];
    leaf.prop_recursive(4, 32, 4, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::from),
            prop::collection::btree_map(key.clone(), inner, 0..4).prop_map(|map| {
                Value::Object(map.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
            }),
        ]
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn frames_round_trip_under_any_chunking(frames in frames_strategy(), cuts in cuts()) {
        let body: Vec<u8> = frames.iter().flat_map(|(f, p)| encode_frame(*f, p).to_vec()).collect();
        let chunks = split(&body, &cuts);
        // The limit is the largest payload: a frame exactly at it passes.
        let max = frames.iter().map(|(_, p)| p.len()).max().unwrap_or(0);
        let outcome = decode_frames(&chunks, max);
        prop_assert_eq!(outcome.end, Ok(()));
        let decoded: Vec<(u8, Vec<u8>)> =
            outcome.frames.into_iter().map(|f| (f.flags, f.payload.to_vec())).collect();
        prop_assert_eq!(&decoded, &frames);
        prop_assert_eq!(limit_frames(&chunks, max), (frames.len() as u64, Ok(())));
    }

    #[test]
    fn byte_soup_decodes_the_same_however_it_is_split(
        input in soup(), cuts in cuts(), max in 0usize..64,
    ) {
        let whole = decode_frames(&[&input], max);
        let chunked = decode_frames(&split(&input, &cuts), max);
        prop_assert_eq!(&chunked, &whole);
        // The limiter agrees with the decoder on the verdict.
        let (count, verdict) = limit_frames(&split(&input, &cuts), max);
        prop_assert_eq!(&verdict, &whole.end);
        // It counts the frames the decoder returned, plus the header of an
        // incomplete last frame if there is one.
        let returned = whole.frames.len() as u64;
        prop_assert!(count == returned || count == returned + 1, "{} vs {}", count, returned);
    }

    #[test]
    fn oversized_frames_are_refused_before_their_payload(
        declared in 1u32.., max in 0usize..1024, tail in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        prop_assume!(declared as usize > max);
        let mut body = vec![0u8];
        body.extend_from_slice(&declared.to_be_bytes());
        body.extend_from_slice(&tail);
        let outcome = decode_frames(&[&body[..FRAME_HEADER_LEN]], max);
        let expected = Err(CodecError::TooLarge { declared: u64::from(declared), max });
        prop_assert_eq!(&outcome.end, &expected);
        prop_assert_eq!(limit_frames(&[&body], max).1, expected);
    }

    #[test]
    fn base64_round_trips_per_frame_with_padding_between(
        frames in frames_strategy(), cuts in cuts(),
    ) {
        // grpc-web-text senders may encode each frame on its own.
        let mut text = Vec::new();
        let mut binary = Vec::new();
        for (flags, payload) in &frames {
            let frame = encode_frame(*flags, payload);
            text.extend_from_slice(&encode_base64(&frame));
            binary.extend_from_slice(&frame);
        }
        prop_assert_eq!(decode_text(&split(&text, &cuts)), Ok(binary));
    }

    #[test]
    fn base64_soup_matches_a_strict_decoder_group_by_group(
        input in prop::collection::vec(
            prop_oneof![
                4 => prop::sample::select(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".to_vec()),
                1 => Just(b'='),
                1 => any::<u8>(),
            ],
            0..64,
        ),
        cuts in cuts(),
    ) {
        let whole = decode_text(&[&input]);
        prop_assert_eq!(&decode_text(&split(&input, &cuts)), &whole);
        // Oracle: the base64 crate's strict standard engine on each group.
        let oracle: Option<Vec<u8>> = if input.len() % 4 == 0 {
            input
                .chunks(4)
                .map(|group| base64::engine::general_purpose::STANDARD.decode(group).ok())
                .collect::<Option<Vec<_>>>()
                .map(|groups| groups.concat())
        } else {
            None
        };
        prop_assert_eq!(whole.ok(), oracle);
    }

    #[test]
    fn trailers_round_trip(
        entries in prop::collection::vec(
            (
                prop_oneof![
                    Just("grpc-status".to_owned()),
                    Just("grpc-message".to_owned()),
                    "x-[a-z0-9-]{1,12}",
                    "[a-z][a-z0-9_.-]{0,12}-bin",
                ],
                // Header values: visible ASCII inside, no blanks at the ends.
                "([!-~]([ -~]{0,20}[!-~])?)?",
            ),
            0..8,
        ),
    ) {
        let mut map = HeaderMap::new();
        for (key, value) in &entries {
            let name = HeaderName::from_bytes(key.as_bytes()).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let value = HeaderValue::from_str(value).map_err(|e| TestCaseError::fail(e.to_string()))?;
            map.append(name, value);
        }
        let frame = trailer_frame(&map);
        prop_assert_eq!(frame[0], 0x80);
        let block = &frame[FRAME_HEADER_LEN..];
        if map.contains_key("grpc-status") {
            prop_assert!(block.starts_with(b"grpc-status:"));
        }
        prop_assert_eq!(parse_trailer_block(block), Ok(map));
    }

    #[test]
    fn trailer_parsing_never_panics(input in prop::collection::vec(any::<u8>(), 0..128)) {
        let _ = parse_trailer_block(&input);
    }

    #[test]
    fn grpc_message_round_trips(text in ".{0,40}") {
        let encoded = encode_grpc_message(&text);
        prop_assert!(encoded.bytes().all(|b| (0x20..=0x7e).contains(&b)));
        prop_assert_eq!(decode_grpc_message(encoded.as_bytes()), text);
    }

    #[test]
    fn timeouts_parse_exactly_up_to_ten_digits(millis in 0u64..10_000_000_000, junk in ".{0,12}") {
        prop_assert_eq!(
            parse_timeout_ms(millis.to_string().as_bytes()),
            Ok(std::time::Duration::from_millis(millis))
        );
        let valid = !junk.is_empty() && junk.len() <= 10 && junk.bytes().all(|b| b.is_ascii_digit());
        prop_assert_eq!(parse_timeout_ms(junk.as_bytes()).is_ok(), valid);
    }

    #[test]
    fn status_details_round_trip(
        details in prop::collection::vec(
            ("[a-z]{1,8}(\\.[A-Za-z]{1,8}){0,3}", prop::collection::vec(any::<u8>(), 0..32)),
            0..4,
        ),
        message in ".{0,20}",
        code in 1i32..=16,
    ) {
        let details: Vec<ErrorDetail> = details
            .into_iter()
            .map(|(type_name, value)| ErrorDetail { type_name, value: Bytes::from(value) })
            .collect();
        let bin = status_bin(tonic::Code::from(code), &message, &details);
        prop_assert_eq!(details_from_status_bin(bin.as_bytes()), Ok(details.clone()));

        let body = error_body(tonic::Code::from(code), &message, &details);
        let json: serde_json::Value = serde_json::from_slice(&body).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(json["code"].as_str().and_then(code_from_name), Some(tonic::Code::from(code)));
        prop_assert_eq!(json["code"].as_str(), Some(code_name(tonic::Code::from(code))));
        prop_assert_eq!(json["message"].as_str().unwrap_or_default(), message.as_str());
        prop_assert_eq!(json["details"].as_array().map_or(0, Vec::len), details.len());
    }

    #[test]
    fn status_details_soup_never_panics(input in prop::collection::vec(any::<u8>(), 0..128)) {
        let _ = details_from_status_bin(&input);
    }

    #[test]
    fn get_query_messages_round_trip(message in prop::collection::vec(any::<u8>(), 0..64)) {
        // Percent-encode every byte: the query carries the bytes as they are.
        let escaped: String = message.iter().map(|b| format!("%{b:02X}")).collect();
        let query = format!("connect=v1&encoding=json&message={escaped}");
        prop_assert_eq!(
            parse_get_query(&query, 64),
            Ok((ConnectCodec::Json, Bytes::from(message.clone())))
        );
        let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&message);
        let query = format!("message={encoded}&base64=1&encoding=proto&connect=v1");
        prop_assert_eq!(
            parse_get_query(&query, 64),
            Ok((ConnectCodec::Proto, Bytes::from(message.clone())))
        );
        if !message.is_empty() {
            let too_small = parse_get_query(&query, message.len() - 1);
            prop_assert!(matches!(too_small, Err(CodecError::TooLarge { .. })), "{:?}", too_small);
        }
    }

    #[test]
    fn get_query_soup_never_panics(query in "[a-z0-9=&%+_-]{0,80}", max in 0usize..32) {
        if let Ok((_, message)) = parse_get_query(&query, max) {
            prop_assert!(message.len() <= max);
        }
    }

    #[test]
    fn orders_round_trip_through_json(order in order_strategy()) {
        let codec = json_codec();
        let descriptor = codec
            .pool()
            .get_message_by_name("agora.orders.v1.Order")
            .ok_or_else(|| TestCaseError::fail("Order is not in the contract"))?;
        let json = codec
            .proto_to_json(&descriptor, &order.encode_to_vec())
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let proto = codec
            .json_to_proto(&descriptor, &json)
            .map_err(|e| TestCaseError::fail(format!("{e}: {}", String::from_utf8_lossy(&json))))?;
        let back = agora_proto::orders::v1::Order::decode(proto)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(back, order);
    }

    #[test]
    fn json_soup_never_panics(body in prop::collection::vec(any::<u8>(), 0..96)) {
        let codec = json_codec();
        let descriptor = codec
            .pool()
            .get_message_by_name("agora.orders.v1.PlaceOrderRequest")
            .ok_or_else(|| TestCaseError::fail("PlaceOrderRequest is not in the contract"))?;
        if let Ok(proto) = codec.json_to_proto(&descriptor, &body) {
            prop_assert!(codec.proto_to_json(&descriptor, &proto).is_ok());
        }
    }

    #[test]
    fn accepted_json_is_stable_through_protobuf(value in json_value()) {
        // Whatever JSON is accepted converts to protobuf, back to JSON, and
        // again to the same protobuf bytes.
        let codec = json_codec();
        let descriptor = codec
            .pool()
            .get_message_by_name("agora.orders.v1.PlaceOrderRequest")
            .ok_or_else(|| TestCaseError::fail("PlaceOrderRequest is not in the contract"))?;
        let body = value.to_string();
        if let Ok(proto) = codec.json_to_proto(&descriptor, body.as_bytes()) {
            let json = codec
                .proto_to_json(&descriptor, &proto)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let again = codec
                .json_to_proto(&descriptor, &json)
                .map_err(|e| TestCaseError::fail(format!("{e}: {}", String::from_utf8_lossy(&json))))?;
            prop_assert_eq!(again, proto);
        }
    }
}
