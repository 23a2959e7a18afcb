//! The gateway's Prometheus metrics (`GET /metrics`), in the text exposition
//! format 0.0.4, without a metrics crate.
//!
//! Every series the hot path can touch is allocated up front: one cell per
//! (method, protocol), each a fixed set of atomic counters (one per gRPC
//! code, one per histogram bucket, the duration sum). Recording a call is a
//! hash lookup and three relaxed atomic additions; no lock, no allocation.
//! The price is that the set of `method` labels is fixed when the registry
//! is built: any other path is recorded as `method="other"`, which is also
//! what keeps a client sending random paths from growing the label set.
//!
//! Series are rendered once observed: a (method, protocol) cell or a code
//! that has never been recorded is left out, so a scrape stays small.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the duration histogram's buckets, in seconds (the
/// rendered `le` labels): from half a millisecond (a cached read through the
/// gateway) to ten seconds (past that, a unary call has failed in all but
/// name; longer streaming calls land in `+Inf`).
const BUCKETS_SECONDS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The same bounds in nanoseconds, for an exact integer comparison on the
/// hot path (an observation equal to a bound belongs to that bucket: `le`).
const BUCKETS_NANOS: [u64; 14] = [
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// The protocols a call can arrive in, in label order; anything else is
/// counted as `other`.
const PROTOCOLS: [&str; 4] = ["grpc", "grpc-web", "connect", "other"];

/// gRPC status codes by number, as the `code` label: the canonical names of
/// the gRPC spec (`doc/statuscodes.md`).
const CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The `method` label of every path outside the known set.
const OTHER_METHOD: &str = "other";

const REQUESTS_TOTAL: &str = "agora_gateway_requests_total";
const REQUEST_DURATION: &str = "agora_gateway_request_duration_seconds";
const IN_FLIGHT: &str = "agora_gateway_requests_in_flight";

/// Counters of one (method, protocol) pair.
#[derive(Debug, Default)]
struct Cell {
    /// Finished calls by gRPC code number.
    codes: [AtomicU64; 17],
    /// Calls per histogram bucket, not cumulative (rendering adds them up);
    /// the last slot is past the largest bound (`+Inf` only).
    buckets: [AtomicU64; BUCKETS_NANOS.len() + 1],
    /// Sum of durations in microseconds: a `u64` of nanoseconds would wrap
    /// after a year at a few hundred seconds of calls per second (long
    /// streams add up fast); microseconds last a thousand times longer and
    /// are finer than any bucket.
    sum_micros: AtomicU64,
}

impl Cell {
    fn record(&self, code: usize, elapsed: Duration) {
        self.codes[code].fetch_add(1, Ordering::Relaxed);
        let nanos = elapsed.as_nanos();
        let bucket = BUCKETS_NANOS.partition_point(|&bound| u128::from(bound) < nanos);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        // Rounded to the nearest microsecond so sub-microsecond calls do not
        // all count as zero.
        let micros =
            u64::try_from(elapsed.as_nanos().saturating_add(500) / 1_000).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }
}

/// A gauge the caller measures at scrape time (pool sizes, tracked
/// rate-limit clients, backend instances ...), rendered after the gateway's
/// own metrics.
#[derive(Clone, Debug, PartialEq)]
pub struct Gauge {
    /// Metric name (`[a-zA-Z_:][a-zA-Z0-9_:]*`). Gauges sharing a name are
    /// rendered as one family, with the first one's help text.
    pub name: &'static str,
    /// One line saying what it measures.
    pub help: &'static str,
    /// Label names (`[a-zA-Z_][a-zA-Z0-9_]*`, not starting with `__`) and
    /// values (any text; escaped when rendered).
    pub labels: Vec<(&'static str, String)>,
    /// The current value.
    pub value: f64,
}

/// The gateway's metrics registry. `Send + Sync`: share it in an `Arc`.
#[derive(Debug)]
pub struct Metrics {
    /// The labelled method paths, sorted; index `methods.len()` is `other`.
    methods: Vec<Box<str>>,
    /// Method path to its index in `methods`.
    method_index: HashMap<Box<str>, usize>,
    /// `(methods.len() + 1) * PROTOCOLS.len()` cells, method-major.
    cells: Box<[Cell]>,
    /// Calls in flight, shared with every [`InFlightGuard`].
    in_flight: Arc<AtomicI64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry that labels no method by name: every call is recorded as
    /// `method="other"`. See [`Metrics::new_with_methods`].
    pub fn new() -> Self {
        Self::new_with_methods(std::iter::empty())
    }

    /// A registry that labels these method paths (`/pkg.Service/Method`)
    /// by name: the contract's methods and the gateway's own (health,
    /// reflection). Any other path is recorded as `method="other"`, so the
    /// number of series is bounded by this list, whatever clients send.
    pub fn new_with_methods(methods: impl IntoIterator<Item = String>) -> Self {
        let mut methods: Vec<Box<str>> = methods
            .into_iter()
            .map(String::into_boxed_str)
            .filter(|method| &**method != OTHER_METHOD)
            .collect();
        methods.sort_unstable();
        methods.dedup();
        let method_index = methods
            .iter()
            .enumerate()
            .map(|(index, method)| (method.clone(), index))
            .collect();
        let cells = (0..(methods.len() + 1) * PROTOCOLS.len())
            .map(|_| Cell::default())
            .collect();
        Self {
            methods,
            method_index,
            cells,
            in_flight: Arc::new(AtomicI64::new(0)),
        }
    }

    /// Records one finished call: its method path (labelled by name only if
    /// known, else `other`), protocol (`grpc`, `grpc-web` or `connect`;
    /// anything else is `other`), gRPC status code and duration.
    pub fn record(&self, method: &str, protocol: &str, code: tonic::Code, elapsed: Duration) {
        let method = self
            .method_index
            .get(method)
            .copied()
            .unwrap_or(self.methods.len());
        let protocol = PROTOCOLS[..PROTOCOLS.len() - 1]
            .iter()
            .position(|&known| known == protocol)
            .unwrap_or(PROTOCOLS.len() - 1);
        // `tonic::Code` is a fieldless enum numbered 0..=16 like `CODES`;
        // the clamp only guards against a code added in a future tonic.
        let code = usize::try_from(code as i32)
            .unwrap_or(2)
            .min(CODES.len() - 1);
        self.cells[method * PROTOCOLS.len() + protocol].record(code, elapsed);
    }

    /// Counts a call as in flight until the returned guard is dropped (keep
    /// it with the response body, so a stream counts until it ends).
    pub fn in_flight(&self) -> InFlightGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlightGuard {
            gauge: Arc::clone(&self.in_flight),
        }
    }

    /// Renders every metric in the Prometheus text format 0.0.4 (serve it
    /// as `text/plain; version=0.0.4; charset=utf-8`):
    /// `agora_gateway_requests_total{method,protocol,code}`,
    /// `agora_gateway_request_duration_seconds{method,protocol}` (a
    /// histogram), `agora_gateway_requests_in_flight`, then the `extra`
    /// gauges. An extra gauge with an invalid metric or label name, a
    /// repeated label, or one of the gateway's own names is left out (with a
    /// warning: it is a programming error, not worth failing a scrape for).
    pub fn render(&self, extra: &[Gauge]) -> String {
        let mut out = String::with_capacity(4096);
        self.render_requests(&mut out);
        self.render_durations(&mut out);
        family_header(
            &mut out,
            IN_FLIGHT,
            "Calls the gateway is serving right now.",
            "gauge",
        );
        let _ = writeln!(
            out,
            "{IN_FLIGHT} {}",
            self.in_flight.load(Ordering::Relaxed)
        );
        render_gauges(&mut out, extra);
        out
    }

    /// `(method label, protocol label, cell)` for every cell.
    fn labelled_cells(&self) -> impl Iterator<Item = (&str, &str, &Cell)> {
        self.cells.iter().enumerate().map(|(index, cell)| {
            let method = self
                .methods
                .get(index / PROTOCOLS.len())
                .map_or(OTHER_METHOD, |method| &**method);
            (method, PROTOCOLS[index % PROTOCOLS.len()], cell)
        })
    }

    fn render_requests(&self, out: &mut String) {
        family_header(
            out,
            REQUESTS_TOTAL,
            "Calls finished by the gateway, by method, protocol and gRPC status code.",
            "counter",
        );
        for (method, protocol, cell) in self.labelled_cells() {
            for (code, count) in cell.codes.iter().enumerate() {
                let count = count.load(Ordering::Relaxed);
                if count == 0 {
                    continue;
                }
                let _ = write!(out, "{REQUESTS_TOTAL}{{method=\"");
                escape_label_value(out, method);
                let _ = writeln!(
                    out,
                    "\",protocol=\"{protocol}\",code=\"{}\"}} {count}",
                    CODES[code]
                );
            }
        }
    }

    fn render_durations(&self, out: &mut String) {
        family_header(
            out,
            REQUEST_DURATION,
            "Time from a call's arrival to its last byte, by method and protocol.",
            "histogram",
        );
        for (method, protocol, cell) in self.labelled_cells() {
            // One read of each bucket, summed here: the cumulative counts
            // are non-decreasing and `+Inf` equals `_count` by construction,
            // even while calls are being recorded.
            let buckets: Vec<u64> = cell
                .buckets
                .iter()
                .map(|bucket| bucket.load(Ordering::Relaxed))
                .collect();
            let count: u64 = buckets.iter().sum();
            if count == 0 {
                continue;
            }
            let mut labels = String::from("method=\"");
            escape_label_value(&mut labels, method);
            let _ = write!(labels, "\",protocol=\"{protocol}\"");
            let mut cumulative = 0u64;
            for (bound, in_bucket) in BUCKETS_SECONDS.iter().zip(&buckets) {
                cumulative += in_bucket;
                let _ = writeln!(
                    out,
                    "{REQUEST_DURATION}_bucket{{{labels},le=\"{bound}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "{REQUEST_DURATION}_bucket{{{labels},le=\"+Inf\"}} {count}"
            );
            let sum = cell.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
            let _ = writeln!(out, "{REQUEST_DURATION}_sum{{{labels}}} {}", float(sum));
            let _ = writeln!(out, "{REQUEST_DURATION}_count{{{labels}}} {count}");
        }
    }
}

/// Keeps one call counted in `agora_gateway_requests_in_flight`; dropping
/// it ends the count.
#[derive(Debug)]
#[must_use = "the call stops counting as in flight when the guard is dropped"]
pub struct InFlightGuard {
    gauge: Arc<AtomicI64>,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.gauge.fetch_sub(1, Ordering::Relaxed);
    }
}

fn family_header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = write!(out, "# HELP {name} ");
    escape_help(out, help);
    let _ = writeln!(out, "\n# TYPE {name} {kind}");
}

/// Renders the caller's gauges, grouped by name (a family's samples must be
/// contiguous), families in order of first appearance.
fn render_gauges(out: &mut String, gauges: &[Gauge]) {
    let valid: Vec<&Gauge> = gauges
        .iter()
        .filter(|gauge| {
            let ok = is_metric_name(gauge.name)
                && ![REQUESTS_TOTAL, REQUEST_DURATION, IN_FLIGHT].contains(&gauge.name)
                && gauge.labels.iter().enumerate().all(|(i, (label, _))| {
                    is_label_name(label) && !gauge.labels[..i].iter().any(|(l, _)| l == label)
                });
            if !ok {
                tracing::warn!(
                    gauge = gauge.name,
                    "extra gauge with an invalid or reserved name left out of /metrics"
                );
            }
            ok
        })
        .collect();
    for (first, gauge) in valid.iter().enumerate() {
        if valid[..first].iter().any(|seen| seen.name == gauge.name) {
            continue;
        }
        family_header(out, gauge.name, gauge.help, "gauge");
        for sample in valid[first..].iter().filter(|g| g.name == gauge.name) {
            out.push_str(sample.name);
            if !sample.labels.is_empty() {
                out.push('{');
                for (i, (label, value)) in sample.labels.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    let _ = write!(out, "{label}=\"");
                    escape_label_value(out, value);
                    out.push('"');
                }
                out.push('}');
            }
            let _ = writeln!(out, " {}", float(sample.value));
        }
    }
}

/// A sample value as the exposition format spells it (`NaN`, `+Inf`,
/// `-Inf`, else a plain decimal).
fn float(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_owned()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        value.to_string()
    }
}

