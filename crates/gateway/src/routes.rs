//! Where each gRPC path goes: the contract's methods to their service's
//! instances, the gateway's own health and reflection to itself.
//!
//! Built once at start from the descriptors, so a call is routed by one hash
//! lookup and everything the edge needs to know about a method (its access
//! level, its message types for Connect JSON, whether it streams) is there.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::Arc;

use agora_platform::access::{AccessLevel, AccessTable, MethodAccess};
use agora_platform::auth::Caller;
use agora_platform::error::Error;
use agora_platform::server::split_rpc_path;
use agora_platform_client::{CallPolicy, Clients, ServiceChannel};
use prost_reflect::{DescriptorPool, MessageDescriptor};
use tower::ServiceExt as _;

/// The services the gateway answers itself.
pub const LOCAL_SERVICES: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Where a call is sent.
#[derive(Clone)]
pub enum Backend {
    /// A service of the mesh, through the platform client stack.
    Remote(ServiceChannel),
    /// The gateway's own health and reflection services.
    Local(tonic::service::Routes),
}

impl Backend {
    /// Sends one gRPC call.
    pub async fn call(
        &self,
        request: http::Request<tonic::body::Body>,
    ) -> Result<http::Response<tonic::body::Body>, tonic::Status> {
        match self {
            Self::Remote(channel) => channel.clone().oneshot(request).await,
            Self::Local(routes) => {
                let response: Result<_, Infallible> = routes.clone().oneshot(request).await;
                Ok(response.unwrap_or_else(|never| match never {}))
            }
        }
    }
}

/// One method the gateway routes.
pub struct Route {
    /// `/package.Service/Method`.
    pub path: String,
    /// `package.Service`.
    pub service: String,
    /// `Method`.
    pub method: String,
    /// Who may call it, from the contract; `None` for the gateway's own
    /// public services.
    pub access: Option<MethodAccess>,
    /// The request message type (Connect JSON).
    pub input: MessageDescriptor,
    /// The response message type (Connect JSON).
    pub output: MessageDescriptor,
    /// The client sends a stream of messages.
    pub client_streaming: bool,
    /// The server answers with a stream of messages.
    pub server_streaming: bool,
    /// Changes nothing (`idempotency_level = NO_SIDE_EFFECTS`): Connect GET
    /// is allowed.
    pub no_side_effects: bool,
    /// Where calls go.
    pub backend: Backend,
}

impl Route {
    /// Whether the contract reserves it to other services: refused at the
    /// edge whatever the token.
    pub fn is_internal(&self) -> bool {
        self.access
            .as_ref()
            .is_some_and(|access| access.level == AccessLevel::Service)
    }

    /// The contract's rule for `caller` (the gateway's own services are public).
    pub fn authorize(&self, caller: &Caller) -> Result<(), Error> {
        match &self.access {
            Some(access) => access.authorize(caller),
            None => Ok(()),
        }
    }
}

/// Every route, by path.
pub struct Routes {
    by_path: HashMap<String, Arc<Route>>,
    services: HashSet<String>,
    /// Every backend service's channel, by platform name (`catalog`), with
    /// its gRPC service names: for health watching and breaker metrics.
    pub backends: Vec<BackendService>,
}

/// A backend service of the mesh.
#[derive(Clone)]
pub struct BackendService {
    /// Its platform name (`catalog`).
    pub name: String,
    /// Its gRPC service names (`agora.catalog.v1.CatalogService`).
    pub grpc_names: Vec<String>,
    /// Unary calls to it, whose default deadline is the gateway's default.
    pub unary: ServiceChannel,
    /// Streaming calls to it (and the health watch), whose default deadline
    /// is the gateway's maximum.
    pub streaming: ServiceChannel,
}

impl BackendService {
    /// Both channels, for their breakers.
    pub fn channels(&self) -> [&ServiceChannel; 2] {
        [&self.unary, &self.streaming]
    }
}

