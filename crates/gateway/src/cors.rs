//! Cross-origin resource sharing for browser clients (grpc-web and Connect).
//!
//! Browsers preflight every grpc-web and Connect POST (their content types
//! and headers are not "simple"), and only show a script the response
//! headers the server exposes. The policy here follows the gRPC-Web and
//! Connect CORS guidance (`/work/shared/GRPC-WEB.md`, connectrpc.com
//! "CORS"):
//!
//! - origins are compared by scheme, host (case-insensitive) and port, the
//!   default port being the same as none, and the request's own `Origin` is
//!   echoed back, never `*`, so `Access-Control-Allow-Credentials: true` is
//!   allowed (a wildcard is refused by browsers on credentialed requests);
//! - the opaque origin `null` (sandboxed frames, local files, some
//!   redirects) is never allowed: any page can make itself send it;
//! - methods `GET` (Connect GET), `POST` and `OPTIONS`;
//! - request headers: the protocols' own plus whatever custom metadata the
//!   preflight asks for, as long as each name is a valid HTTP token (the
//!   list echoed is capped in length);
//! - exposed response headers: `grpc-status`, `grpc-message` and
//!   `grpc-status-details-bin` (a trailers-only grpc-web reply carries them
//!   as headers, and a script that cannot read them sees no status),
//!   `grpc-encoding`, `content-encoding`, `connect-content-encoding`, and
//!   each custom metadata name given to [`CorsPolicy::expose_metadata`],
//!   twice: as is, and with Connect's `trailer-` prefix (Connect sends a
//!   unary call's trailers as `trailer-<name>` headers). CORS has no prefix
//!   wildcard, and `*` means the literal name `*` on credentialed requests,
//!   so every name must be listed.

use std::collections::HashSet;
use std::net::Ipv6Addr;

use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE,
    ACCESS_CONTROL_REQUEST_HEADERS, ACCESS_CONTROL_REQUEST_METHOD, ORIGIN, VARY,
};
use http::{HeaderMap, HeaderValue, Method};

/// Methods a browser may use: POST for grpc-web and Connect, GET for
/// Connect's side-effect-free calls, OPTIONS for completeness.
const ALLOW_METHODS: &str = "GET, POST, OPTIONS";

/// How long a browser may cache a preflight answer, in seconds: two hours,
/// Chrome's ceiling (Firefox allows a day), so most calls skip the extra
/// round trip.
const MAX_AGE_SECONDS: &str = "7200";

/// Request headers always allowed, whatever the preflight lists: those of
/// grpc-web and Connect, and `authorization` for the user's token.
const ALWAYS_ALLOWED_HEADERS: [&str; 12] = [
    "content-type",
    "authorization",
    "x-grpc-web",
    "x-user-agent",
    "grpc-timeout",
    "grpc-accept-encoding",
    "grpc-encoding",
    "connect-protocol-version",
    "connect-timeout-ms",
    "connect-accept-encoding",
    "connect-content-encoding",
    "content-encoding",
];

/// Response headers always exposed to scripts.
const ALWAYS_EXPOSED_HEADERS: [&str; 6] = [
    "grpc-status",
    "grpc-message",
    "grpc-status-details-bin",
    "grpc-encoding",
    "content-encoding",
    "connect-content-encoding",
];

/// `Vary` of a preflight answer: it depends on all three.
const PREFLIGHT_VARY: &str =
    "Origin, Access-Control-Request-Method, Access-Control-Request-Headers";

/// The longest `Origin` considered: real ones are a scheme and a host name
/// (at most 253 bytes) and a port.
const MAX_ORIGIN_LEN: usize = 512;

/// Requested header names echoed at most per preflight, beyond the always
/// allowed ones: far more than any real client sends, few enough that the
/// answer stays small.
const MAX_REQUESTED_HEADERS: usize = 32;

/// The longest requested header name echoed.
const MAX_HEADER_NAME_LEN: usize = 64;

