"""The OCI image layouts scripts/build-images.sh writes (target/images), read as a
registry or a container runtime would: index -> manifest -> config and layers. Each
image: its static binary, runnable with nothing else; the CA certificates; entrypoint
and command; a numeric non-root user; the OCI labels; the agent image without the CA.

CI builds the images before the Python tests (scripts/test.sh); elsewhere these tests
are skipped until `scripts/build-images.sh` has run."""

import hashlib
import io
import json
import os
import platform
import subprocess
import tarfile
import tomllib

import pytest

from conftest import ROOT

IMAGES = ROOT / "target" / "images"
VERSION = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["package"]["version"]
LABELS = ("org.opencontainers.image.source", "org.opencontainers.image.revision",
          "org.opencontainers.image.version")

pytestmark = pytest.mark.skipif(
    not (IMAGES / "signet-ca" / "index.json").exists() and os.environ.get("CI") != "true",
    reason="no image layouts yet: run scripts/build-images.sh")


def blob(layout, digest):
    """A blob, checked against its digest."""
    algorithm, hex_digest = digest.split(":")
    data = (layout / "blobs" / algorithm / hex_digest).read_bytes()
    assert hashlib.sha256(data).hexdigest() == hex_digest, digest
    return data


def image(name):
    """(config, {path: (mode, bytes or None)}) of the image tagged with the version."""
    layout = IMAGES / name
    index = json.loads((layout / "index.json").read_text())
    [entry] = [m for m in index["manifests"]
               if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == VERSION]
    manifest = json.loads(blob(layout, entry["digest"]))
    assert entry["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["schemaVersion"] == 2
    config = json.loads(blob(layout, manifest["config"]["digest"]))
    files = {}
    for layer in manifest["layers"]:
        with tarfile.open(fileobj=io.BytesIO(blob(layout, layer["digest"]))) as tar:
            for member in tar.getmembers():
                data = tar.extractfile(member).read() if member.isfile() else None
                files[member.name.lstrip("./")] = (member.mode, data)
    return config, files


def interpreter(elf):
    """The ELF's program interpreter (PT_INTERP), or None for a static binary."""
    assert elf[:4] == b"\x7fELF" and elf[4] == 2, "not a 64-bit ELF"
    phoff = int.from_bytes(elf[32:40], "little")
    phentsize, phnum = int.from_bytes(elf[54:56], "little"), int.from_bytes(elf[56:58], "little")
    for i in range(phnum):
        h = elf[phoff + i * phentsize: phoff + (i + 1) * phentsize]
        if int.from_bytes(h[0:4], "little") == 3:  # PT_INTERP
            offset, size = int.from_bytes(h[8:16], "little"), int.from_bytes(h[32:40], "little")
            return elf[offset:offset + size].rstrip(b"\0").decode()
    return None


@pytest.mark.parametrize("name, command", [("signet-ca", ["serve"]), ("signet-agent", ["run"])])
def test_image(name, command, tmp_path):
    config, files = image(name)
    goarch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    assert config["os"] == "linux" and config["architecture"] == goarch
    c = config["config"]
    assert c["Entrypoint"] == [f"/usr/local/bin/{name}"] and c["Cmd"] == command
    user, _, group = c["User"].partition(":")
    assert user.isdigit() and int(user) != 0 and group.isdigit(), c["User"]
    labels = c["Labels"]
    for label in LABELS:
        assert labels.get(label), (label, labels)
    # The source is SIGNET_IMAGE_SOURCE or the clone's origin (CI's is a clone).
    expected_source = os.environ.get("SIGNET_IMAGE_SOURCE") or subprocess.run(
        ["git", "-C", str(ROOT), "config", "--get", "remote.origin.url"],
        capture_output=True, text=True).stdout.strip() or "unknown"
    assert labels["org.opencontainers.image.source"] == expected_source
    assert labels["org.opencontainers.image.version"] == VERSION
    assert len(labels["org.opencontainers.image.revision"]) == 40
    # Nothing but the binary and the CA certificates (no shell, no libc to load).
    regular = {p for p, (_, data) in files.items() if data is not None}
    assert regular == {f"usr/local/bin/{name}", "etc/ssl/certs/ca-certificates.crt"}, regular
    mode, binary = files[f"usr/local/bin/{name}"]
    assert mode & 0o111 and interpreter(binary) is None, "not a static executable"
    assert b"BEGIN CERTIFICATE" in files["etc/ssl/certs/ca-certificates.crt"][1]
    # Runnable as it is, from an empty directory and environment.
    exe = tmp_path / name
    exe.write_bytes(binary)
    exe.chmod(0o755)
    r = subprocess.run([str(exe), "--version"], capture_output=True, text=True, env={}, cwd=tmp_path)
    assert r.returncode == 0 and VERSION in r.stdout, r


def test_the_ca_image_exposes_its_ports_and_the_agent_image_has_no_ca():
    config, _ = image("signet-ca")
    assert set(config["config"]["ExposedPorts"]) == {"15012/tcp", "15014/tcp"}
    _, agent_files = image("signet-agent")
    assert not [p for p in agent_files if "signet-ca" in p]


@pytest.mark.parametrize("name", ["signet-ca", "signet-agent"])
def test_skopeo_reads_and_copies_each_image(name, tmp_path):
    """skopeo (containers/image, what podman and CRI-O use) as an independent reader:
    it inspects the layout and copies it, checking every digest, as a push would."""
    ref = f"oci:{IMAGES / name}:{VERSION}"
    r = subprocess.run(["skopeo", "inspect", ref], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    assert seen["Os"] == "linux" and seen["Labels"]["org.opencontainers.image.version"] == VERSION
    r = subprocess.run(["skopeo", "copy", ref, f"oci-archive:{tmp_path / name}.tar"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