/// The platform name of the service that hosts a gRPC service of the
/// contract: the second part of its package (`agora.catalog.v1` ->
/// `catalog`).
pub fn platform_name(grpc_service: &str) -> Option<&str> {
    let mut parts = grpc_service.split('.');
    match (parts.next(), parts.next()) {
        (Some("agora"), Some(name)) if !name.is_empty() => Some(name),
        _ => None,
    }
}

impl Routes {
    /// Routes for every method of `table` (unary ones through `unary`,
    /// streaming ones through `streaming`: their default deadlines differ;
    /// retrying the side-effect-free ones) and for the gateway's own
    /// services in `local`, whose descriptors are in `pool`.
    pub fn new(
        table: &AccessTable,
        unary: &Clients,
        streaming: &Clients,
        pool: &DescriptorPool,
        local: tonic::service::Routes,
    ) -> Result<Self, Error> {
        let mut by_path = HashMap::new();
        let mut services = HashSet::new();
        // One channel per backend service, shared by its methods; retries
        // only for calls that change nothing.
        let mut grouped: HashMap<String, (Vec<String>, Vec<&MethodAccess>)> = HashMap::new();
        for method in table.methods() {
            let Some(name) = platform_name(&method.service) else {
                continue;
            };
            let entry = grouped.entry(name.to_owned()).or_default();
            if !entry.0.contains(&method.service) {
                entry.0.push(method.service.clone());
            }
            entry.1.push(method);
        }
        let mut backends = Vec::new();
        let mut names: Vec<_> = grouped.into_iter().collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, (grpc_names, methods)) in names {
            let idempotent = methods
                .iter()
                .filter(|method| method.no_side_effects)
                .map(|method| method.path.clone());
            let policy = CallPolicy::idempotent_methods(idempotent);
            let unary_channel = unary.channel(&name, policy.clone())?;
            let streaming_channel = streaming.channel(&name, policy)?;
            for method in methods {
                let (service, rpc) = split_rpc_path(&method.path);
                services.insert(service.to_owned());
                by_path.insert(
                    method.path.clone(),
                    Arc::new(Route {
                        path: method.path.clone(),
                        service: service.to_owned(),
                        method: rpc.to_owned(),
                        access: Some(method.clone()),
                        input: method.input.clone(),
                        output: method.output.clone(),
                        client_streaming: method.client_streaming,
                        server_streaming: method.server_streaming,
                        no_side_effects: method.no_side_effects,
                        backend: Backend::Remote(
                            if method.client_streaming || method.server_streaming {
                                streaming_channel.clone()
                            } else {
                                unary_channel.clone()
                            },
                        ),
                    }),
                );
            }
            backends.push(BackendService {
                name,
                grpc_names,
                unary: unary_channel,
                streaming: streaming_channel,
            });
        }
        for service_name in LOCAL_SERVICES {
            let Some(service) = pool.get_service_by_name(service_name) else {
                continue;
            };
            services.insert(service_name.to_owned());
            for method in service.methods() {
                let path = format!("/{service_name}/{}", method.name());
                by_path.insert(
                    path.clone(),
                    Arc::new(Route {
                        path,
                        service: service_name.to_owned(),
                        method: method.name().to_owned(),
                        access: None,
                        input: method.input(),
                        output: method.output(),
                        client_streaming: method.is_client_streaming(),
                        server_streaming: method.is_server_streaming(),
                        no_side_effects: service_name == "grpc.health.v1.Health"
                            && method.name() == "Check",
                        backend: Backend::Local(local.clone()),
                    }),
                );
            }
        }
        Ok(Self {
            by_path,
            services,
            backends,
        })
    }

    /// The route of a path.
    pub fn get(&self, path: &str) -> Option<&Arc<Route>> {
        self.by_path.get(path)
    }

    /// Whether a gRPC service of that name is routed (to tell an unknown
    /// service from an unknown method).
    pub fn has_service(&self, service: &str) -> bool {
        self.services.contains(service)
    }

    /// Every routed path.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.by_path.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_services_map_to_their_platform_service() {
        assert_eq!(
            platform_name("agora.catalog.v1.CatalogService"),
            Some("catalog")
        );
        assert_eq!(platform_name("grpc.health.v1.Health"), None);
        assert_eq!(platform_name("agora"), None);
    }
}