/// An entry of `cors_allowed_origins` that is not an origin.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid CORS origin {origin:?}: {reason}")]
pub struct InvalidOrigin {
    /// The entry as configured.
    pub origin: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Which browser origins may call the gateway, and the CORS headers that
/// say so. Built once from the configuration; cheap to query per request.
#[derive(Clone, Debug)]
pub struct CorsPolicy {
    /// Allowed origins, canonical (`scheme://host[:port]`, lowercase,
    /// default port dropped).
    origins: HashSet<String>,
    /// Development only: every well-formed origin but `null` is allowed.
    allow_any_origin: bool,
    /// Custom metadata names exposed (lowercase tokens).
    exposed_metadata: Vec<String>,
    /// `Access-Control-Expose-Headers` of an allowed actual response.
    expose_headers: HeaderValue,
}

impl CorsPolicy {
    /// A policy allowing these origins (`https://shop.example.com`,
    /// `http://localhost:5173`), or any origin if `allow_any_origin`
    /// (development only: the origin is echoed, never `*`).
    ///
    /// An entry that is not an origin (a bare host, a path, `*`, `null`)
    /// is left out with a warning; use [`CorsPolicy::try_new`] to refuse
    /// such a configuration instead.
    pub fn new(allowed_origins: &[String], allow_any_origin: bool) -> Self {
        let mut origins = HashSet::new();
        for origin in allowed_origins {
            match canonical_config_origin(origin) {
                Ok(canonical) => {
                    origins.insert(canonical);
                }
                Err(err) => tracing::warn!(%err, "CORS origin ignored"),
            }
        }
        Self::build(origins, allow_any_origin)
    }

    /// [`CorsPolicy::new`], failing on the first entry that is not an
    /// origin.
    pub fn try_new(
        allowed_origins: &[String],
        allow_any_origin: bool,
    ) -> Result<Self, InvalidOrigin> {
        let origins = allowed_origins
            .iter()
            .map(|origin| canonical_config_origin(origin))
            .collect::<Result<_, _>>()?;
        Ok(Self::build(origins, allow_any_origin))
    }

    fn build(origins: HashSet<String>, allow_any_origin: bool) -> Self {
        let mut policy = Self {
            origins,
            allow_any_origin,
            exposed_metadata: Vec::new(),
            expose_headers: HeaderValue::from_static(""),
        };
        policy.expose_headers = policy.expose_header_value();
        policy
    }

    /// Also exposes these custom metadata names (response headers or
    /// trailers a browser client should read), each as is and as Connect's
    /// `trailer-<name>`. Names are lowercased; one that is not a valid
    /// header name is left out with a warning.
    #[must_use]
    pub fn expose_metadata<'a>(mut self, names: impl IntoIterator<Item = &'a str>) -> Self {
        for name in names {
            let name = name.to_ascii_lowercase();
            if !is_token(&name) || name.len() > MAX_HEADER_NAME_LEN {
                tracing::warn!(name, "exposed CORS header name ignored: not a header name");
                continue;
            }
            if !self.exposed_metadata.contains(&name)
                && !ALWAYS_EXPOSED_HEADERS.contains(&name.as_str())
            {
                self.exposed_metadata.push(name);
            }
        }
        self.expose_headers = self.expose_header_value();
        self
    }

    fn expose_header_value(&self) -> HeaderValue {
        let mut names: Vec<String> = ALWAYS_EXPOSED_HEADERS
            .iter()
            .map(|&name| name.to_owned())
            .collect();
        for name in &self.exposed_metadata {
            names.push(name.clone());
            names.push(format!("trailer-{name}"));
        }
        // Tokens joined by ", " are always a valid header value.
        HeaderValue::try_from(names.join(", ")).unwrap_or_else(|_| {
            HeaderValue::from_static("grpc-status, grpc-message, grpc-status-details-bin")
        })
    }

    /// Whether any origin can be allowed at all; if not, CORS is off and
    /// no response varies by `Origin`.
    pub fn is_enabled(&self) -> bool {
        self.allow_any_origin || !self.origins.is_empty()
    }

