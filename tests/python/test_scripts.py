"""The operator scripts: make-multicluster-pki.sh (signet-ca pki) and
render-cacerts-secret.sh, whose Secret YAML comes from the real kubectl and is checked
here with PyYAML; the sets pass openssl verify against the shared root."""

import base64
import subprocess
import tempfile
from pathlib import Path

import yaml

from conftest import ROOT, binary

SCRIPTS = ROOT / "scripts"


def run(*args, **kw):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)


def test_two_clusters_one_root_and_their_secrets():
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "pki"
        env = {"SIGNET_CA": binary("signet-ca"), "PATH": "/usr/bin:/bin:/usr/local/bin"}
        r = run(SCRIPTS / "make-multicluster-pki.sh", "--key-type", "ec-p256", out, "east", "west", env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        for cluster in ("east", "west"):
            v = run("openssl", "verify", "-CAfile", out / "root" / "root-cert.pem", out / cluster / "ca-cert.pem")
            assert v.returncode == 0, v.stdout + v.stderr
        # Rerunning reuses the root and refuses to overwrite existing keys.
        r = run(SCRIPTS / "make-multicluster-pki.sh", "--key-type", "ec-p256", out, "east", env=env)
        assert r.returncode != 0 and "--force" in r.stderr, r.stdout + r.stderr
        assert "reusing the root" in r.stdout

        r = run(SCRIPTS / "render-cacerts-secret.sh", out / "east")
        assert r.returncode == 0, r.stderr
        doc = yaml.safe_load(r.stdout)
        assert doc["apiVersion"] == "v1" and doc["kind"] == "Secret"
        assert doc["metadata"]["name"] == "cacerts"
        # The chart's namespace in the docs, where signet-ca mounts it from.
        assert doc["metadata"]["namespace"] == "signet-system"
        assert set(doc["data"]) == {"ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"}
        for key, value in doc["data"].items():
            assert base64.b64decode(value) == (out / "east" / key).read_bytes(), key

        r = run(SCRIPTS / "render-cacerts-secret.sh", out / "west", "--namespace", "mesh-ca")
        assert yaml.safe_load(r.stdout)["metadata"]["namespace"] == "mesh-ca"
        (out / "west" / "cert-chain.pem").unlink()
        r = run(SCRIPTS / "render-cacerts-secret.sh", out / "west")
        assert r.returncode != 0 and "cert-chain.pem" in r.stderr
