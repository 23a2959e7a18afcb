//! Who may call which RPC, as the contract declares it.
//!
//! Every RPC under `proto/` carries the method option
//! `(agora.common.v1.access)`: a level (public, user, admin, service) and
//! the services that may call it with a service token. [`AccessTable`]
//! reads those options from an encoded `FileDescriptorSet` (the contract's
//! is [`agora_proto::FILE_DESCRIPTOR_SET`]) and refuses a contract in which
//! an RPC declares none, so an RPC cannot be added without saying who may
//! call it. [`MethodAccess::authorize`] is the one rule applied to a
//! verified [`Caller`]: by every server, before any handler runs
//! ([`crate::server::AccessLayer`]), and by the gateway, which also refuses
//! service-level RPCs from outside. What a caller may *see* past that check
//! (a user reads only their own orders) stays with each service.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use prost_reflect::{DescriptorPool, ExtensionDescriptor, MessageDescriptor, MethodDescriptor};

use crate::auth::Caller;
use crate::error::{Error, ErrorKind};

/// The full name of the method option every RPC declares its access with.
pub const ACCESS_EXTENSION: &str = "agora.common.v1.access";

/// Who may call an RPC (`agora.common.v1.AccessLevel`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AccessLevel {
    /// Anyone; a token is not even looked at.
    Public,
    /// Any logged-in user (admins too), or a listed service.
    User,
    /// A user with the admin role, or a listed service.
    Admin,
    /// Only a listed service, with a service token.
    Service,
}

impl AccessLevel {
    /// The level of an `AccessLevel` enum number; `None` for
    /// `ACCESS_LEVEL_UNSPECIFIED` and numbers this code does not know.
    pub fn from_proto(number: i32) -> Option<Self> {
        match number {
            1 => Some(Self::Public),
            2 => Some(Self::User),
            3 => Some(Self::Admin),
            4 => Some(Self::Service),
            _ => None,
        }
    }

    /// The level's name in logs and messages: `public`, `user`, `admin`,
    /// `service`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Public => "public",
            Self::User => "user",
            Self::Admin => "admin",
            Self::Service => "service",
        }
    }
}

impl std::fmt::Display for AccessLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One RPC of the contract and its declared access rule.
#[derive(Clone, Debug)]
pub struct MethodAccess {
    /// The gRPC path, e.g. `/agora.catalog.v1.CatalogService/GetProduct`.
    pub path: String,
    /// The full service name, e.g. `agora.catalog.v1.CatalogService`.
    pub service: String,
    /// Who may call it.
    pub level: AccessLevel,
    /// Services (`orders`, ...) allowed to call it with a service token.
    pub callers: Vec<String>,
    /// Whether the client sends a stream of messages.
    pub client_streaming: bool,
    /// Whether the server answers with a stream of messages.
    pub server_streaming: bool,
    /// `idempotency_level = NO_SIDE_EFFECTS`: the RPC changes nothing, so
    /// a Connect client may send it (if unary) as an HTTP GET.
    pub no_side_effects: bool,
    /// The request message.
    pub input: MessageDescriptor,
    /// The response message.
    pub output: MessageDescriptor,
}

impl MethodAccess {
    /// The one authorization rule of the contract:
    /// - public: anyone;
    /// - user: any user (admins too) or a listed service;
    /// - admin: a user with the admin role or a listed service;
    /// - service: only a listed service.
    ///
    /// UNAUTHENTICATED for anonymous callers where a token is needed,
    /// PERMISSION_DENIED for everyone else who may not, with the messages
    /// of [`Caller`]'s `require_*` helpers.
    pub fn authorize(&self, caller: &Caller) -> Result<(), Error> {
        if self.level == AccessLevel::Public {
            return Ok(());
        }
        caller.require_authenticated()?;
        let callers: Vec<&str> = self.callers.iter().map(String::as_str).collect();
        match (self.level, caller) {
            // A service token is worth only what the RPC lists.
            (_, Caller::Service { .. }) | (AccessLevel::Service, _) => {
                caller.require_service_from(&callers)
            }
            (AccessLevel::Admin, _) => caller.require_admin(),
            // Public was answered above; a user may call a user-level RPC.
            (AccessLevel::Public | AccessLevel::User, _) => Ok(()),
        }
    }