/// Label values escape backslash, double quote and line feed.
fn escape_label_value(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Help text escapes backslash and line feed (quotes are literal there).
fn escape_help(out: &mut String, help: &str) {
    for c in help.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    !name.starts_with("__")
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashSet};
    use tonic::Code;

    const GET_PRODUCT: &str = "/agora.catalog.v1.CatalogService/GetProduct";
    const PLACE_ORDER: &str = "/agora.orders.v1.OrderService/PlaceOrder";

    /// One parsed sample line.
    #[derive(Debug, Clone, PartialEq)]
    struct Sample {
        name: String,
        labels: BTreeMap<String, String>,
        value: f64,
    }

    /// A small, strict parser of the text format: checks HELP/TYPE come
    /// first and once per family, families are contiguous, every sample
    /// belongs to a declared family, no series appears twice, and undoes
    /// the escaping. Returns the samples and each family's type.
    fn parse(text: &str) -> (Vec<Sample>, BTreeMap<String, String>) {
        assert!(text.ends_with('\n'), "the last line ends with a line feed");
        let mut types = BTreeMap::new();
        let mut helps = HashSet::new();
        let mut samples = Vec::new();
        let mut current: Option<String> = None;
        let mut finished = HashSet::new();
        let mut series = HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, _) = rest.split_once(' ').expect("help text");
                assert!(helps.insert(name.to_owned()), "second HELP for {name}");
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("type");
                assert!(
                    ["counter", "gauge", "histogram"].contains(&kind),
                    "type {kind}"
                );
                assert!(types.insert(name.to_owned(), kind.to_owned()).is_none());
                assert!(helps.contains(name), "HELP before TYPE for {name}");
                if let Some(previous) = current.replace(name.to_owned()) {
                    finished.insert(previous);
                }
                continue;
            }
            assert!(!line.starts_with('#') && !line.is_empty(), "line {line:?}");
            let sample = parse_sample(line);
            let family = current.as_deref().expect("a sample before any TYPE");
            let kind = &types[family];
            let belongs = if kind == "histogram" {
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|suffix| sample.name == format!("{family}{suffix}"))
            } else {
                sample.name == family
            };
            assert!(belongs, "{} outside its family ({family})", sample.name);
            assert!(!finished.contains(family));
            let key = format!("{}{:?}", sample.name, sample.labels);
            assert!(series.insert(key), "duplicate series {line}");
            samples.push(sample);
        }
        (samples, types)
    }

    fn parse_sample(line: &str) -> Sample {
        let (name_end, mut rest) = match line.find(['{', ' ']) {
            Some(i) => (i, &line[i..]),
            None => panic!("no value in {line:?}"),
        };
        let name = line[..name_end].to_owned();
        assert!(is_metric_name(&name), "metric name {name:?}");
        let mut labels = BTreeMap::new();
        if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices().peekable();
            loop {
                let (start, _) = *chars.peek().expect("label");
                let eq = body[start..].find('=').expect("=") + start;
                let label = body[start..eq].to_owned();
                assert!(is_label_name(&label), "label name {label:?}");
                assert_eq!(&body[eq + 1..eq + 2], "\"");
                while chars.peek().is_some_and(|&(i, _)| i <= eq + 1) {
                    chars.next();
                }
                let mut value = String::new();
                loop {
                    match chars.next().expect("closing quote") {
                        (_, '\\') => match chars.next().expect("escaped char").1 {
                            '\\' => value.push('\\'),
                            '"' => value.push('"'),
                            'n' => value.push('\n'),
                            other => panic!("bad escape \\{other}"),
                        },
                        (_, '"') => break,
                        (_, '\n') => panic!("raw line feed in a label value"),
                        (_, c) => value.push(c),
                    }
                }
                assert!(labels.insert(label, value).is_none(), "repeated label");
                match chars.next().expect("after a label") {
                    (_, ',') => continue,
                    (i, '}') => {
                        rest = &body[i + 1..];
                        break;
                    }
                    (_, c) => panic!("unexpected {c:?} after a label value"),
                }
            }
        }
        let value = rest.strip_prefix(' ').expect("space before the value");
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse().unwrap_or_else(|_| panic!("value {v:?}")),
        };
        Sample {
            name,
            labels,
            value,
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn value(samples: &[Sample], name: &str, pairs: &[(&str, &str)]) -> Option<f64> {
        let wanted = labels(pairs);
        samples
            .iter()
            .find(|s| s.name == name && s.labels == wanted)
            .map(|s| s.value)
    }

    fn metrics() -> Metrics {
        Metrics::new_with_methods([GET_PRODUCT.to_owned(), PLACE_ORDER.to_owned()])
    }

    #[test]
    fn an_empty_registry_renders_valid_families() {
        let (samples, types) = parse(&metrics().render(&[]));
        assert_eq!(types[REQUESTS_TOTAL], "counter");
        assert_eq!(types[REQUEST_DURATION], "histogram");
        assert_eq!(types[IN_FLIGHT], "gauge");
        assert_eq!(samples.len(), 1);
        assert_eq!(value(&samples, IN_FLIGHT, &[]), Some(0.0));
    }

    #[test]
    fn calls_are_counted_by_method_protocol_and_code() {
        let m = metrics();
        let ms = Duration::from_millis;
        m.record(GET_PRODUCT, "grpc-web", Code::Ok, ms(3));
        m.record(GET_PRODUCT, "grpc-web", Code::Ok, ms(4));
        m.record(GET_PRODUCT, "grpc-web", Code::NotFound, ms(1));
        m.record(GET_PRODUCT, "connect", Code::Ok, ms(2));
        m.record(PLACE_ORDER, "grpc", Code::Unauthenticated, ms(1));
        let (samples, _) = parse(&m.render(&[]));
        let count = |method, protocol, code| {
            value(
                &samples,
                REQUESTS_TOTAL,
                &[("method", method), ("protocol", protocol), ("code", code)],
            )
        };
        assert_eq!(count(GET_PRODUCT, "grpc-web", "OK"), Some(2.0));
        assert_eq!(count(GET_PRODUCT, "grpc-web", "NOT_FOUND"), Some(1.0));
        assert_eq!(count(GET_PRODUCT, "connect", "OK"), Some(1.0));
        assert_eq!(count(PLACE_ORDER, "grpc", "UNAUTHENTICATED"), Some(1.0));
        // Unobserved series are not rendered.
        assert_eq!(count(PLACE_ORDER, "grpc-web", "OK"), None);
        let total: f64 = samples
            .iter()
            .filter(|s| s.name == REQUESTS_TOTAL)
            .map(|s| s.value)
            .sum();
        assert_eq!(total, 5.0);
    }

    #[test]
    fn every_code_has_its_canonical_name() {
        let m = metrics();
        for number in 0..17 {
            m.record(GET_PRODUCT, "grpc", Code::from(number), Duration::ZERO);
        }
        let (samples, _) = parse(&m.render(&[]));
        let codes: Vec<&str> = samples
            .iter()
            .filter(|s| s.name == REQUESTS_TOTAL)
            .map(|s| s.labels["code"].as_str())
            .collect();
        assert_eq!(codes, CODES);
        assert_eq!(codes[14], "UNAVAILABLE");
    }

    #[test]
    fn durations_fill_cumulative_buckets() {
        let m = metrics();
        let us = Duration::from_micros;
        // 0.4 ms, exactly 0.5 ms (le is inclusive), 0.7 ms, 30 ms, 12 s.
        for elapsed in [us(400), us(500), us(700), us(30_000), us(12_000_000)] {
            m.record(GET_PRODUCT, "grpc", Code::Ok, elapsed);
        }
        let (samples, _) = parse(&m.render(&[]));
        let bucket_name = format!("{REQUEST_DURATION}_bucket");
        let bucket = |le| {
            value(
                &samples,
                &bucket_name,
                &[("method", GET_PRODUCT), ("protocol", "grpc"), ("le", le)],
            )
        };
        assert_eq!(bucket("0.0005"), Some(2.0));
        assert_eq!(bucket("0.001"), Some(3.0));
        assert_eq!(bucket("0.025"), Some(3.0));
        assert_eq!(bucket("0.05"), Some(4.0));
        assert_eq!(bucket("10"), Some(4.0));
        assert_eq!(bucket("+Inf"), Some(5.0));
        // Buckets in order, non-decreasing, ending with +Inf.
        let les: Vec<(f64, f64)> = samples
            .iter()
            .filter(|s| s.name == bucket_name)
            .map(|s| {
                let le = &s.labels["le"];
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().expect("le")
                };
                (le, s.value)
            })
            .collect();
        assert_eq!(les.len(), BUCKETS_SECONDS.len() + 1);
        assert!(les.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1));
        let series = [("method", GET_PRODUCT), ("protocol", "grpc")];
        let sum = value(&samples, &format!("{REQUEST_DURATION}_sum"), &series).expect("sum");
        assert!((sum - 12.0316).abs() < 1e-9, "sum {sum}");
        let count = value(&samples, &format!("{REQUEST_DURATION}_count"), &series);
        assert_eq!(count, Some(5.0));
    }

    #[test]
    fn unknown_methods_and_protocols_are_other() {
        let m = metrics();
        m.record(
            "/evil.Service/Random1",
            "grpc",
            Code::Unimplemented,
            Duration::ZERO,
        );
        m.record(
            "/evil.Service/Random2",
            "grpc",
            Code::Unimplemented,
            Duration::ZERO,
        );
        m.record(GET_PRODUCT, "carrier-pigeon", Code::Ok, Duration::ZERO);
        let (samples, _) = parse(&m.render(&[]));
        let unknown = [
            ("method", "other"),
            ("protocol", "grpc"),
            ("code", "UNIMPLEMENTED"),
        ];
        assert_eq!(value(&samples, REQUESTS_TOTAL, &unknown), Some(2.0));
        let odd_protocol = [
            ("method", GET_PRODUCT),
            ("protocol", "other"),
            ("code", "OK"),
        ];
        assert_eq!(value(&samples, REQUESTS_TOTAL, &odd_protocol), Some(1.0));
        assert!(!m.render(&[]).contains("Random"));
    }

    #[test]
    fn without_known_methods_everything_is_other() {
        let m = Metrics::new();
        m.record(GET_PRODUCT, "grpc", Code::Ok, Duration::ZERO);
        let (samples, _) = parse(&m.render(&[]));
        let other = [("method", "other"), ("protocol", "grpc"), ("code", "OK")];
        assert_eq!(value(&samples, REQUESTS_TOTAL, &other), Some(1.0));
    }

    #[test]
    fn label_values_are_escaped() {
        let odd = "/a\\b.\"Svc\"/M\nx";
        let m = Metrics::new_with_methods([odd.to_owned()]);
        m.record(odd, "grpc", Code::Ok, Duration::ZERO);
        let gauge = Gauge {
            name: "agora_gateway_backend_instances",
            help: "Instances per \\ service\nknown to discovery.",
            labels: vec![("service", "quote\"back\\slash\nline".to_owned())],
            value: 3.0,
        };
        let text = m.render(std::slice::from_ref(&gauge));
        assert!(text.contains(r#"method="/a\\b.\"Svc\"/M\nx""#), "{text}");
        assert!(
            text.contains(
                "# HELP agora_gateway_backend_instances Instances per \\\\ service\\nknown"
            )
        );
        let (samples, _) = parse(&text);
        let count = [("method", odd), ("protocol", "grpc"), ("code", "OK")];
        assert_eq!(value(&samples, REQUESTS_TOTAL, &count), Some(1.0));
        let instances = [("service", "quote\"back\\slash\nline")];
        assert_eq!(value(&samples, gauge.name, &instances), Some(3.0));
    }

    #[test]
    fn in_flight_counts_live_guards() {
        let m = metrics();
        let first = m.in_flight();
        let second = m.in_flight();
        let (samples, _) = parse(&m.render(&[]));
        assert_eq!(value(&samples, IN_FLIGHT, &[]), Some(2.0));
        drop(first);
        let (samples, _) = parse(&m.render(&[]));
        assert_eq!(value(&samples, IN_FLIGHT, &[]), Some(1.0));
        drop(second);
        let (samples, _) = parse(&m.render(&[]));
        assert_eq!(value(&samples, IN_FLIGHT, &[]), Some(0.0));
    }

    #[test]
    fn extra_gauges_are_grouped_by_name() {
        let gauge = |name, labels: Vec<(&'static str, String)>, value| Gauge {
            name,
            help: "test gauge",
            labels,
            value,
        };
        let extra = [
            gauge("agora_pool_size", vec![("pool", "a".to_owned())], 1.0),
            gauge("agora_rate_limit_clients", vec![], 42.0),
            gauge("agora_pool_size", vec![("pool", "b".to_owned())], 2.5),
            gauge("agora_special", vec![("kind", "nan".to_owned())], f64::NAN),
            gauge(
                "agora_special",
                vec![("kind", "inf".to_owned())],
                f64::INFINITY,
            ),
        ];
        let (samples, types) = parse(&metrics().render(&extra));
        assert_eq!(types["agora_pool_size"], "gauge");
        assert_eq!(
            value(&samples, "agora_pool_size", &[("pool", "a")]),
            Some(1.0)
        );
        assert_eq!(
            value(&samples, "agora_pool_size", &[("pool", "b")]),
            Some(2.5)
        );
        assert_eq!(value(&samples, "agora_rate_limit_clients", &[]), Some(42.0));
        let nan = value(&samples, "agora_special", &[("kind", "nan")]).expect("nan");
        assert!(nan.is_nan());
        assert_eq!(
            value(&samples, "agora_special", &[("kind", "inf")]),
            Some(f64::INFINITY)
        );
    }

    #[test]
    fn invalid_extra_gauges_are_left_out() {
        let gauge = |name, labels: Vec<(&'static str, String)>| Gauge {
            name,
            help: "test gauge",
            labels,
            value: 1.0,
        };
        let extra = [
            gauge("bad-name", vec![]),
            gauge("agora_bad_label", vec![("bad-label", "x".to_owned())]),
            gauge(
                "agora_repeated_label",
                vec![("a", "1".to_owned()), ("a", "2".to_owned())],
            ),
            gauge(IN_FLIGHT, vec![]),
            gauge("agora_good", vec![]),
        ];
        let text = metrics().render(&extra);
        let (samples, _) = parse(&text);
        assert_eq!(value(&samples, "agora_good", &[]), Some(1.0));
        assert_eq!(value(&samples, IN_FLIGHT, &[]), Some(0.0));
        assert!(!text.contains("bad"));
        assert!(!text.contains("repeated"));
    }

    #[test]
    fn names_are_validated() {
        assert!(is_metric_name("agora_gateway:ratio_1"));
        assert!(!is_metric_name("1abc"));
        assert!(!is_metric_name("a-b"));
        assert!(!is_metric_name(""));
        assert!(is_label_name("service_name"));
        assert!(!is_label_name("__reserved"));
        assert!(!is_label_name("a:b"));
        assert!(!is_label_name(""));
    }

    #[test]
    fn recording_from_many_threads_loses_nothing() {
        let m = Arc::new(metrics());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let m = Arc::clone(&m);
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        m.record(GET_PRODUCT, "grpc", Code::Ok, Duration::from_millis(1));
                    }
                })
            })
            .collect();
        for handle in handles {
            handle.join().expect("thread");
        }
        let (samples, _) = parse(&m.render(&[]));
        let ok = [
            ("method", GET_PRODUCT),
            ("protocol", "grpc"),
            ("code", "OK"),
        ];
        assert_eq!(value(&samples, REQUESTS_TOTAL, &ok), Some(40_000.0));
    }
}
