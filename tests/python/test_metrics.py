"""Both binaries' `/metrics`, read by Prometheus' own Python client's text parser:
the names and types Istio's dashboards query (istiod's CA and pilot-agent's, counters
without `_total` as Istio serves them), `_total` on every other counter, the
`process_*` metrics, a build-info metric, and the istiod counters for unparsable
CSRs and identities that cannot be extracted."""

import tomllib
import urllib.request

import grpc
import pytest
from google.protobuf import struct_pb2
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, make_csr, request, start_agent, stop_agent

VERSION = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["package"]["version"]

# Counters Istio serves without `_total`: the only ones allowed to lack it.
ISTIO_COUNTERS = {
    "citadel_server_csr_count", "citadel_server_authentication_failure_count",
    "citadel_server_csr_sign_err_count", "citadel_server_success_cert_issuance_count",
    "citadel_server_csr_parsing_err_count", "citadel_server_id_extraction_err_count",
    "istio_agent_num_outgoing_requests", "istio_agent_num_failed_outgoing_requests",
    "istio_agent_num_outgoing_retries", "istio_agent_outgoing_latency",
}
PROCESS = {"process_cpu_seconds", "process_resident_memory_bytes", "process_virtual_memory_bytes",
           "process_open_fds", "process_max_fds", "process_start_time_seconds", "process_threads"}


def families(text):
    """Family name -> (type, [(sample name, labels, value)])."""
    out = {}
    for f in text_string_to_metric_families(text):
        out[f.name] = (f.type, [(s.name, s.labels, s.value) for s in f.samples])
    return out


def check_conventions(text, prefix):
    """The parser names counter samples `_total` whatever the text says, so the
    names are checked on the text's own `# TYPE` lines and sample lines."""
    fams = families(text)
    counters = [line.split()[2] for line in text.splitlines()
                if line.startswith("# TYPE ") and line.split()[3] == "counter"]
    samples = {line.split("{")[0].split()[0] for line in text.splitlines()
               if line and not line.startswith("#")}
    assert counters
    for name in counters:
        if name.removesuffix("_total") in ISTIO_COUNTERS:
            assert name in ISTIO_COUNTERS, f"{name}: Istio's name has no _total"
        else:
            assert name.endswith("_total"), f"counter {name} lacks _total"
        assert name in samples, f"{name} declared but never sampled as such"
    missing = PROCESS - set(fams)
    assert not missing, missing
    assert fams["process_cpu_seconds"][0] == "counter"
    rss = fams["process_resident_memory_bytes"][1][0][2]
    assert 1 << 20 < rss < 1 << 31, rss
    kind, samples = fams[f"{prefix}_build_info"]
    assert kind == "gauge"
    [(_, labels, value)] = samples
    assert value == 1 and set(labels) == {"version", "revision"}, labels
    assert labels["version"] == VERSION
    return fams


def value(fams, name, **labels):
    for _, got, v in fams[name][1]:
        if got == labels:
            return v
    raise AssertionError(f"no {name}{labels} in {fams[name]}")


def test_ca_metrics(ca, cluster):
    before = check_conventions(ca.http("/metrics")[1], "signet_ca")
    token = cluster.token()
    _, csr = make_csr()
    request(ca.stub(), csr, token)
    with pytest.raises(grpc.RpcError) as bad_csr:
        request(ca.stub(), "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", token)
    assert bad_csr.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    md = struct_pb2.Struct()
    md.update({"ImpersonatedIdentity": 7})
    with pytest.raises(grpc.RpcError) as bad_id:
        request(ca.stub(), csr, token, metadata=md)
    assert bad_id.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = check_conventions(ca.http("/metrics")[1], "signet_ca")
    for name in ("citadel_server_csr_parsing_err_count", "citadel_server_id_extraction_err_count"):
        assert after[name][0] == "counter"
        assert value(after, name) == value(before, name) + 1, name
    assert value(after, "citadel_server_success_cert_issuance_count") >= 1
    assert after["signet_ca_create_certificate_duration_seconds"][0] == "histogram"
    # The JWKS mode has no API access: no probe, so no metric that would read as down.
    assert "signet_ca_api_server_up" not in after


def test_agent_metrics(ca, cluster):
    agent = start_agent(ca, cluster)
    try:
        status, text = agent.http("/metrics")
        assert status == 200
        fams = check_conventions(text, "signet_agent")
        # pilot-agent's types and labels (security/pkg/nodeagent/cache/monitoring.go).
        for name in ("istio_agent_num_outgoing_requests", "istio_agent_outgoing_latency"):
            assert fams[name][0] == "counter", name
            assert value(fams, name, request_type="csr") > 0, name
        assert fams["istio_agent_cert_expiry_seconds"][0] == "gauge"
        assert value(fams, "istio_agent_cert_expiry_seconds", resource_name="default") > 3600
        assert fams["signet_agent_csr_duration_seconds"][0] == "histogram"
    finally:
        stop_agent(agent)


def test_listeners_on_the_ipv6_wildcard_take_both_families(ca, cluster):
    """The agent's default `--http-addr [::]:15020` (and the chart's listeners): one
    socket answers over IPv4 and over IPv6."""
    agent = start_agent(ca, cluster, http_host="[::]")
    try:
        for host in ("127.0.0.1", "[::1]"):
            url = f"http://{host}:{agent.http_port}/healthz/ready"
            with urllib.request.urlopen(url, timeout=10) as r:
                assert r.status == 200, host
    finally:
        stop_agent(agent)
