//! The stateful Kubernetes-shaped API server of `tests/src/kube.rs` as a process, for
//! tests in other languages: `test-apiserver <objects.json> <dir>` loads the objects
//! (a JSON array; each needs `kind`-less `metadata` and the plural under `"plural"`),
//! writes `<dir>/kubeconfig`, prints `ready` on stdout, and serves until stdin closes.
//! A JWKS given as `{"plural": "jwks", "jwks": {...}}` is served at
//! `/openid/v1/jwks`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;

use serde_json::Value;
use signet_e2e::kube::KubeApi;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(objects), Some(dir)) = (args.next(), args.next()) else {
        eprintln!("usage: test-apiserver <objects.json> <dir>");
        std::process::exit(64);
    };
    signet_e2e::install_tls_provider();
    let objects: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(&objects).unwrap()).unwrap();
    let api = KubeApi::start().await;
    for mut object in objects {
        let plural = object["plural"].as_str().unwrap().to_owned();
        if plural == "jwks" {
            api.set_jwks(&object["jwks"].to_string());
            continue;
        }
        object.as_object_mut().unwrap().remove("plural");
        api.put(&plural, object);
    }
    api.kubeconfig(std::path::Path::new(&dir));
    println!("ready");
    // Until the test closes our stdin.
    tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
    })
    .await
    .unwrap();
}