    /// The method name, e.g. `GetProduct`.
    pub fn method(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or_default()
    }
}

/// Decodes an encoded `FileDescriptorSet`; FAILED_PRECONDITION when it
/// does not decode.
pub(crate) fn decode_descriptor_set(bytes: &[u8]) -> Result<DescriptorPool, Error> {
    DescriptorPool::decode(bytes).map_err(|err| {
        Error::new(
            ErrorKind::FailedPrecondition,
            format!("the descriptor set does not decode: {err}"),
        )
    })
}

/// A table of the contract, built by `build` on first use and kept in
/// `cell` for the life of the process; its error (an incomplete contract)
/// is kept too and returned on every call.
pub(crate) fn built_once<T: Send + Sync>(
    cell: &'static OnceLock<Result<T, String>>,
    build: impl FnOnce() -> Result<T, Error>,
) -> Result<&'static T, Error> {
    cell.get_or_init(|| build().map_err(|err| err.message().to_owned()))
        .as_ref()
        .map_err(|message| Error::new(ErrorKind::FailedPrecondition, message.clone()))
}

/// The access rule of every RPC of a contract, by gRPC path. Cheap to
/// clone: clones share the table and the descriptor pool.
#[derive(Clone, Debug)]
pub struct AccessTable {
    inner: Arc<TableInner>,
}

#[derive(Debug)]
struct TableInner {
    pool: DescriptorPool,
    /// By gRPC path, so iteration is in a stable order.
    methods: BTreeMap<String, MethodAccess>,
}

impl AccessTable {
    /// Every method of every service in an encoded `FileDescriptorSet`.
    /// FAILED_PRECONDITION naming each method that declares no level (or
    /// `ACCESS_LEVEL_UNSPECIFIED`, or a service level no service may use),
    /// so that an incomplete contract never reaches a server.
    pub fn from_descriptor_set(bytes: &[u8]) -> Result<Self, Error> {
        let pool = decode_descriptor_set(bytes)?;
        // Absent when no file imports access.proto: then no method has a
        // level, and each is named below.
        let extension = pool.get_extension_by_name(ACCESS_EXTENSION);
        let mut methods = BTreeMap::new();
        let mut undeclared = Vec::new();
        for service in pool.services() {
            for method in service.methods() {
                let path = format!("/{}/{}", service.full_name(), method.name());
                match declared_access(&method, extension.as_ref()) {
                    Ok((level, callers)) => {
                        let access = MethodAccess {
                            service: service.full_name().to_owned(),
                            level,
                            callers,
                            client_streaming: method.is_client_streaming(),
                            server_streaming: method.is_server_streaming(),
                            no_side_effects: has_no_side_effects(&method),
                            input: method.input(),
                            output: method.output(),
                            path: path.clone(),
                        };
                        methods.insert(path, access);
                    }
                    Err(problem) => undeclared.push(format!("{path} ({problem})")),
                }
            }
        }
        if !undeclared.is_empty() {
            return Err(Error::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "every RPC must declare who may call it with `option ({ACCESS_EXTENSION}) = \
                     {{level: ...}}`; these do not: {}",
                    undeclared.join(", ")
                ),
            ));
        }
        Ok(Self {
            inner: Arc::new(TableInner { pool, methods }),
        })
    }

    /// The table of the Agora contract ([`agora_proto::FILE_DESCRIPTOR_SET`]),
    /// built once per process. An error when the contract is incomplete
    /// (the contract's tests make sure it is not).
    pub fn contract() -> Result<&'static AccessTable, Error> {
        static CONTRACT: OnceLock<Result<AccessTable, String>> = OnceLock::new();
        built_once(&CONTRACT, || {
            Self::from_descriptor_set(agora_proto::FILE_DESCRIPTOR_SET)
        })
    }

    /// The rule of the RPC at `path` (`/package.Service/Method`); `None`
    /// for paths outside the contract (health, reflection, unknown).
    pub fn get(&self, path: &str) -> Option<&MethodAccess> {
        self.inner.methods.get(path)
    }

    /// Every RPC, ordered by path.
    pub fn methods(&self) -> impl Iterator<Item = &MethodAccess> {
        self.inner.methods.values()
    }

    /// Whether any RPC of `service` (full name) is in the table.
    pub fn has_service(&self, service: &str) -> bool {
        self.methods().any(|method| method.service == service)
    }

    /// The descriptors the table was read from (every message of the
    /// contract, for JSON transcoding).
    pub fn pool(&self) -> &DescriptorPool {
        &self.inner.pool
    }
}

