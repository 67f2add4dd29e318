//! Prometheus metrics under Istio's agent names (contract §6).

use prometheus::{GaugeVec, Histogram, HistogramOpts, IntCounter, Opts, Registry};

/// The agent's metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Seconds until each held certificate expires, by SDS resource name.
    pub cert_expiry_seconds: GaugeVec,
    /// CSRs sent to the CA.
    pub outgoing_requests: IntCounter,
    /// CSRs that did not produce a usable certificate.
    pub failed_requests: IntCounter,
    /// Retries after failures.
    pub retries: IntCounter,
    /// CA round-trip time, seconds.
    pub outgoing_latency: Histogram,
    /// Trust-file changes the CA's bundle did not reflect within
    /// `--trust-sync-timeout`.
    pub trust_sync_timeouts: IntCounter,
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
        let cert_expiry_seconds = GaugeVec::new(
            Opts::new(
                "istio_agent_cert_expiry_seconds",
                "Seconds until the certificate expires, by resource.",
            ),
            &["resource_name"],
        )?;
        registry.register(Box::new(cert_expiry_seconds.clone()))?;
        let outgoing_latency = Histogram::with_opts(HistogramOpts::new(
            "istio_agent_outgoing_latency",
            "Latency of CSR requests to the CA, in seconds.",
        ))?;
        registry.register(Box::new(outgoing_latency.clone()))?;
        Ok(Self {
            outgoing_requests: counter(
                "istio_agent_num_outgoing_requests",
                "CSR requests sent to the CA.",
            )?,
            failed_requests: counter(
                "istio_agent_num_failed_outgoing_requests",
                "CSR requests that failed.",
            )?,
            retries: counter(
                "istio_agent_num_outgoing_retries",
                "Retries of failed CSR requests.",
            )?,
            trust_sync_timeouts: counter(
                "signet_agent_trust_sync_timeouts",
                "Changes of the CA trust file that the CA's bundle still did not reflect after --trust-sync-timeout.",
            )?,
            cert_expiry_seconds,
            outgoing_latency,
            registry,
        })
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        signet_telemetry::render_metrics(&self.registry)
    }
}
