//! Protobuf wire bytes written by hand: what no well-behaved encoder (and
//! so no `DynamicMessage`) would ever produce, such as a string field
//! holding invalid UTF-8 or a field sent with the wrong wire type.

/// Protobuf wire types.
pub const VARINT: u8 = 0;
pub const FIXED64: u8 = 1;
pub const LEN: u8 = 2;
pub const START_GROUP: u8 = 3;
pub const END_GROUP: u8 = 4;
pub const FIXED32: u8 = 5;

/// Appends `value` as a base-128 varint.
pub fn varint(mut value: u64, out: &mut Vec<u8>) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Appends the key of field `number` with wire type `wire`.
pub fn key(number: u32, wire: u8, out: &mut Vec<u8>) {
    varint((u64::from(number) << 3) | u64::from(wire), out);
}

/// Field `number` as a length-delimited field holding `payload`.
pub fn len_field(number: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 10);
    key(number, LEN, &mut out);
    varint(payload.len() as u64, &mut out);
    out.extend_from_slice(payload);
    out
}

/// Field `number` with wire type `wire` and a plausible payload for that
/// wire type (whatever the field's declared type is).
pub fn field_as(number: u32, wire: u8) -> Vec<u8> {
    let mut out = Vec::new();
    match wire {
        VARINT => {
            key(number, VARINT, &mut out);
            varint(1, &mut out);
        }
        FIXED64 => {
            key(number, FIXED64, &mut out);
            out.extend_from_slice(&u64::MAX.to_le_bytes());
        }
        FIXED32 => {
            key(number, FIXED32, &mut out);
            out.extend_from_slice(&u32::MAX.to_le_bytes());
        }
        START_GROUP => {
            key(number, START_GROUP, &mut out);
            key(number, END_GROUP, &mut out);
        }
        _ => out = len_field(number, b"abc"),
    }
    out
}

/// Wraps `inner` (the bytes of the innermost message) in the enclosing
/// message fields `parents` (outermost first), so that it lands at the end
/// of a field path.
pub fn nest(parents: &[u32], inner: Vec<u8>) -> Vec<u8> {
    parents
        .iter()
        .rev()
        .fold(inner, |bytes, number| len_field(*number, &bytes))
}

/// An unknown field (number 1000) holding `depth` start-group keys and
/// their end-group keys: a decoder that skips groups recursively without a
/// limit runs out of stack.
pub fn nested_groups(depth: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..depth {
        key(1000, START_GROUP, &mut out);
    }
    for _ in 0..depth {
        key(1000, END_GROUP, &mut out);
    }
    out
}

/// A length-delimited unknown field whose declared length (4 GiB - 1) runs
/// far past the end of the message.
pub fn overlong_length() -> Vec<u8> {
    let mut out = Vec::new();
    key(1000, LEN, &mut out);
    varint(u64::from(u32::MAX), &mut out);
    out.extend_from_slice(b"short");
    out
}

/// A key that is an 11-byte varint (at most 10 are valid).
pub fn overlong_varint_key() -> Vec<u8> {
    let mut out = vec![0xff; 10];
    out.push(0x01);
    out
}

/// A gRPC length-prefixed message frame: compression flag, 4-byte
/// big-endian length, payload.
pub fn frame(flag: u8, declared_len: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 5);
    out.push(flag);
    out.extend_from_slice(&declared_len.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_keys_match_the_encoding_guide() {
        let mut out = Vec::new();
        varint(150, &mut out);
        assert_eq!(out, [0x96, 0x01]);
        let mut out = Vec::new();
        key(1, LEN, &mut out);
        assert_eq!(out, [0x0a]);
        assert_eq!(len_field(2, b"hi"), [0x12, 0x02, b'h', b'i']);
        assert_eq!(nest(&[1], vec![0x08, 0x01]), [0x0a, 0x02, 0x08, 0x01]);
        assert_eq!(frame(0, 2, b"ab"), [0, 0, 0, 0, 2, b'a', b'b']);
    }
}