/// The level and callers `method` declares, or what is wrong with them.
fn declared_access(
    method: &MethodDescriptor,
    extension: Option<&ExtensionDescriptor>,
) -> Result<(AccessLevel, Vec<String>), &'static str> {
    let options = method.options();
    let extension = extension
        .filter(|extension| options.has_extension(extension))
        .ok_or("no access option")?;
    let access = options.get_extension(extension);
    let access = access
        .as_message()
        .ok_or("access option is not a message")?;
    let level = access
        .get_field_by_name("level")
        .and_then(|level| level.as_enum_number())
        .and_then(AccessLevel::from_proto)
        .ok_or("no access level")?;
    let callers: Vec<String> = access
        .get_field_by_name("callers")
        .and_then(|callers| {
            callers.as_list().map(|list| {
                list.iter()
                    .filter_map(|caller| caller.as_str().map(str::to_owned))
                    .collect()
            })
        })
        .unwrap_or_default();
    if level == AccessLevel::Service && callers.is_empty() {
        return Err("service level without callers: nobody could call it");
    }
    Ok((level, callers))
}

fn has_no_side_effects(method: &MethodDescriptor) -> bool {
    let no_side_effects = prost_types::method_options::IdempotencyLevel::NoSideEffects as i32;
    method
        .options()
        .get_field_by_name("idempotency_level")
        .and_then(|level| level.as_enum_number())
        == Some(no_side_effects)
}

