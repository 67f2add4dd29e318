"""deploy/istio/signet-injection-values.yaml: signet-agent in an Istio sidecar pod, as far
as Istio's injection can be played here without istiod.

1. The `signet` template is executed by Helm's Go template engine (Helm's Go SDK, the
   same text/template and sprig functions Istio's injector runs) with Istio's
   injection context: `.Values` (istiod's values, from the same file) and `.MeshConfig`
   (a map with the Go field names of Istio's MeshConfig struct).
2. The result is merged, with the real kubectl's strategic merge patch (what Istio's
   injector applies between templates), onto a pod as Istio's `sidecar` template leaves
   it in non-native mode (the annotation the file asks for): istio-init and istio-proxy
   with Istio's volumes. Then Istio's own reordering for that mode (validation first,
   istio-init last).
3. The pod must validate against the Kubernetes schemas; signet-agent must be a native
   sidecar that starts before istio-proxy and shares the socket's emptyDir with it.
4. The container is run for real: signet-agent with the rendered arguments and
   environment (paths moved under a temporary root) against signet-ca, and the
   rendered startup probe's command must fail before the socket serves and pass after.
"""

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import helm_python
import kubernetes_validate
import pytest
import yaml

from conftest import ROOT, binary

VALUES = yaml.safe_load((ROOT / "deploy" / "istio" / "signet-injection-values.yaml").read_text())
SOCKET_DIR = "/var/run/secrets/workload-spiffe-uds"


def render_template(values, mesh_config, proxy_metadata=None, compliance_policy=""):
    """The `signet` template, executed as Istio's injector would (Helm's engine)."""
    with tempfile.TemporaryDirectory() as d:
        chart = Path(d) / "inject"
        (chart / "templates").mkdir(parents=True)
        (chart / "Chart.yaml").write_text("apiVersion: v2\nname: inject\nversion: 0.1.0\n")
        (chart / "templates" / "_signet.tpl").write_text(
            '{{- define "signet" -}}\n' + values["sidecarInjectorWebhook"]["templates"]["signet"]
            + "\n{{- end -}}\n")
        (chart / "templates" / "out.yaml").write_text(
            '{{ include "signet" (dict "Values" .Values.istio "MeshConfig" .Values.meshConfig'
            ' "ProxyConfig" .Values.proxyConfig "CompliancePolicy" .Values.compliancePolicy) }}\n')
        with helm_python.Chart.load(chart) as c:
            out = c.render({"istio": values, "meshConfig": mesh_config,
                            "proxyConfig": {"ProxyMetadata": proxy_metadata or {}},
                            "compliancePolicy": compliance_policy},
                           name="x", namespace="y")
    return yaml.safe_load(out["inject/templates/out.yaml"])


def sidecar_pod():
    """A pod as Istio's `sidecar` template leaves it without native sidecars: the
    iptables init container, istio-proxy as a regular container, Istio's volumes."""
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "namespace": "shop", "annotations": {
            "inject.istio.io/templates": "sidecar,signet", "sidecar.istio.io/nativeSidecar": "false"}},
        "spec": {
            "serviceAccountName": "web",
            "initContainers": [{"name": "istio-init", "image": "istio/proxyv2",
                                "args": ["istio-iptables", "-u", "1337"]}],
            "containers": [
                {"name": "app", "image": "app"},
                {"name": "istio-proxy", "image": "istio/proxyv2", "args": ["proxy", "sidecar"],
                 "securityContext": {"runAsUser": 1337, "runAsGroup": 1337},
                 "volumeMounts": [
                     {"name": "workload-socket", "mountPath": SOCKET_DIR},
                     {"name": "istiod-ca-cert", "mountPath": "/var/run/secrets/istio"},
                     {"name": "istio-token", "mountPath": "/var/run/secrets/tokens"}]}],
            "volumes": [
                {"name": "workload-socket", "emptyDir": {}},
                {"name": "istiod-ca-cert", "configMap": {"name": "istio-ca-root-cert"}},
                {"name": "istio-token", "projected": {"sources": [{"serviceAccountToken": {
                    "audience": "istio-ca", "expirationSeconds": 43200, "path": "istio-token"}}]}}],
        },
    }


