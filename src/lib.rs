//! The Agora protobuf contract, generated from `proto/` at build time.
//!
//! Every service's messages, its tonic client (`*_client`) and server
//! (`*_server`) live in a module named after its protobuf package, for
//! example [`users::v1::user_service_client::UserServiceClient`].
//! [`FILE_DESCRIPTOR_SET`] is the encoded descriptor of the whole contract, for
//! gRPC server reflection and for routing by method path.
//!
//! This crate holds generated code and nothing else (besides the redacting
//! `Debug` of the few messages that carry secrets, which must live next to
//! the types): no workspace crate is a dependency of it.

#![allow(missing_docs, clippy::all)]

mod redact;

/// The encoded `google.protobuf.FileDescriptorSet` of every file under `proto/`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/agora_descriptor.bin"));

/// Types shared by every service.
pub mod common {
    /// Version 1 of the common types.
    pub mod v1 {
        tonic::include_proto!("agora.common.v1");
    }
}

/// `agora.users.v1`: accounts, login, the user event history.
pub mod users {
    /// Version 1 of the users contract.
    pub mod v1 {
        tonic::include_proto!("agora.users.v1");
        /// Fully qualified gRPC service name, as used in health checks and routes.
        pub const SERVICE_NAME: &str = "agora.users.v1.UserService";
    }
}

/// `agora.catalog.v1`: products and prices.
pub mod catalog {
    /// Version 1 of the catalog contract.
    pub mod v1 {
        tonic::include_proto!("agora.catalog.v1");
        /// Fully qualified gRPC service name, as used in health checks and routes.
        pub const SERVICE_NAME: &str = "agora.catalog.v1.CatalogService";
    }
}

/// `agora.inventory.v1`: stock levels and reservations.
pub mod inventory {
    /// Version 1 of the inventory contract.
    pub mod v1 {
        tonic::include_proto!("agora.inventory.v1");
        /// Fully qualified gRPC service name, as used in health checks and routes.
        pub const SERVICE_NAME: &str = "agora.inventory.v1.InventoryService";
    }
}

/// `agora.payments.v1`: card charges and refunds.
pub mod payments {
    /// Version 1 of the payments contract.
    pub mod v1 {
        tonic::include_proto!("agora.payments.v1");
        /// Fully qualified gRPC service name, as used in health checks and routes.
        pub const SERVICE_NAME: &str = "agora.payments.v1.PaymentService";
    }
}

/// `agora.orders.v1`: orders and the checkout saga.
pub mod orders {
    /// Version 1 of the orders contract.
    pub mod v1 {
        tonic::include_proto!("agora.orders.v1");
        /// Fully qualified gRPC service name, as used in health checks and routes.
        pub const SERVICE_NAME: &str = "agora.orders.v1.OrderService";
    }
}

/// `agora.notifications.v1`: emails sent in reaction to events.
pub mod notifications {
    /// Version 1 of the notifications contract.
    pub mod v1 {
        tonic::include_proto!("agora.notifications.v1");
        /// Fully qualified gRPC service name, as used in health checks and routes.
        pub const SERVICE_NAME: &str = "agora.notifications.v1.NotificationService";
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    /// The exported descriptor set must describe every service of the contract,
    /// or reflection would hide part of the API.
    #[test]
    fn descriptor_set_names_every_service() {
        let set = prost_types::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET)
            .expect("descriptor set decodes");
        let mut services: Vec<String> = set
            .file
            .iter()
            .flat_map(|file| {
                let package = file.package().to_owned();
                file.service
                    .iter()
                    .map(move |service| format!("{package}.{}", service.name()))
            })
            .collect();
        services.sort();
        let mut expected = vec![
            super::users::v1::SERVICE_NAME,
            super::catalog::v1::SERVICE_NAME,
            super::inventory::v1::SERVICE_NAME,
            super::payments::v1::SERVICE_NAME,
            super::orders::v1::SERVICE_NAME,
            super::notifications::v1::SERVICE_NAME,
        ];
        expected.sort();
        assert_eq!(services, expected);
    }
}