    /// Whether a request is a CORS preflight: `OPTIONS` with `Origin` and
    /// `Access-Control-Request-Method` (a plain `OPTIONS` is not).
    pub fn is_preflight(method: &Method, request_headers: &HeaderMap) -> bool {
        method == Method::OPTIONS
            && request_headers.contains_key(ORIGIN)
            && request_headers.contains_key(ACCESS_CONTROL_REQUEST_METHOD)
    }

    /// Answers a preflight: `Some(headers)` for a `204 No Content` if the
    /// origin and the requested method are allowed, `None` if not (answer
    /// `403` without CORS headers; the browser then refuses the call).
    pub fn preflight(&self, request_headers: &HeaderMap) -> Option<HeaderMap> {
        let origin = self.allowed_origin(request_headers)?;
        let method = single(request_headers, &ACCESS_CONTROL_REQUEST_METHOD)?;
        // Method names are case-sensitive; browsers send these uppercase.
        if !matches!(method.as_bytes(), b"GET" | b"POST" | b"OPTIONS") {
            return None;
        }
        let mut headers = HeaderMap::with_capacity(6);
        headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        headers.insert(
            ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
        headers.insert(
            ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(ALLOW_METHODS),
        );
        headers.insert(ACCESS_CONTROL_ALLOW_HEADERS, allow_headers(request_headers));
        headers.insert(
            ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static(MAX_AGE_SECONDS),
        );
        headers.insert(VARY, HeaderValue::from_static(PREFLIGHT_VARY));
        Some(headers)
    }

    /// Headers to add to the actual response of a request: for an allowed
    /// `Origin`, the echoed origin, credentials, and the exposed headers.
    /// Whenever CORS is on, `Vary: Origin` too, even with no or a refused
    /// `Origin`: the response depends on it, and a cache (Connect GET
    /// responses are cacheable) must not hand a response made without CORS
    /// headers to a browser that needs them. Add these with
    /// `HeaderMap::append` for `Vary`, which the response may already have.
    pub fn response_headers(&self, request_headers: &HeaderMap) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if !self.is_enabled() {
            return headers;
        }
        headers.insert(VARY, HeaderValue::from_static("Origin"));
        if let Some(origin) = self.allowed_origin(request_headers) {
            headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
            headers.insert(
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
            headers.insert(ACCESS_CONTROL_EXPOSE_HEADERS, self.expose_headers.clone());
        }
        headers
    }

    /// The request's `Origin`, if there is exactly one, it is a well-formed
    /// origin other than `null`, and it is allowed.
    fn allowed_origin<'a>(&self, request_headers: &'a HeaderMap) -> Option<&'a HeaderValue> {
        let origin = single(request_headers, &ORIGIN)?;
        let text = origin.to_str().ok()?;
        // A browser sends the serialized origin: no trailing slash, no
        // whitespace. Anything else is not from a browser and not allowed.
        let canonical = canonical_origin(text).ok()?;
        (self.allow_any_origin || self.origins.contains(&canonical)).then_some(origin)
    }
}

/// The one value of a header, or `None` if it is absent or repeated.
fn single<'a>(headers: &'a HeaderMap, name: &http::HeaderName) -> Option<&'a HeaderValue> {
    let mut values = headers.get_all(name).iter();
    let value = values.next()?;
    values.next().is_none().then_some(value)
}

/// `Access-Control-Allow-Headers` for a preflight: the always allowed names
/// and the valid ones among those requested, lowercase, each once.
fn allow_headers(request_headers: &HeaderMap) -> HeaderValue {
    let mut names: Vec<String> = ALWAYS_ALLOWED_HEADERS
        .iter()
        .map(|&name| name.to_owned())
        .collect();
    let requested = request_headers
        .get_all(ACCESS_CONTROL_REQUEST_HEADERS)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|name| !name.is_empty() && name.len() <= MAX_HEADER_NAME_LEN && is_token(name))
        .map(str::to_ascii_lowercase)
        .take(MAX_REQUESTED_HEADERS);
    for name in requested {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    // Only tokens and ", ": always a valid header value.
    HeaderValue::try_from(names.join(", "))
        .unwrap_or_else(|_| HeaderValue::from_static("content-type"))
}

