"""The demo's stand-in for a Kubernetes cluster: an RSA signing key, its JWKS (what
the API server publishes at /openid/v1/jwks) and a service account tokens for
demo/web and demo/api, as the kubelet would mount them (PyJWT, cryptography).

usage: demo_token.py DIR    writes DIR/jwks.json, DIR/token (web) and DIR/token-api
"""

import base64
import json
import sys
import time
from pathlib import Path

ISSUER = "https://kubernetes.default.svc.cluster.local"


def b64(n):
    return base64.urlsafe_b64encode(n.to_bytes((n.bit_length() + 7) // 8, "big")).rstrip(b"=").decode()


def init(d):
    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pub = key.public_key().public_numbers()
    (d / "jwks.json").write_text(json.dumps({"keys": [
        {"kty": "RSA", "alg": "RS256", "kid": "demo", "n": b64(pub.n), "e": b64(pub.e)}]}))
    now = int(time.time())
    for sa, name in (("web", "token"), ("api", "token-api")):
        token = jwt.encode({"iss": ISSUER, "aud": ["istio-ca"], "sub": f"system:serviceaccount:demo:{sa}",
                            "iat": now, "nbf": now, "exp": now + 3600,
                            "kubernetes.io": {"namespace": "demo", "serviceaccount": {"name": sa}}},
                           key, algorithm="RS256", headers={"kid": "demo"})
        (d / name).write_text(token)


if __name__ == "__main__":
    init(Path(sys.argv[1]))
