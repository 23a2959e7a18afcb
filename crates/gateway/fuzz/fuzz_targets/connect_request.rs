//! The Connect request path: JSON bodies against the contract's messages,
//! GET queries, and what the gateway builds from a backend's status and
//! messages (status details, error bodies, proto3 JSON responses).
//!
//! Input: `[mode, selector, rest ...]`. The selector picks the message type
//! (index into the contract's `agora.*` messages sorted by name) or a limit.
//! Besides "never panics", each run checks round trips: accepted JSON has a
//! JSON form that parses back to the same protobuf, and every JSON the
//! gateway writes parses.

#![no_main]

use std::sync::LazyLock;

use agora_gateway::codec::connect::{
    connect_kind, details_from_status_bin, end_stream_frame, error_body, parse_get_query,
    parse_timeout_ms,
};
use agora_gateway::codec::json::JsonCodec;
use agora_gateway::codec::status::{decode_grpc_message, encode_grpc_message};
use libfuzzer_sys::fuzz_target;
use prost_reflect::{DescriptorPool, MessageDescriptor};

struct Contract {
    codec: JsonCodec,
    messages: Vec<MessageDescriptor>,
}

static CONTRACT: LazyLock<Contract> = LazyLock::new(|| {
    let pool =
        DescriptorPool::decode(agora_proto::FILE_DESCRIPTOR_SET).expect("the contract loads");
    let mut messages: Vec<MessageDescriptor> = pool
        .all_messages()
        .filter(|message| message.full_name().starts_with("agora."))
        .collect();
    messages.sort_by(|a, b| a.full_name().cmp(b.full_name()));
    Contract {
        codec: JsonCodec::new(pool),
        messages,
    }
});

fuzz_target!(|data: &[u8]| {
    let [mode, selector, rest @ ..] = data else {
        return;
    };
    match mode % 5 {
        0 => json_request(*selector, rest),
        1 => proto_response(*selector, rest),
        2 => get_query(*selector, rest),
        3 => status_details(*selector, rest),
        _ => headers(rest),
    }
});

fn message(selector: u8) -> &'static MessageDescriptor {
    let messages = &CONTRACT.messages;
    &messages[usize::from(selector) % messages.len()]
}

fn json_request(selector: u8, body: &[u8]) {
    let codec = &CONTRACT.codec;
    let input = message(selector);
    if let Ok(proto) = codec.json_to_proto(input, body) {
        let json = codec
            .proto_to_json(input, &proto)
            .expect("an accepted message has a JSON form");
        let again = codec
            .json_to_proto(input, &json)
            .expect("the gateway's JSON parses");
        assert_eq!(again, proto);
    }
}

fn proto_response(selector: u8, body: &[u8]) {
    let codec = &CONTRACT.codec;
    let output = message(selector);
    if let Ok(json) = codec.proto_to_json(output, body) {
        serde_json::from_slice::<serde_json::Value>(&json).expect("valid JSON");
        let proto = codec
            .json_to_proto(output, &json)
            .expect("the gateway's JSON parses");
        let json_again = codec.proto_to_json(output, &proto).expect("still valid");
        assert_eq!(json_again, json);
    }
}

fn get_query(selector: u8, query: &[u8]) {
    let max = usize::from(selector) * 2;
    if let Ok((_, message)) = parse_get_query(&String::from_utf8_lossy(query), max) {
        assert!(message.len() <= max);
    }
}

fn status_details(selector: u8, value: &[u8]) {
    if let Ok(details) = details_from_status_bin(value) {
        let code = tonic_code(selector);
        let body = error_body(code, "message", &details);
        let json: serde_json::Value = serde_json::from_slice(&body).expect("valid JSON");
        assert_eq!(
            json["details"].as_array().map_or(0, Vec::len),
            details.len()
        );
        let frame = end_stream_frame(Some((code, "", &details)), &http::HeaderMap::new());
        serde_json::from_slice::<serde_json::Value>(&frame[5..]).expect("valid JSON");
    }
}

fn tonic_code(selector: u8) -> tonic::Code {
    tonic::Code::from(i32::from(selector % 17))
}

fn headers(value: &[u8]) {
    if let Ok(timeout) = parse_timeout_ms(value) {
        assert!((1..=10).contains(&value.len()));
        assert_eq!(
            timeout.as_millis().to_string().trim_start_matches('0'),
            String::from_utf8_lossy(value).trim_start_matches('0')
        );
    }
    let _ = connect_kind(&String::from_utf8_lossy(value));
    let text = decode_grpc_message(value);
    assert_eq!(
        decode_grpc_message(encode_grpc_message(&text).as_bytes()),
        text
    );
}
