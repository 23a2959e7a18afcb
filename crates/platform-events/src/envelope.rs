//! What travels on the wire: the protobuf event as payload, CloudEvents-style
//! headers around it, and the one table of every event of the contract.

use agora_proto::{catalog, orders, payments, users};

/// Header names of every published event. `Nats-Msg-Id` is the event id too,
/// so JetStream drops a second publish of the same event.
pub mod header {
    /// The event id, a UUIDv7 (also `Nats-Msg-Id`).
    pub const CE_ID: &str = "ce-id";
    /// The full protobuf name of the payload, e.g. `agora.users.v1.UserCreated`.
    pub const CE_TYPE: &str = "ce-type";
    /// The service that published it, e.g. `users`.
    pub const CE_SOURCE: &str = "ce-source";
    /// When the state change committed, RFC 3339 (UTC, microseconds).
    pub const CE_TIME: &str = "ce-time";
    /// The CloudEvents spec version, always `1.0`.
    pub const CE_SPECVERSION: &str = "ce-specversion";
    /// The id of the aggregate (user, product, order, payment) it is about.
    pub const AGGREGATE_ID: &str = "agora-aggregate-id";
    /// The aggregate's version after the event.
    pub const AGGREGATE_VERSION: &str = "agora-aggregate-version";
    /// W3C trace context of the change that caused it.
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C trace state, when there is one.
    pub const TRACESTATE: &str = "tracestate";
}

/// A domain event of the contract: a protobuf message with a fixed subject,
/// naming its aggregate and the aggregate's version after the change.
pub trait DomainEvent: prost::Message + Default + Send + Sync + 'static {
    /// The full protobuf name, sent as `ce-type`.
    const TYPE: &'static str;
    /// `agora.<domain>.<event>`.
    const SUBJECT: &'static str;
    /// The id of the aggregate the event is about.
    fn aggregate_id(&self) -> &str;
    /// The aggregate's version after the event: a consumer that has applied
    /// a higher one drops this event as stale.
    fn aggregate_version(&self) -> i64;
}

/// One event type of the contract, for tools that handle events they do not
/// know statically (`agora events tail` decoding payloads, say).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventType {
    /// The full protobuf name.
    pub type_name: &'static str,
    /// Its subject.
    pub subject: &'static str,
}

macro_rules! domain_events {
    ($($event:ty => $type_name:literal on $subject:literal, aggregate $id:ident;)+) => {
        $(
            impl DomainEvent for $event {
                const TYPE: &'static str = $type_name;
                const SUBJECT: &'static str = $subject;
                fn aggregate_id(&self) -> &str {
                    &self.$id
                }
                fn aggregate_version(&self) -> i64 {
                    self.version
                }
            }
        )+

        /// Every event of the contract: the one place a subject is spelled.
        pub const EVENT_TYPES: &[EventType] = &[
            $(EventType { type_name: $type_name, subject: $subject },)+
        ];
    };
}

domain_events! {
    users::v1::UserCreated => "agora.users.v1.UserCreated" on "agora.users.user_created", aggregate user_id;
    users::v1::UserEmailUpdated => "agora.users.v1.UserEmailUpdated" on "agora.users.user_email_updated", aggregate user_id;
    users::v1::UserActivated => "agora.users.v1.UserActivated" on "agora.users.user_activated", aggregate user_id;
    catalog::v1::ProductPriceChanged => "agora.catalog.v1.ProductPriceChanged" on "agora.catalog.product_price_changed", aggregate product_id;
    orders::v1::OrderPlaced => "agora.orders.v1.OrderPlaced" on "agora.orders.order_placed", aggregate order_id;
    orders::v1::OrderCompleted => "agora.orders.v1.OrderCompleted" on "agora.orders.order_completed", aggregate order_id;
    orders::v1::OrderCancelled => "agora.orders.v1.OrderCancelled" on "agora.orders.order_cancelled", aggregate order_id;
    orders::v1::OrderFailed => "agora.orders.v1.OrderFailed" on "agora.orders.order_failed", aggregate order_id;
    payments::v1::PaymentCaptured => "agora.payments.v1.PaymentCaptured" on "agora.payments.payment_captured", aggregate payment_id;
    payments::v1::PaymentRefunded => "agora.payments.v1.PaymentRefunded" on "agora.payments.payment_refunded", aggregate payment_id;
}

/// The value of header `name` as text, empty when absent.
pub fn header_text(headers: &async_nats::HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use prost::Message as _;
    use prost_types::FileDescriptorSet;

    use super::*;

    #[test]
    fn every_event_type_names_a_message_of_the_contract_and_its_own_stream() {
        let set = FileDescriptorSet::decode(agora_proto::FILE_DESCRIPTOR_SET).expect("descriptor");
        let names: Vec<String> = set
            .file
            .iter()
            .flat_map(|file| {
                let package = file.package().to_owned();
                file.message_type
                    .iter()
                    .map(move |m| format!("{package}.{}", m.name()))
            })
            .collect();
        for event in EVENT_TYPES {
            assert!(names.iter().any(|n| n == event.type_name), "{event:?}");
            // agora.<domain>.v1.X is published on agora.<domain>.<x>.
            let domain = event.type_name.split('.').nth(1).expect("domain");
            assert!(
                event.subject.starts_with(&format!("agora.{domain}.")),
                "{event:?}"
            );
            assert!(
                crate::streams::stream_of_subject(event.subject).is_some(),
                "{event:?}"
            );
        }
    }

    #[test]
    fn subjects_are_unique() {
        for (i, a) in EVENT_TYPES.iter().enumerate() {
            for b in &EVENT_TYPES[i + 1..] {
                assert_ne!(a.subject, b.subject);
            }
        }
    }
}
