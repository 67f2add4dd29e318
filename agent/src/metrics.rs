//! Prometheus metrics: Istio's agent names with Istio's types and labels where a
//! dashboard queries them (contract §6), Signet's own names (with `_total` on
//! counters) for the rest, and the process and build metrics every exporter has.

use prometheus::{
    CounterVec, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry,
};

/// Istio's `request_type` label value for requests to the CA.
const CSR: &str = "csr";

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
    /// CA round trips: Istio's running total in milliseconds.
    outgoing_latency_ms: prometheus::Counter,
    /// CA round trips: their distribution in seconds.
    csr_duration: Histogram,
    /// Trust-file changes the CA's bundle did not reflect within
    /// `--trust-sync-timeout`.
    pub trust_sync_timeouts: IntCounter,
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = signet_telemetry::registry("signet_agent", env!("CARGO_PKG_VERSION"))?;
        // Istio's agent counters: no `_total`, a `request_type` label ("csr" here).
        let istio_counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounterVec::new(Opts::new(name, help), &["request_type"])?;
            registry.register(Box::new(c.clone()))?;
            Ok(c.with_label_values(&[CSR]))
        };
        let cert_expiry_seconds = GaugeVec::new(
            Opts::new(
                "istio_agent_cert_expiry_seconds",
                "Seconds until the certificate expires, by resource.",
            ),
            &["resource_name"],
        )?;
        registry.register(Box::new(cert_expiry_seconds.clone()))?;
        let outgoing_latency = CounterVec::new(
            Opts::new(
                "istio_agent_outgoing_latency",
                "The latency of outgoing requests (to the CA) in milliseconds, summed.",
            ),
            &["request_type"],
        )?;
        registry.register(Box::new(outgoing_latency.clone()))?;
        let csr_duration = Histogram::with_opts(HistogramOpts::new(
            "signet_agent_csr_duration_seconds",
            "Duration of CSR requests to the CA, in seconds.",
        ))?;
        registry.register(Box::new(csr_duration.clone()))?;
        let trust_sync_timeouts = IntCounter::new(
            "signet_agent_trust_sync_timeouts_total",
            "Changes of the CA trust file that the CA's bundle still did not reflect after --trust-sync-timeout.",
        )?;
        registry.register(Box::new(trust_sync_timeouts.clone()))?;
        Ok(Self {
            outgoing_requests: istio_counter(
                "istio_agent_num_outgoing_requests",
                "Number of total outgoing requests (to the CA).",
            )?,
            failed_requests: istio_counter(
                "istio_agent_num_failed_outgoing_requests",
                "Number of failed outgoing requests (to the CA).",
            )?,
            retries: istio_counter(
                "istio_agent_num_outgoing_retries",
                "Number of outgoing retry requests (to the CA).",
            )?,
            outgoing_latency_ms: outgoing_latency.with_label_values(&[CSR]),
            csr_duration,
            trust_sync_timeouts,
            cert_expiry_seconds,
            registry,
        })
    }

    /// Records one round trip to the CA.
    pub fn observe_csr(&self, took: std::time::Duration) {
        self.outgoing_latency_ms.inc_by(took.as_secs_f64() * 1000.0);
        self.csr_duration.observe(took.as_secs_f64());
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        signet_telemetry::render_metrics(&self.registry)
    }
}
