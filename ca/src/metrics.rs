//! Prometheus metrics: istiod's CA names (no `_total`, as istiod serves them) where
//! Istio's dashboards query them (contract §6), Signet's own names with `_total` on
//! every counter, and the process and build metrics every exporter has.

use prometheus::{
    Gauge, GaugeVec, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// The CA's metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Every CreateCertificate request.
    pub csr_count: IntCounter,
    /// Requests whose CSR could not be parsed or whose signature did not verify.
    pub csr_parsing_err_count: IntCounter,
    /// Requests whose caller's identity could not be made a SPIFFE ID (or whose
    /// impersonation target is not one).
    pub id_extraction_err_count: IntCounter,
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
    /// `connections_per_peer`, `token_reviews`, `caller_share`).
    pub limit_rejections: IntCounterVec,
    /// Connections the CA closed of its own accord, by reason (`evicted`,
    /// `first_request_timeout`, `idle_timeout`, `max_age`).
    pub connections_closed: IntCounterVec,
    /// Completed TLS handshakes by listener, key-exchange group and TLS version.
    pub tls_handshakes: IntCounterVec,
    /// Failed TLS handshakes by listener and reason.
    pub tls_handshake_failures: IntCounterVec,
    /// JWT-SVIDs minted.
    pub jwt_svids_issued: IntCounter,
    /// JWT-SVID requests refused, by gRPC code.
    pub jwt_svid_refusals: IntCounterVec,
    /// 1 while this replica holds the writer Lease, else 0.
    pub leader: IntGauge,
    /// 1 when the local API server answered the last probe, else 0.
    pub api_server_up: IntGauge,
    /// Probes of the local API server that got no answer.
    pub api_server_probe_failures: IntCounter,
    /// Objects created or updated in the API server, by writer.
    pub writer_writes: IntCounterVec,
    /// Writes refused with 409 Conflict (and retried), by writer.
    pub writer_conflicts: IntCounterVec,
    /// Failed syncs (retried with backoff), by writer.
    pub writer_errors: IntCounterVec,
    /// Unix time of the last sync that left every object as desired, by writer.
    pub writer_last_sync: GaugeVec,
    /// PodCertificateRequests answered, by result (`issued`, `denied`, `failed`).
    pub pod_certificates: IntCounterVec,
    /// 1 for the trust change's current stage, 0 for the others, by stage.
    pub rotation_stage: IntGaugeVec,
    /// Seconds since the current stage began.
    pub rotation_stage_seconds: Gauge,
    /// Holders whose leaves keep the current stage from ending.
    pub rotation_pending: IntGauge,
    /// 1 when every consumer the CA writes holds the current stage's bundle.
    pub rotation_converged: IntGauge,
    /// Next sets refused (wrong, or changed during a rotation).
    pub rotation_refusals: IntCounter,
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = signet_telemetry::registry("signet_ca", env!("CARGO_PKG_VERSION"))?;
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
                "signet_ca_cacerts_reloads_total",
                "Attempts to load changed CA key material, by result (success or failure).",
            ),
            &["result"],
        )?;
        registry.register(Box::new(cacerts_reloads.clone()))?;
        let limit_rejections = IntCounterVec::new(
            Opts::new(
                "signet_ca_limit_rejections_total",
                "Connections and requests turned away by a limit, by limit.",
            ),
            &["limit"],
        )?;
        registry.register(Box::new(limit_rejections.clone()))?;
        let connections_closed = IntCounterVec::new(
            Opts::new(
                "signet_ca_connections_closed_total",
                "Connections the CA closed of its own accord, by reason: evicted (the oldest idle one when the pool was full), first_request_timeout, idle_timeout, max_age (past the grace after the maximum age).",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(connections_closed.clone()))?;
        let tls_handshakes = IntCounterVec::new(
            Opts::new(
                "signet_ca_tls_handshakes_total",
                "Completed TLS handshakes, by listener, negotiated key-exchange group (X25519MLKEM768, X25519, P-256, P-384) and TLS version: when every client is on X25519MLKEM768, COMPLIANCE_POLICY=pqc refuses nobody.",
            ),
            &["listener", "group", "version"],
        )?;
        registry.register(Box::new(tls_handshakes.clone()))?;
        let tls_handshake_failures = IntCounterVec::new(
            Opts::new(
                "signet_ca_tls_handshake_failures_total",
                "Failed TLS handshakes, by listener and reason: no_shared_group, no_shared_cipher_suite, protocol_version, certificate, timeout, other.",
            ),
            &["listener", "reason"],
        )?;
        registry.register(Box::new(tls_handshake_failures.clone()))?;
        let jwt_svid_refusals = IntCounterVec::new(
            Opts::new(
                "signet_ca_jwt_svid_refusals_total",
                "JWT-SVID requests refused, by gRPC code.",
            ),
            &["code"],
        )?;
        registry.register(Box::new(jwt_svid_refusals.clone()))?;
        let by_writer = |name: &str, help: &str| -> Result<IntCounterVec, prometheus::Error> {
            let c = IntCounterVec::new(Opts::new(name, help), &["writer"])?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let writer_writes = by_writer(
            "signet_ca_writer_writes_total",
            "Objects created or updated in the Kubernetes API server, by writer.",
        )?;
        let writer_conflicts = by_writer(
            "signet_ca_writer_conflicts_total",
            "Writes refused with 409 Conflict and retried, by writer.",
        )?;
        let writer_errors = by_writer(
            "signet_ca_writer_errors_total",
            "Syncs that failed and are retried with backoff, by writer.",
        )?;
        let pod_certificates = IntCounterVec::new(
            Opts::new(
                "signet_ca_pod_certificates_total",
                "PodCertificateRequests answered, by result (issued, denied, failed).",
            ),
            &["result"],
        )?;
        registry.register(Box::new(pod_certificates.clone()))?;
        let writer_last_sync = GaugeVec::new(
            Opts::new(
                "signet_ca_writer_last_sync_timestamp_seconds",
                "Unix time of the last sync that left every object as desired, by writer.",
            ),
            &["writer"],
        )?;
        registry.register(Box::new(writer_last_sync.clone()))?;
        let rotation_stage = IntGaugeVec::new(
            Opts::new(
                "signet_ca_rotation_stage",
                "1 for the stage the trust change is in (idle, distribute, switch, retire, done, aborting), 0 for the others.",
            ),
            &["stage"],
        )?;
        registry.register(Box::new(rotation_stage.clone()))?;
        let rotation_pending = IntGauge::new(
            "signet_ca_rotation_pending",
            "Holders whose certificates keep the trust change's stage from ending (renewal or expiry due).",
        )?;
        registry.register(Box::new(rotation_pending.clone()))?;
        let rotation_converged = IntGauge::new(
            "signet_ca_rotation_converged",
            "1 when every consumer the CA writes (trust file, root ConfigMaps, ...) was read back holding the current stage's bundle.",
        )?;
        registry.register(Box::new(rotation_converged.clone()))?;
        let leader = IntGauge::new(
            "signet_ca_leader",
            "1 while this replica holds the writer Lease (it alone writes to the API server).",
        )?;
        registry.register(Box::new(leader.clone()))?;
        let api_server_up = IntGauge::new(
            "signet_ca_api_server_up",
            "1 when the local Kubernetes API server answered the last probe (GET /version every 10s), 0 when it did not.",
        )?;
        let api_server_probe_failures = IntCounter::new(
            "signet_ca_api_server_probe_failures_total",
            "Probes of the local Kubernetes API server that got no answer.",
        )?;
        Ok(Self {
            csr_count: counter(
                "citadel_server_csr_count",
                "CreateCertificate requests received.",
            )?,
            csr_parsing_err_count: counter(
                "citadel_server_csr_parsing_err_count",
                "The number of errors occurred when parsing the CSR.",
            )?,
            id_extraction_err_count: counter(
                "citadel_server_id_extraction_err_count",
                "The number of errors occurred when extracting the ID from the caller or the request.",
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
            jwt_svids_issued: counter("signet_ca_jwt_svids_issued_total", "JWT-SVIDs minted.")?,
            jwt_svid_refusals,
            overloaded: counter(
                "signet_ca_overload_rejections_total",
                "Requests refused with RESOURCE_EXHAUSTED because the signing queue was full.",
            )?,
            csr_sign_err_count,
            request_latency,
            cacerts_reloads,
            limit_rejections,
            connections_closed,
            tls_handshakes,
            tls_handshake_failures,
            leader,
            api_server_up,
            api_server_probe_failures,
            writer_writes,
            writer_conflicts,
            writer_errors,
            writer_last_sync,
            pod_certificates,
            rotation_stage,
            rotation_stage_seconds: gauge(
                "signet_ca_rotation_stage_seconds",
                "Seconds since the trust change's current stage began.",
            )?,
            rotation_pending,
            rotation_converged,
            rotation_refusals: counter(
                "signet_ca_rotation_refusals_total",
                "Declared next CA sets refused (wrong, or changed while a rotation was under way).",
            )?,
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

    /// Serves the API server probe's metrics, which exist only with API access.
    pub(crate) fn register_api_server_probe(&self) -> Result<(), prometheus::Error> {
        self.registry
            .register(Box::new(self.api_server_up.clone()))?;
        self.registry
            .register(Box::new(self.api_server_probe_failures.clone()))
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        signet_telemetry::render_metrics(&self.registry)
    }
}