/// Whether `name` is an RFC 9110 token (what a header name must be).
fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}

/// A configured origin in canonical form: surrounding whitespace and one
/// trailing `/` (a common slip when copying a URL) are forgiven.
fn canonical_config_origin(origin: &str) -> Result<String, InvalidOrigin> {
    let trimmed = origin.trim();
    let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
    canonical_origin(trimmed).map_err(|reason| InvalidOrigin {
        origin: origin.to_owned(),
        reason,
    })
}

/// `scheme://host[:port]` with the scheme and host lowercased, an IPv6
/// literal in its compressed form and the scheme's default port dropped:
/// the form browsers send, so equal origins compare equal as strings.
fn canonical_origin(origin: &str) -> Result<String, &'static str> {
    if origin == "*" {
        return Err("a wildcard is not an origin (set cors_allow_any_origin for development)");
    }
    if origin.eq_ignore_ascii_case("null") {
        return Err("the opaque origin null is never allowed: any sandboxed page can send it");
    }
    if origin.len() > MAX_ORIGIN_LEN {
        return Err("too long");
    }
    let (scheme, authority) = origin
        .split_once("://")
        .ok_or("not of the form scheme://host[:port]")?;
    let mut scheme_chars = scheme.chars();
    let scheme_ok = scheme_chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && scheme_chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !scheme_ok {
        return Err("invalid scheme");
    }
    let scheme = scheme.to_ascii_lowercase();
    let (host, port) = if let Some(literal) = authority.strip_prefix('[') {
        let (address, after) = literal.split_once(']').ok_or("unclosed IPv6 literal")?;
        let address: Ipv6Addr = address.parse().map_err(|_| "invalid IPv6 literal")?;
        let port = match after {
            "" => None,
            after => Some(
                after
                    .strip_prefix(':')
                    .ok_or("unexpected text after the host")?,
            ),
        };
        (format!("[{address}]"), port)
    } else {
        let (host, port) = match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        };
        let host_ok = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
        if !host_ok {
            // Also catches a path, query, user info or non-ASCII host
            // (browsers send IDNs as punycode).
            return Err("invalid host (an origin has no path, and IDNs are written in punycode)");
        }
        (host.to_ascii_lowercase(), port)
    };
    let port = match port {
        None => None,
        Some(port) => {
            if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
                return Err("invalid port");
            }
            let port: u16 = port.parse().map_err(|_| "invalid port")?;
            let default = match scheme.as_str() {
                "http" | "ws" => Some(80),
                "https" | "wss" => Some(443),
                _ => None,
            };
            (default != Some(port)).then_some(port)
        }
    };
    Ok(match port {
        Some(port) => format!("{scheme}://{host}:{port}"),
        None => format!("{scheme}://{host}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHOP: &str = "https://shop.example.com";

    fn policy(origins: &[&str]) -> CorsPolicy {
        let origins: Vec<String> = origins.iter().map(|&o| o.to_owned()).collect();
        CorsPolicy::try_new(&origins, false).expect("valid origins")
    }

    fn any() -> CorsPolicy {
        CorsPolicy::try_new(&[], true).expect("no origins")
    }

    fn request(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for &(name, value) in pairs {
            headers.append(
                name,
                HeaderValue::from_str(value).expect("test header value"),
            );
        }
        headers
    }

    fn preflight_request(origin: &str, headers: &str) -> HeaderMap {
        request(&[
            ("origin", origin),
            ("access-control-request-method", "POST"),
            ("access-control-request-headers", headers),
        ])
    }

    fn get<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
        headers.get(name).map(|v| v.to_str().expect("ascii"))
    }

    fn list(headers: &HeaderMap, name: &str) -> Vec<String> {
        get(headers, name)
            .unwrap_or_default()
            .split(',')
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty())
            .collect()
    }

    #[test]
    fn an_allowed_origin_gets_a_full_preflight_answer() {
        let answer = policy(&[SHOP])
            .preflight(&preflight_request(
                SHOP,
                "content-type,x-grpc-web,x-user-agent",
            ))
            .expect("allowed");
        assert_eq!(get(&answer, "access-control-allow-origin"), Some(SHOP));
        assert_eq!(
            get(&answer, "access-control-allow-credentials"),
            Some("true")
        );
        assert_eq!(
            list(&answer, "access-control-allow-methods"),
            ["GET", "POST", "OPTIONS"]
        );
        assert_eq!(get(&answer, "access-control-max-age"), Some("7200"));
        let vary = list(&answer, "vary");
        assert_eq!(
            vary,
            [
                "Origin",
                "Access-Control-Request-Method",
                "Access-Control-Request-Headers"
            ]
        );
        let allowed = list(&answer, "access-control-allow-headers");
        for name in [
            "content-type",
            "x-grpc-web",
            "x-user-agent",
            "grpc-timeout",
            "authorization",
            "connect-protocol-version",
            "connect-timeout-ms",
        ] {
            assert!(
                allowed.iter().any(|a| a == name),
                "{name} not allowed: {allowed:?}"
            );
        }
        // Each name once, though requested and always allowed.
        let unique: HashSet<&String> = allowed.iter().collect();
        assert_eq!(unique.len(), allowed.len());
        // Never a wildcard anywhere.
        assert!(answer.values().all(|v| v != "*"));
    }

    #[test]
    fn requested_custom_metadata_is_echoed_lowercase() {
        let answer = policy(&[SHOP])
            .preflight(&preflight_request(
                SHOP,
                "X-Request-Id, traceparent,Content-Type",
            ))
            .expect("allowed");
        let allowed = list(&answer, "access-control-allow-headers");
        assert!(allowed.contains(&"x-request-id".to_owned()), "{allowed:?}");
        assert!(allowed.contains(&"traceparent".to_owned()));
        assert_eq!(allowed.iter().filter(|a| *a == "content-type").count(), 1);
    }

    #[test]
    fn requested_names_that_are_not_tokens_are_dropped_and_the_echo_is_capped() {
        let long = "x".repeat(MAX_HEADER_NAME_LEN + 1);
        let mut requested = vec![
            "bad name".to_owned(),
            "x\"quote".to_owned(),
            "a(b)".to_owned(),
            long.clone(),
            "x-fine".to_owned(),
        ];
        requested.extend((0..100).map(|i| format!("x-meta-{i}")));
        let answer = policy(&[SHOP])
            .preflight(&preflight_request(SHOP, &requested.join(",")))
            .expect("allowed");
        let allowed = list(&answer, "access-control-allow-headers");
        assert!(allowed.contains(&"x-fine".to_owned()));
        for bad in ["bad name", "x\"quote", "a(b)", long.as_str()] {
            assert!(!allowed.iter().any(|a| a == bad), "{bad} echoed");
        }
        assert!(allowed.len() <= ALWAYS_ALLOWED_HEADERS.len() + MAX_REQUESTED_HEADERS);
        assert!(!allowed.contains(&"x-meta-99".to_owned()));
    }

    #[test]
    fn a_disallowed_origin_gets_no_preflight_answer_and_no_cors_headers() {
        let cors = policy(&[SHOP]);
        for origin in [
            "https://evil.example.com",
            "http://shop.example.com",          // other scheme
            "https://shop.example.com:8443",    // other port
            "https://shop.example.com.evil.io", // suffix trick
            "https://example.com",              // parent domain
            "https://sub.shop.example.com",     // subdomain
            "https://shop.example.com/",        // not a serialized origin
        ] {
            assert!(
                cors.preflight(&preflight_request(origin, "content-type"))
                    .is_none(),
                "{origin}"
            );
            let headers = cors.response_headers(&request(&[("origin", origin)]));
            assert!(
                headers.get("access-control-allow-origin").is_none(),
                "{origin}"
            );
            assert!(headers.get("access-control-allow-credentials").is_none());
            assert!(headers.get("access-control-expose-headers").is_none());
        }
    }

    #[test]
    fn the_null_origin_is_never_allowed() {
        for cors in [policy(&[SHOP]), any()] {
            assert!(
                cors.preflight(&preflight_request("null", "content-type"))
                    .is_none()
            );
            let headers = cors.response_headers(&request(&[("origin", "null")]));
            assert!(headers.get("access-control-allow-origin").is_none());
        }
        let err = CorsPolicy::try_new(&["null".to_owned()], false).expect_err("null");
        assert!(err.reason.contains("null"));
    }

    #[test]
    fn origins_match_by_scheme_host_and_port() {
        // Case, the default port and a trailing slash in the configuration
        // do not matter; the request's own spelling is echoed.
        let cors = policy(&[
            "HTTPS://Shop.Example.COM:443/",
            "http://localhost:5173",
            "http://[0:0::1]:8080",
        ]);
        for origin in [
            SHOP,
            "https://SHOP.example.com",
            "http://localhost:5173",
            "http://[::1]:8080",
        ] {
            let answer = cors
                .preflight(&preflight_request(origin, ""))
                .expect(origin);
            assert_eq!(get(&answer, "access-control-allow-origin"), Some(origin));
        }
        for origin in ["http://localhost", "http://localhost:5174", "http://[::1]"] {
            assert!(
                cors.preflight(&preflight_request(origin, "")).is_none(),
                "{origin}"
            );
        }
    }

    #[test]
    fn only_get_post_and_options_are_preflighted() {
        let cors = policy(&[SHOP]);
        for method in ["GET", "POST", "OPTIONS"] {
            let headers = request(&[("origin", SHOP), ("access-control-request-method", method)]);
            assert!(cors.preflight(&headers).is_some(), "{method}");
        }
        for method in ["PUT", "DELETE", "post"] {
            let headers = request(&[("origin", SHOP), ("access-control-request-method", method)]);
            assert!(cors.preflight(&headers).is_none(), "{method}");
        }
        // Not a preflight at all without the method.
        assert!(cors.preflight(&request(&[("origin", SHOP)])).is_none());
    }

    #[test]
    fn preflights_are_recognised() {
        let full = preflight_request(SHOP, "content-type");
        assert!(CorsPolicy::is_preflight(&Method::OPTIONS, &full));
        assert!(!CorsPolicy::is_preflight(&Method::POST, &full));
        assert!(!CorsPolicy::is_preflight(
            &Method::OPTIONS,
            &request(&[("origin", SHOP)])
        ));
        assert!(!CorsPolicy::is_preflight(
            &Method::OPTIONS,
            &request(&[("access-control-request-method", "POST")])
        ));
    }

    #[test]
    fn an_allowed_actual_response_exposes_the_grpc_status() {
        let headers = policy(&[SHOP]).response_headers(&request(&[("origin", SHOP)]));
        assert_eq!(get(&headers, "access-control-allow-origin"), Some(SHOP));
        assert_eq!(
            get(&headers, "access-control-allow-credentials"),
            Some("true")
        );
        assert_eq!(get(&headers, "vary"), Some("Origin"));
        let exposed = list(&headers, "access-control-expose-headers");
        for name in [
            "grpc-status",
            "grpc-message",
            "grpc-status-details-bin",
            "content-encoding",
            "connect-content-encoding",
        ] {
            assert!(
                exposed.iter().any(|e| e == name),
                "{name} not exposed: {exposed:?}"
            );
        }
        assert!(!exposed.iter().any(|e| e == "*"));
    }

    #[test]
    fn custom_metadata_is_exposed_with_its_connect_trailer_name() {
        let cors = policy(&[SHOP]).expose_metadata(["X-Request-Id", "bad name", "grpc-status"]);
        let headers = cors.response_headers(&request(&[("origin", SHOP)]));
        let exposed = list(&headers, "access-control-expose-headers");
        assert!(exposed.contains(&"x-request-id".to_owned()), "{exposed:?}");
        assert!(exposed.contains(&"trailer-x-request-id".to_owned()));
        assert!(!exposed.iter().any(|e| e.contains("bad")));
        assert_eq!(exposed.iter().filter(|e| *e == "grpc-status").count(), 1);
    }

    #[test]
    fn without_an_origin_only_vary_is_added() {
        let headers = policy(&[SHOP]).response_headers(&HeaderMap::new());
        assert_eq!(headers.len(), 1);
        assert_eq!(get(&headers, "vary"), Some("Origin"));
        assert!(
            policy(&[SHOP])
                .preflight(&request(&[("access-control-request-method", "POST")]))
                .is_none()
        );
    }

    #[test]
    fn a_policy_without_origins_adds_nothing() {
        let cors = policy(&[]);
        assert!(!cors.is_enabled());
        assert!(
            cors.response_headers(&request(&[("origin", SHOP)]))
                .is_empty()
        );
        assert!(
            cors.preflight(&preflight_request(SHOP, "content-type"))
                .is_none()
        );
    }

    #[test]
    fn any_origin_echoes_the_origin_never_a_wildcard() {
        let cors = any();
        for origin in [
            "https://anything.example",
            "http://localhost:3000",
            "chrome-extension://abcdef",
        ] {
            let answer = cors
                .preflight(&preflight_request(origin, "content-type"))
                .expect(origin);
            assert_eq!(get(&answer, "access-control-allow-origin"), Some(origin));
            assert_eq!(
                get(&answer, "access-control-allow-credentials"),
                Some("true")
            );
            let headers = cors.response_headers(&request(&[("origin", origin)]));
            assert_eq!(get(&headers, "access-control-allow-origin"), Some(origin));
        }
        // Malformed origins are not echoed even then.
        for origin in ["not an origin", "https://a.example/path", "*"] {
            assert!(
                cors.preflight(&preflight_request(origin, "")).is_none(),
                "{origin}"
            );
        }
    }

    #[test]
    fn repeated_origin_headers_are_refused() {
        let headers = request(&[
            ("origin", SHOP),
            ("origin", "https://evil.example.com"),
            ("access-control-request-method", "POST"),
        ]);
        assert!(policy(&[SHOP]).preflight(&headers).is_none());
        assert!(any().preflight(&headers).is_none());
    }

    #[test]
    fn invalid_configured_origins_are_reported_or_skipped() {
        for bad in [
            "*",
            "null",
            "shop.example.com",
            "https://shop.example.com/app",
            "https://user@shop.example.com",
            "https://shop.example.com:99999",
            "https://shop.example.com:",
            "https://",
            "https://[::1",
            "https://bücher.example",
        ] {
            let err = CorsPolicy::try_new(&[bad.to_owned()], false).expect_err(bad);
            assert_eq!(err.origin, bad);
        }
        // `new` keeps the valid entries.
        let cors = CorsPolicy::new(&["*".to_owned(), SHOP.to_owned()], false);
        assert!(cors.preflight(&preflight_request(SHOP, "")).is_some());
        assert!(
            cors.preflight(&preflight_request("https://evil.example.com", ""))
                .is_none()
        );
    }

    #[test]
    fn canonical_origins() {
        assert_eq!(
            canonical_origin("HTTP://LocalHost:80").as_deref(),
            Ok("http://localhost")
        );
        assert_eq!(
            canonical_origin("https://a.example:8443").as_deref(),
            Ok("https://a.example:8443")
        );
        assert_eq!(
            canonical_origin("http://a.example:0443").as_deref(),
            Ok("http://a.example:443")
        );
        assert_eq!(
            canonical_origin("http://[0:0:0:0:0:0:0:1]:80").as_deref(),
            Ok("http://[::1]")
        );
    }
}
