//! Prometheus metrics under the names Istio dashboards already query (contract §6).

use prometheus::{Gauge, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};

/// The CA's metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Every CreateCertificate request.
    pub csr_count: IntCounter,
    /// Requests whose caller could not be authenticated.
    pub authentication_failure_count: IntCounter,
    /// Failed signings, by reason.
    pub csr_sign_err_count: IntCounterVec,
    /// Certificates issued.
    pub success_cert_issuance_count: IntCounter,
    /// NotAfter of the root the chain ends at, Unix seconds.
    pub root_cert_expiry_timestamp: Gauge,
    /// NotAfter of the signing certificate, Unix seconds.
    pub cert_chain_expiry_timestamp: Gauge,
    /// Seconds until the root expires.
    pub root_cert_expiry_seconds: Gauge,
    /// Seconds until the signing certificate expires.
    pub cert_chain_expiry_seconds: Gauge,
    /// CreateCertificate latency, by gRPC code.
    pub request_latency: prometheus::HistogramVec,
    /// Key material reloads, by result.
    pub cacerts_reloads: IntCounterVec,
    /// Requests turned away because the signing queue was full.
    pub overloaded: IntCounter,
    /// Connections and requests turned away by a limit, by limit (`connections`,
    /// `token_reviews`, `caller_share`).
    pub limit_rejections: IntCounterVec,
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str| -> Result<Gauge, prometheus::Error> {
            let g = Gauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let csr_sign_err_count = IntCounterVec::new(
            Opts::new(
                "citadel_server_csr_sign_err_count",
                "CSR signing errors, by error.",
            ),
            &["error"],
        )?;
        registry.register(Box::new(csr_sign_err_count.clone()))?;
        let request_latency = prometheus::HistogramVec::new(
            HistogramOpts::new(
                "signet_ca_create_certificate_duration_seconds",
                "CreateCertificate latency in seconds, by gRPC status code.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["code"],
        )?;
        registry.register(Box::new(request_latency.clone()))?;
        let cacerts_reloads = IntCounterVec::new(
            Opts::new(
                "signet_ca_cacerts_reload_count",
                "Attempts to load changed CA key material, by result (success or failure).",
            ),
            &["result"],
        )?;
        registry.register(Box::new(cacerts_reloads.clone()))?;
        let limit_rejections = IntCounterVec::new(
            Opts::new(
                "signet_ca_limit_rejections",
                "Connections and requests turned away by a limit, by limit.",
            ),
            &["limit"],
        )?;
        registry.register(Box::new(limit_rejections.clone()))?;
        Ok(Self {
            csr_count: counter(
                "citadel_server_csr_count",
                "CreateCertificate requests received.",
            )?,
            authentication_failure_count: counter(
                "citadel_server_authentication_failure_count",
                "Requests whose caller could not be authenticated.",
            )?,
            success_cert_issuance_count: counter(
                "citadel_server_success_cert_issuance_count",
                "Certificates issued.",
            )?,
            root_cert_expiry_timestamp: gauge(
                "citadel_server_root_cert_expiry_timestamp",
                "Unix time at which the root certificate expires.",
            )?,
            cert_chain_expiry_timestamp: gauge(
                "citadel_server_cert_chain_expiry_timestamp",
                "Unix time at which the signing certificate expires.",
            )?,
            root_cert_expiry_seconds: gauge(
                "citadel_server_root_cert_expiry_seconds",
                "Seconds until the root certificate expires.",
            )?,
            cert_chain_expiry_seconds: gauge(
                "citadel_server_cert_chain_expiry_seconds",
                "Seconds until the signing certificate expires.",
            )?,
            overloaded: counter(
                "signet_ca_overload_rejections",
                "Requests refused with RESOURCE_EXHAUSTED because the signing queue was full.",
            )?,
            csr_sign_err_count,
            request_latency,
            cacerts_reloads,
            limit_rejections,
            registry,
        })
    }

    /// Records the expiry of the key material in use.
    pub fn set_expiries(&self, root: time::OffsetDateTime, chain: time::OffsetDateTime) {
        let now = time::OffsetDateTime::now_utc();
        self.root_cert_expiry_timestamp
            .set(root.unix_timestamp() as f64);
        self.cert_chain_expiry_timestamp
            .set(chain.unix_timestamp() as f64);
        self.root_cert_expiry_seconds
            .set((root - now).as_seconds_f64());
        self.cert_chain_expiry_seconds
            .set((chain - now).as_seconds_f64());
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        signet_telemetry::render_metrics(&self.registry)
    }
}
