"""Real Envoy for the tests: bootstrap pieces (SDS from signet-agent through either of
Envoy's gRPC clients), a process with its admin port, and stats."""

import json
import subprocess
import time
import urllib.request

from conftest import ROOT, free_port

ENVOY = str(ROOT / ".venv" / "bin" / "envoy")
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = {"name": "envoy.filters.http.router", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
HTTP2 = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
    "explicit_http_config": {"http2_protocol_options": {}}}}


def sds(name, sock, client="envoy_grpc", api_type="GRPC"):
    """An SDS secret config for `name` from the agent listening on `sock`."""
    if client == "google_grpc":
        service = {"google_grpc": {"target_uri": f"unix:{sock}", "stat_prefix": "sds"}}
    else:
        service = {"envoy_grpc": {"cluster_name": "sds-grpc"}}
    return {"name": name, "sds_config": {"resource_api_version": "V3", "api_config_source": {
        "api_type": api_type, "transport_api_version": "V3", "grpc_services": [service]}}}


def sds_cluster(sock):
    # Connect timeouts generous for a loaded machine; they cost nothing when it is fast.
    return {"name": "sds-grpc", "type": "STATIC", "connect_timeout": "5s",
            "typed_extension_protocol_options": HTTP2,
            "load_assignment": {"cluster_name": "sds-grpc", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"pipe": {"path": str(sock)}}}}]}]}}


MESH_TLS_VERSIONS = {"tls_minimum_protocol_version": "TLSv1_2",
                     "tls_maximum_protocol_version": "TLSv1_3"}


def tls_context(sock, peer=None, validation="ROOTCA", client="envoy_grpc", api_type="GRPC"):
    """A CommonTlsContext: our certificate `default`, peers checked against the
    `validation` secret and, when given, their URI SAN equal to `peer`. TLS 1.2 to 1.3,
    as Istio sets for mesh mutual TLS (Envoy's client default stops at TLS 1.2)."""
    ctx = {"tls_certificate_sds_secret_configs": [sds("default", sock, client, api_type)],
           "tls_params": dict(MESH_TLS_VERSIONS)}
    matchers = [{"san_type": "URI", "matcher": {"exact": peer}}] if peer else []
    ctx["combined_validation_context"] = {
        "default_validation_context": {"match_typed_subject_alt_names": matchers},
        "validation_context_sds_secret_config": sds(validation, sock, client, api_type)}
    return ctx


def http_listener(name, port, route, transport_socket=None, access_log=None):
    """`access_log`: (path, format) of a file access log."""
    hcm = {"@type": HCM, "stat_prefix": name,
           "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]},
           "http_filters": [ROUTER]}
    if access_log:
        path, fmt = access_log
        hcm["access_log"] = [{"name": "envoy.access_loggers.file", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": str(path), "log_format": {"text_format_source": {"inline_string": fmt}}}}]
    chain = {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
    if transport_socket:
        chain["transport_socket"] = transport_socket
    return {"name": name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [chain]}


def downstream_tls(ctx, require_client_certificate=True):
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "require_client_certificate": require_client_certificate, "common_tls_context": ctx}}


def upstream_cluster(name, port, ctx, one_request_per_connection=False):
    cluster = {"name": name, "type": "STATIC", "connect_timeout": "10s",
               "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                   {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]},
               "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                   "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                   "common_tls_context": ctx}}}
    if one_request_per_connection:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "common_http_protocol_options": {"max_requests_per_connection": 1},
                "explicit_http_config": {"http_protocol_options": {}}}}
    return cluster


class Envoy:
    def __init__(self, tmp_path, name, listeners, clusters, bootstrap=None, admin=None):
        """A bootstrap built from `listeners` and `clusters`, or `bootstrap` as given
        (YAML text) with its admin port `admin`."""
        self.admin = admin or free_port()
        if bootstrap is None:
            self.path = tmp_path / f"{name}.json"
            self.path.write_text(json.dumps({
                "node": {"id": name, "cluster": name},
                "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": self.admin}}},
                "static_resources": {"listeners": listeners, "clusters": clusters}}))
        else:
            self.path = tmp_path / f"{name}.yaml"
            self.path.write_text(bootstrap)
        self.log_path = tmp_path / f"{name}.log"
        self.log = open(self.log_path, "w+")
        self.proc = subprocess.Popen([ENVOY, "-c", str(self.path), "--base-id", str(self.admin),
                                      "-l", "warning"], stdout=self.log, stderr=subprocess.STDOUT)

    def get(self, path):
        # Generous: a loaded machine can be slow to answer, and it costs nothing.
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}{path}", timeout=10) as r:
            return r.read().decode()

    def stats(self, pattern):
        text = self.get(f"/stats?filter={pattern}")
        return dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)

    def wait_ready(self, names=("default", "ROOTCA"), within=60):
        """Until every named secret has been taken (and the listeners warmed)."""
        deadline = time.time() + within
        seen = {}
        while time.time() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()
            try:
                seen = self.stats(r"^sds\.")
                if all(int(seen.get(f"sds.{n}.update_success", "0")) >= 1 for n in names) \
                        and self.get("/ready").strip() == "LIVE":
                    return seen
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"Envoy {self.path.name} not ready: {seen}\n{self.log_path.read_text()}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
