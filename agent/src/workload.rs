//! The SPIFFE Workload API (`SpiffeWorkloadAPI`, the SPIFFE standard's service) on a
//! Unix socket of its own, for workloads without Envoy: go-spiffe, java-spiffe,
//! py-spiffe and rust-spiffe clients get the pod's X.509-SVID, its key and the trust
//! bundles, and a new message on every rotation or bundle change.
//!
//! What the standard requires of every call is checked first: the
//! `workload.spiffe.io: true` metadata (else `INVALID_ARGUMENT`). The agent holds one
//! identity, its pod's, so every caller that can open the socket (mode 0660, like the
//! SDS socket) gets it; there is no per-caller attestation. JWT-SVIDs are minted by
//! signet-ca (`crate::jwt`); against a CA that does not mint them, FetchJWTSVID and
//! ValidateJWTSVID answer `UNIMPLEMENTED` and FetchJWTBundles sends an empty set and
//! stays open (bundle sources that also watch JWT bundles still start).

use std::{collections::BTreeMap, pin::Pin, sync::Arc};

use futures::Stream;
use sha2::{Digest, Sha256};
use signet_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svid, X509svidRequest,
    X509svidResponse,
    spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer},
};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::{
    identity::svid::Svid,
    jwt::{Bundle, JwtSvids},
    secrets::store::SecretStore,
};

/// The metadata every Workload API call must carry (the standard's guard against
/// server-side request forgery through a proxy).
const SECURITY_HEADER: &str = "workload.spiffe.io";

/// The largest request taken: a Workload API request is empty, audiences (signet-ca
/// takes 16 of 256 bytes) or a token to validate, so a client cannot make the agent
/// buffer tonic's 4 MiB default per stream before the header check runs.
const MAX_REQUEST_BYTES: usize = 16 * 1024;

/// The Workload API service over the agent's secrets.
#[derive(Debug, Clone)]
pub struct WorkloadApi {
    store: Arc<SecretStore>,
    jwt: Arc<JwtSvids>,
    stop: watch::Receiver<bool>,
}

impl WorkloadApi {
    /// Serves `store`'s identity and bundles, and JWT-SVIDs from `jwt`; open streams
    /// end when `stop` turns true.
    pub fn new(store: Arc<SecretStore>, jwt: Arc<JwtSvids>, stop: watch::Receiver<bool>) -> Self {
        Self { store, jwt, stop }
    }