def strategic_merge(pod, patch, workdir):
    """The real kubectl's strategic merge patch of `patch` onto `pod`, offline."""
    path = Path(workdir) / "pod.json"
    path.write_text(json.dumps(pod))
    out = subprocess.run(["kubectl", "patch", "--local", "-f", str(path), "--type=strategic",
                          "-p", json.dumps(patch), "-o", "json"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def istio_reorder_non_native(pod):
    """Istio's reorderPod (pkg/kube/inject/inject.go, as read in 2026) without native
    sidecars: istio-validation first, istio-init last, istio-proxy last of the
    containers. A copy: this test cannot notice when Istio changes it."""
    def move(items, name, first):
        found = [c for c in items if c["name"] == name]
        rest = [c for c in items if c["name"] != name]
        return found + rest if first else rest + found
    spec = pod["spec"]
    spec["initContainers"] = move(move(spec["initContainers"], "istio-validation", True), "istio-init", False)
    spec["containers"] = move(spec["containers"], "istio-proxy", False)
    return pod


def with_istio_defaults(values):
    """The values Istio's injector sees: its chart's defaults under the file's."""
    merged = {"revision": "", "global": {"caAddress": "", "istioNamespace": "istio-system",
                                          "multiCluster": {"clusterName": ""}}}
    merged.update({k: v for k, v in values.items() if k != "global"})
    merged["global"].update(values.get("global", {}))
    return merged


@pytest.fixture(scope="module")
def injected():
    rendered = render_template(with_istio_defaults(VALUES), {"TrustDomain": "cluster.local"},
                               {"SECRET_TTL": "12h", "ECC_SIGNATURE_ALGORITHM": "ECDSA", "CA_ADDR": "ignored:1"})
    with tempfile.TemporaryDirectory() as d:
        pod = strategic_merge(sidecar_pod(), rendered, d)
    return istio_reorder_non_native(pod)


def test_the_injected_pod_validates(injected):
    for version in ("1.33", "1.37"):
        kubernetes_validate.validate(injected, version, strict=True)


def test_signet_agent_starts_before_istio_proxy_and_shares_its_socket(injected):
    spec = injected["spec"]
    inits = [c["name"] for c in spec["initContainers"]]
    # Native sidecars and init containers start in order, each waiting for the one
    # before; regular containers (istio-proxy) start after all of them.
    assert inits == ["signet-agent", "istio-init"], inits
    assert "istio-proxy" in [c["name"] for c in spec["containers"]]
    agent = spec["initContainers"][0]
    assert agent["restartPolicy"] == "Always"
    assert "exec" in agent["startupProbe"]
    proxy = next(c for c in spec["containers"] if c["name"] == "istio-proxy")
    socket_mount = lambda c: next(m for m in c["volumeMounts"] if m["name"] == "workload-socket")  # noqa: E731
    assert socket_mount(agent)["mountPath"] == socket_mount(proxy)["mountPath"] == SOCKET_DIR
    [volume] = [v for v in spec["volumes"] if v["name"] == "workload-socket"]
    assert volume == {"name": "workload-socket", "emptyDir": {}}
    # istio-proxy's user, so the CA connection bypasses the pod's iptables capture.
    assert agent["securityContext"]["runAsUser"] == 1337
    env = {e["name"]: e.get("value") for e in agent["env"]}
    assert env["CA_ADDR"] == "signet-ca.signet-system.svc:15012"
    assert env["TRUST_DOMAIN"] == "cluster.local" and env["ISTIO_META_CLUSTER_ID"] == "Kubernetes"
    # The mesh's proxyMetadata, as istio-proxy gets it; the template's own names win.
    assert env["SECRET_TTL"] == "12h" and env["ECC_SIGNATURE_ALGORITHM"] == "ECDSA"
    assert [e["name"] for e in agent["env"]].count("CA_ADDR") == 1


def test_without_a_ca_address_the_revisions_istiod_is_used():
    values = json.loads(json.dumps(VALUES))
    values["global"] = {"caAddress": "", "istioNamespace": "istio-system",
                        "multiCluster": {"clusterName": "east"}}
    values["revision"] = "canary"
    agent = render_template(values, {"TrustDomain": "td.example"})["spec"]["initContainers"][0]
    env = {e["name"]: e.get("value") for e in agent["env"]}
    assert env["CA_ADDR"] == "istiod-canary.istio-system.svc:15012"
    assert env["TRUST_DOMAIN"] == "td.example" and env["ISTIO_META_CLUSTER_ID"] == "east"
    values["revision"] = ""
    agent = render_template(values, {})["spec"]["initContainers"][0]
    assert {e["name"]: e.get("value") for e in agent["env"]}["CA_ADDR"] == "istiod.istio-system.svc:15012"


def test_istiods_compliance_policy_reaches_the_agent():
    """Istio's injector hands istiod's COMPLIANCE_POLICY to the template
    (`.CompliancePolicy`); it wins over a proxyMetadata entry of the same name, and
    without it proxyMetadata's reaches the agent."""
    def env(**kw):
        agent = render_template(VALUES, {}, **kw)["spec"]["initContainers"][0]
        names = [e["name"] for e in agent["env"]]
        assert names.count("COMPLIANCE_POLICY") <= 1, names
        return {e["name"]: e.get("value") for e in agent["env"]}
    assert "COMPLIANCE_POLICY" not in env()
    assert env(compliance_policy="pqc")["COMPLIANCE_POLICY"] == "pqc"
    assert env(compliance_policy="pqc",
               proxy_metadata={"COMPLIANCE_POLICY": "fips-140-3"})["COMPLIANCE_POLICY"] == "pqc"
    assert env(proxy_metadata={"COMPLIANCE_POLICY": "fips-140-3"})["COMPLIANCE_POLICY"] == "fips-140-3"


def test_the_rendered_container_runs_and_its_startup_probe_waits_for_the_socket(injected, ca, cluster):
    """The container's own arguments, environment and probe, with the pod's paths under
    a temporary root and the CA's address pointed at a local signet-ca."""
    agent = injected["spec"]["initContainers"][0]
    with tempfile.TemporaryDirectory(prefix="inj", dir="/tmp") as d:
        d = Path(d)

        def local(arg):
            return arg.replace("/var/run/secrets", str(d))
        (d / "tokens").mkdir()
        (d / "tokens" / "istio-token").write_text(cluster.token(ns="shop", sa="web"))
        (d / "istio").mkdir()
        (d / "istio" / "root-cert.pem").write_bytes(ca.root_pem)
        (d / "workload-spiffe-uds").mkdir()
        probe = [binary("signet-agent"), *map(local, agent["startupProbe"]["exec"]["command"][1:])]
        assert subprocess.run(probe, capture_output=True, timeout=30).returncode != 0, \
            "the probe passed with no socket"
        env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
        env.update({e["name"]: e["value"] for e in agent["env"] if "value" in e})
        assert env["SECRET_TTL"] == "12h"  # proxyMetadata reaches the running agent
        assert env["SIGNET_HTTP_ADDR"] == "127.0.0.1:15029"  # run and inspect read it
        env["SIGNET_HTTP_ADDR"] = "127.0.0.1:0"
        env.update({"CA_ADDR": f"localhost:{ca.grpc_port}", "POD_NAMESPACE": "shop", "SERVICE_ACCOUNT": "web"})
        args = [local(a) for a in agent["args"]]
        log = open(d / "agent.log", "w+")
        proc = subprocess.Popen([binary("signet-agent"), *args], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 60
            while True:
                r = subprocess.run(probe, capture_output=True, text=True, timeout=30)
                if r.returncode == 0:
                    break
                assert proc.poll() is None, (d / "agent.log").read_text()
                assert time.time() < deadline, r.stderr + (d / "agent.log").read_text()
                time.sleep(0.2)
            assert "spiffe://cluster.local/ns/shop/sa/web" in r.stdout
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            log.close()