/// Compiles `source` (as `test/v1/test.proto`, beside the real contract's
/// `proto/` folder, for the `agora.common.v1` imports) into an encoded
/// descriptor set: how the contract-reading tables are tested on contracts
/// made to break them.
#[cfg(test)]
pub(crate) fn test_descriptor_set(source: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("test/v1/test.proto");
    std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
    std::fs::write(&file, source).expect("write");
    let contract = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let mut compiler = protox::Compiler::new([dir.path(), contract.as_path()]).expect("compiler");
    compiler
        .include_imports(true)
        .open_file("test/v1/test.proto")
        .expect("compiles");
    // Encoded by protox: prost's own option types would drop the custom
    // options.
    compiler.encode_file_descriptor_set()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::ADMIN_ROLE;

    fn contract() -> &'static AccessTable {
        AccessTable::contract().expect("the contract declares every RPC's access")
    }

    /// Every RPC of every service of the contract is in the table: adding
    /// an RPC without `option (agora.common.v1.access)` fails here (and
    /// keeps every server from starting).
    #[test]
    fn every_rpc_of_the_contract_declares_its_access() {
        let table = contract();
        let mut in_contract = 0;
        for service in table.pool().services() {
            for method in service.methods() {
                in_contract += 1;
                let path = format!("/{}/{}", service.full_name(), method.name());
                assert!(table.get(&path).is_some(), "{path} has no access level");
            }
        }
        assert_eq!(table.methods().count(), in_contract);
        // Six services: the table is not trivially empty.
        assert!(in_contract >= 20, "only {in_contract} RPCs");
    }

    #[test]
    fn the_contract_table_carries_levels_callers_and_shapes() {
        let table = contract();
        let reserve = table
            .get("/agora.inventory.v1.InventoryService/ReserveStock")
            .expect("ReserveStock");
        assert_eq!(reserve.level, AccessLevel::Service);
        assert_eq!(reserve.callers, ["orders"]);
        assert_eq!(reserve.service, "agora.inventory.v1.InventoryService");
        assert_eq!(reserve.method(), "ReserveStock");
        assert_eq!(
            reserve.input.full_name(),
            "agora.inventory.v1.ReserveStockRequest"
        );
        assert!(!reserve.no_side_effects);

        let get = table
            .get("/agora.catalog.v1.CatalogService/GetProduct")
            .expect("GetProduct");
        assert_eq!(get.level, AccessLevel::Public);
        assert!(get.no_side_effects);
        assert!(!get.server_streaming && !get.client_streaming);

        let watch = table
            .get("/agora.orders.v1.OrderService/WatchOrder")
            .expect("WatchOrder");
        assert_eq!(watch.level, AccessLevel::User);
        assert!(watch.server_streaming && !watch.client_streaming);
        assert_eq!(
            watch.output.full_name(),
            "agora.orders.v1.WatchOrderResponse"
        );

        let get_user = table
            .get("/agora.users.v1.UserService/GetUser")
            .expect("GetUser");
        assert_eq!(
            (get_user.level, get_user.callers.as_slice()),
            (AccessLevel::User, &["orders".to_owned()][..])
        );
        // A password must never travel in a URL.
        let authenticate = table
            .get("/agora.users.v1.UserService/Authenticate")
            .expect("Authenticate");
        assert!(!authenticate.no_side_effects);
        assert!(table.get("/grpc.health.v1.Health/Check").is_none());
        assert!(table.has_service("agora.payments.v1.PaymentService"));
        assert!(!table.has_service("grpc.health.v1.Health"));
    }

    use super::test_descriptor_set as descriptor_set;

    #[test]
    fn a_descriptor_with_undeclared_rpcs_is_refused_naming_each() {
        let bytes = descriptor_set(
            r#"
            syntax = "proto3";
            package test.v1;
            import "agora/common/v1/access.proto";
            message Empty {}
            service Probe {
              rpc Declared(Empty) returns (Empty) {
                option (agora.common.v1.access) = {level: ACCESS_LEVEL_PUBLIC};
              }
              rpc Forgotten(Empty) returns (Empty);
              rpc Unspecified(Empty) returns (Empty) {
                option (agora.common.v1.access) = {callers: ["orders"]};
              }
              rpc NobodyMayCall(Empty) returns (Empty) {
                option (agora.common.v1.access) = {level: ACCESS_LEVEL_SERVICE};
              }
            }
            "#,
        );
        let err = AccessTable::from_descriptor_set(&bytes).expect_err("incomplete");
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
        let message = err.message();
        for undeclared in [
            "/test.v1.Probe/Forgotten (no access option)",
            "/test.v1.Probe/Unspecified (no access level)",
            "/test.v1.Probe/NobodyMayCall (service level without callers",
        ] {
            assert!(message.contains(undeclared), "{message}");
        }
        assert!(!message.contains("Declared"), "{message}");
    }

    #[test]
    fn a_complete_descriptor_is_read() {
        let bytes = descriptor_set(
            r#"
            syntax = "proto3";
            package test.v1;
            import "agora/common/v1/access.proto";
            message Empty {}
            service Probe {
              rpc Stream(stream Empty) returns (stream Empty) {
                option (agora.common.v1.access) = {level: ACCESS_LEVEL_ADMIN, callers: ["a", "b"]};
                option idempotency_level = IDEMPOTENT;
              }
            }
            "#,
        );
        let table = AccessTable::from_descriptor_set(&bytes).expect("complete");
        let stream = table.get("/test.v1.Probe/Stream").expect("Stream");
        assert_eq!(stream.level, AccessLevel::Admin);
        assert_eq!(stream.callers, ["a", "b"]);
        assert!(stream.client_streaming && stream.server_streaming);
        // Idempotent is not side-effect free.
        assert!(!stream.no_side_effects);
        assert!(AccessTable::from_descriptor_set(b"\xff\xff").is_err());
    }

    fn rule(level: AccessLevel, callers: &[&str]) -> MethodAccess {
        let mut rule = contract()
            .get("/agora.catalog.v1.CatalogService/GetProduct")
            .expect("GetProduct")
            .clone();
        rule.level = level;
        rule.callers = callers.iter().map(|&c| c.to_owned()).collect();
        rule
    }

    fn user(roles: &[&str]) -> Caller {
        Caller::User {
            id: "u1".into(),
            email: None,
            roles: roles.iter().map(|&r| r.to_owned()).collect(),
        }
    }

    fn service(name: &str) -> Caller {
        Caller::Service { name: name.into() }
    }

    /// The outcome of `caller` on `rule`: `Ok`, or the error kind.
    fn outcome(rule: &MethodAccess, caller: &Caller) -> Result<(), ErrorKind> {
        rule.authorize(caller).map_err(|err| err.kind())
    }

    #[test]
    fn authorize_applies_each_level() {
        use ErrorKind::{PermissionDenied as Denied, Unauthenticated as Unauth};
        let anonymous = Caller::Anonymous;
        let plain = user(&[]);
        let admin = user(&[ADMIN_ROLE]);
        let orders = service("orders");
        let catalog = service("catalog");
        let cases = [
            (
                AccessLevel::Public,
                [Ok(()), Ok(()), Ok(()), Ok(()), Ok(())],
            ),
            (
                AccessLevel::User,
                [Err(Unauth), Ok(()), Ok(()), Ok(()), Err(Denied)],
            ),
            (
                AccessLevel::Admin,
                [Err(Unauth), Err(Denied), Ok(()), Ok(()), Err(Denied)],
            ),
            (
                AccessLevel::Service,
                [Err(Unauth), Err(Denied), Err(Denied), Ok(()), Err(Denied)],
            ),
        ];
        for (level, expected) in cases {
            let rule = rule(level, &["orders"]);
            let got = [&anonymous, &plain, &admin, &orders, &catalog].map(|c| outcome(&rule, c));
            assert_eq!(got, expected, "{level}");
        }
        // Without listed callers, no service may call a user-level RPC.
        assert_eq!(outcome(&rule(AccessLevel::User, &[]), &orders), Err(Denied));
    }

    #[test]
    fn refusals_say_why() {
        let internal = rule(AccessLevel::Service, &["orders"]);
        let err = internal
            .authorize(&service("catalog"))
            .expect_err("catalog");
        assert_eq!(err.message(), "catalog may not call this; allowed: orders");
        let err = internal.authorize(&user(&[ADMIN_ROLE])).expect_err("admin");
        assert_eq!(
            err.message(),
            "this call is internal to Agora services; allowed: orders"
        );
        let err = internal
            .authorize(&Caller::Anonymous)
            .expect_err("anonymous");
        assert!(err.message().contains("needs an access token"), "{err}");
        let err = rule(AccessLevel::Admin, &[])
            .authorize(&user(&[]))
            .expect_err("user");
        assert_eq!(err.message(), "admin role required");
        let err = rule(AccessLevel::User, &[])
            .authorize(&service("orders"))
            .expect_err("service");
        assert_eq!(
            err.message(),
            "orders may not call this; allowed: no service"
        );
    }
}