    /// The tonic service.
    pub fn into_service(self) -> SpiffeWorkloadApiServer<Self> {
        SpiffeWorkloadApiServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    /// A stream that sends `build(svid, federated)` now (once there is an identity)
    /// and again whenever the secrets change and the message differs from the last.
    /// No task and no queue per stream: tonic polls it when the client can take a
    /// message, so a client that stops reading holds nothing but the stream itself,
    /// and a message is built from what is current when it is sent.
    fn watch<T>(&self, build: fn(&Svid, &BTreeMap<String, String>) -> Result<T, Status>) -> Watch<T>
    where
        T: prost::Message + Send + 'static,
    {
        let state = Watching {
            store: self.store.clone(),
            changes: self.store.changes(),
            stop: self.stop.clone(),
            last: None,
            first: true,
            done: false,
            build,
        };
        Box::pin(futures::stream::unfold(state, |mut st| async move {
            if st.done {
                return None;
            }
            loop {
                if !st.first {
                    tokio::select! {
                        changed = st.changes.changed() => if changed.is_err() { return None },
                        _ = st.stop.wait_for(|s| *s) => return None,
                    }
                }
                st.first = false;
                st.changes.borrow_and_update();
                let Some((svid, federated)) = st.store.x509_context() else {
                    continue;
                };
                match (st.build)(&svid, &federated) {
                    Ok(message) => {
                        // A digest of the last message sent, not the message: it
                        // holds the key. Unchanged (a rotation, on the bundles-only
                        // stream): nothing to send.
                        let digest: [u8; 32] = Sha256::digest(message.encode_to_vec()).into();
                        if st.last != Some(digest) {
                            st.last = Some(digest);
                            return Some((Ok(message), st));
                        }
                    }
                    Err(status) => {
                        st.done = true;
                        return Some((Err(status), st));
                    }
                }
            }
        }))
    }
}

/// One watch stream's state.
struct Watching<T> {
    store: Arc<SecretStore>,
    changes: watch::Receiver<u64>,
    stop: watch::Receiver<bool>,
    last: Option<[u8; 32]>,
    first: bool,
    done: bool,
    build: fn(&Svid, &BTreeMap<String, String>) -> Result<T, Status>,
}

/// `INVALID_ARGUMENT` unless the call carries `workload.spiffe.io: true`.
fn check_header<T>(request: &Request<T>) -> Result<(), Status> {
    match request.metadata().get(SECURITY_HEADER) {
        Some(v) if v == "true" => Ok(()),
        _ => Err(Status::invalid_argument(
            "security header missing from request: the SPIFFE Workload API requires the metadata `workload.spiffe.io: true`",
        )),
    }
}

/// DER certificates of a PEM bundle, concatenated (the standard's encoding of
/// `x509_svid` and of bundles).
fn certificates_der(pem_text: &str) -> Result<Vec<u8>, Status> {
    let blocks = pem::parse_many(pem_text)
        .map_err(|e| Status::internal(format!("held certificates do not parse: {e}")))?;
    Ok(blocks
        .iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .flat_map(|b| b.contents().iter().copied())
        .collect())
}

/// Trust domain name -> `spiffe://<trust domain>`, the standard's bundle keys.
fn bundle_key(trust_domain: &str) -> String {
    format!("spiffe://{trust_domain}")
}

fn x509_svid_response(
    svid: &Svid,
    federated: &BTreeMap<String, String>,
) -> Result<X509svidResponse, Status> {
    let key = pem::parse(&svid.key_pem)
        .map_err(|_| Status::internal("the held private key does not parse"))?;
    let own = svid.id.trust_domain_name();
    let mut federated_bundles = BTreeMap::new();
    for (td, pem_text) in federated.iter().filter(|(td, _)| td.as_str() != own) {
        federated_bundles.insert(bundle_key(td), certificates_der(pem_text)?);
    }
    Ok(X509svidResponse {
        svids: vec![X509svid {
            spiffe_id: svid.id.to_string(),
            x509_svid: certificates_der(&svid.chain_pem)?,
            x509_svid_key: key.into_contents(),
            bundle: certificates_der(&svid.roots_pem)?,
            hint: String::new(),
        }],
        crl: Vec::new(),
        federated_bundles,
    })
}

fn x509_bundles_response(
    svid: &Svid,
    federated: &BTreeMap<String, String>,
) -> Result<X509BundlesResponse, Status> {
    let mut bundles = BTreeMap::new();
    for (td, pem_text) in federated {
        bundles.insert(bundle_key(td), certificates_der(pem_text)?);
    }
    bundles.insert(
        bundle_key(svid.id.trust_domain_name()),
        certificates_der(&svid.roots_pem)?,
    );
    Ok(X509BundlesResponse {
        crl: Vec::new(),
        bundles,
    })
}

fn jwt_bundles_response(bundle: &Bundle) -> Option<JwtBundlesResponse> {
    match bundle {
        Bundle::Unknown => None,
        Bundle::NotServed => Some(JwtBundlesResponse::default()),
        Bundle::Keys(keys) => Some(JwtBundlesResponse {
            bundles: BTreeMap::from([(bundle_key(&keys.trust_domain), keys.jwks.clone())]),
        }),
    }
}

type Watch<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = Watch<X509svidResponse>;
    type FetchX509BundlesStream = Watch<X509BundlesResponse>;
    type FetchJWTBundlesStream = Watch<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        check_header(&request)?;
        Ok(Response::new(self.watch(x509_svid_response)))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        check_header(&request)?;
        Ok(Response::new(self.watch(x509_bundles_response)))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        check_header(&request)?;
        let body = request.into_inner();
        let (spiffe_id, svid) = self.jwt.fetch(&body.audience, &body.spiffe_id).await?;
        Ok(Response::new(JwtsvidResponse {
            svids: vec![signet_proto::workload::Jwtsvid {
                spiffe_id,
                svid,
                hint: String::new(),
            }],
        }))
    }

    /// The CA's key set now (once fetched) and on every change; an empty set, kept
    /// open, from a CA that mints no JWT-SVIDs.
    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        check_header(&request)?;
        let state = (self.jwt.bundle(), self.stop.clone(), true);
        Ok(Response::new(Box::pin(futures::stream::unfold(
            state,
            |(mut bundle, mut stop, mut first)| async move {
                loop {
                    if !first {
                        tokio::select! {
                            changed = bundle.changed() => if changed.is_err() { return None },
                            _ = stop.wait_for(|s| *s) => return None,
                        }
                    }
                    first = false;
                    let message = jwt_bundles_response(&bundle.borrow_and_update());
                    if let Some(message) = message {
                        return Some((Ok(message), (bundle, stop, first)));
                    }
                }
            },
        ))))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        check_header(&request)?;
        let body = request.into_inner();
        let (spiffe_id, claims) = self.jwt.validate(&body.svid, &body.audience)?;
        Ok(Response::new(ValidateJwtsvidResponse {
            spiffe_id,
            claims: Some(crate::jwt::claims_struct(claims)),
        }))
    }
}
