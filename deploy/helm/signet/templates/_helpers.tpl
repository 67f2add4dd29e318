{{/* Chart name (app.kubernetes.io/name). */}}
{{- define "signet.name" -}}
{{- .Values.nameOverride | default "signet-ca" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Object names: <release>-ca, or the release name when it already ends in -ca. */}}
{{- define "signet.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if hasSuffix "-ca" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-ca" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Cluster-scoped objects are shared by every namespace: qualify their names. */}}
{{- define "signet.clusterName" -}}
{{- printf "%s-%s" .Release.Namespace (include "signet.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "signet.serviceAccountName" -}}
{{- .Values.serviceAccount.name | default (include "signet.fullname" .) -}}
{{- end -}}

{{- define "signet.leaseName" -}}
{{- .Values.leaderElection.leaseName | default (printf "%s-writer" (include "signet.fullname" .)) -}}
{{- end -}}

{{- define "signet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "signet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "signet.labels" -}}
{{ include "signet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: certificate-authority
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 }}
{{- end -}}

{{/* The image: [<registry>/]<repository>, then @<digest> when a digest pins it,
     else :<tag> (the chart's appVersion by default). */}}
{{- define "signet.image" -}}
{{- $repo := .Values.image.repository -}}
{{- with .Values.image.registry }}{{ $repo = printf "%s/%s" (trimSuffix "/" .) $repo }}{{ end -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" $repo .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{/* Where a remote cluster's kubeconfig or JWKS is mounted. */}}
{{- define "signet.remoteDir" -}}
{{- printf "/etc/signet/remote/%s" . -}}
{{- end -}}

{{/* The Secret holding the JWT key set, read and written by every replica (jwtSvids). */}}
{{- define "signet.jwtKeysSecretName" -}}
{{- .Values.jwtSvids.keysSecretName | default (printf "%s-jwt-keys" (include "signet.fullname" .)) -}}
{{- end -}}

{{/* The Service of the OIDC discovery listener (a DNS label: 63 characters at most). */}}
{{- define "signet.oidcServiceName" -}}
{{- printf "%s-oidc" (include "signet.fullname" . | trunc 58 | trimSuffix "-") -}}
{{- end -}}

{{/* Where oidc.tlsSecretName (tls.crt, tls.key) is mounted. */}}
{{- define "signet.oidcTlsDir" -}}
/etc/signet/oidc-tls
{{- end -}}

{{/* The host of oidc.issuer when it goes into the CA's own serving certificate: oidc.enabled
     without oidc.tlsSecretName, and a DNS name (an IP address cannot be a DNS SAN); else "". */}}
{{- define "signet.oidcIssuerHost" -}}
{{- if and .Values.oidc.enabled (not .Values.oidc.tlsSecretName) .Values.oidc.issuer -}}
{{- $host := lower (urlParse (toString .Values.oidc.issuer)).hostname -}}
{{- if and $host (not (contains ":" $host)) (not (regexMatch "^[0-9.]+$" $host)) -}}
{{- $host -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Whether the next CA set's Secret is mounted (--next-cacerts-dir): "true" or "". A
     self-signed CA renews its root in its state directory instead. */}}
{{- define "signet.nextCacerts" -}}
{{- if and .Values.rotation.enabled (not .Values.cacerts.selfSigned) -}}
true
{{- end -}}
{{- end -}}

{{/* Whether any writer (and so leader election) is on: "true" or "". */}}
{{- define "signet.writes" -}}
{{- if or .Values.rootConfigMap.enabled .Values.clusterTrustBundle.enabled .Values.istiodCert.enabled .Values.podCertificates.enabled -}}
true
{{- end -}}
{{- end -}}

{{/* Refuses combinations that cannot work, with a message saying what to do. */}}
{{- define "signet.validate" -}}
{{- if and .Values.cacerts.selfSigned (gt (int .Values.replicaCount) 1) -}}
{{- fail (printf "cacerts.selfSigned=true with replicaCount=%d: each replica would create its own self-signed root and workloads signed by different replicas would not trust each other. Create the cacerts Secret (docs/kubernetes.md) or set replicaCount=1." (int .Values.replicaCount)) -}}
{{- end -}}
{{- if and (not .Values.cacerts.selfSigned) (not .Values.cacerts.secretName) -}}
{{- fail "cacerts.secretName is empty: name the Secret holding the CA key material, or set cacerts.selfSigned=true (replicaCount=1 only)" -}}
{{- end -}}
{{- if include "signet.nextCacerts" . -}}
{{- if not .Values.rotation.nextSecretName -}}
{{- fail "rotation.nextSecretName is empty: name the Secret that will hold the next CA key material (it need not exist yet), or set rotation.enabled=false" -}}
{{- end -}}
{{- if eq .Values.rotation.nextSecretName .Values.cacerts.secretName -}}
{{- fail (printf "rotation.nextSecretName=%q is cacerts.secretName: the next set must be a Secret of its own (docs/root-rotation.md); the default is cacerts-next" .Values.rotation.nextSecretName) -}}
{{- end -}}
{{- end -}}
{{- if not (has .Values.tokenAuth.mode (list "tokenReview" "jwks")) -}}
{{- fail (printf "tokenAuth.mode=%q: want tokenReview or jwks" .Values.tokenAuth.mode) -}}
{{- end -}}
{{- range .Values.ambient.trustedNodeAccounts -}}
{{- if not (regexMatch "^[^/,[:space:]]+/[^/,[:space:]]+$" (toString .)) -}}
{{- fail (printf "ambient.trustedNodeAccounts: %q: want <namespace>/<service account>, e.g. istio-system/ztunnel" (toString .)) -}}
{{- end -}}
{{- end -}}
{{- /* Signer names as kube-apiserver checks them (and signet-ca at start). */ -}}
{{- $label := "[a-z0-9]([-a-z0-9]*[a-z0-9])?" -}}
{{- $signerRe := printf "^%s(\\.%s)+/%s(\\.%s)*$" $label $label $label $label -}}
{{- $signers := dict -}}
{{- if .Values.clusterTrustBundle.enabled -}}
{{- $_ := set $signers "clusterTrustBundle.signerName" (toString .Values.clusterTrustBundle.signerName) -}}
{{- end -}}
{{- if .Values.podCertificates.enabled -}}
{{- $_ := set $signers "podCertificates.signerName" (toString .Values.podCertificates.signerName) -}}
{{- end -}}
{{- range $value, $signer := $signers -}}
{{- if not (regexMatch $signerRe $signer) -}}
{{- fail (printf "%s=%q: want <domain>/<path> (lowercase DNS labels, one '/'), on a domain you own, e.g. signet.example.com/spiffe" $value $signer) -}}
{{- end -}}
{{- $domain := first (splitList "/" $signer) -}}
{{- if or (eq $domain "kubernetes.io") (hasSuffix ".kubernetes.io" $domain) -}}
{{- fail (printf "%s=%q: signer names under kubernetes.io are reserved" $value $signer) -}}
{{- end -}}
{{- end -}}
{{- /* Features newer than the chart's floor (Kubernetes 1.31): refused on older
     clusters with the feature named, instead of the whole chart refusing. */ -}}
{{- $kube := .Capabilities.KubeVersion.Version -}}
{{- if and .Values.clusterTrustBundle.enabled (semverCompare "<1.33.0-0" $kube) -}}
{{- fail (printf "clusterTrustBundle.enabled needs Kubernetes 1.33 or newer (certificates.k8s.io/v1beta1 ClusterTrustBundle); this cluster is %s. The other modes work on 1.31." $kube) -}}
{{- end -}}
{{- if and .Values.podCertificates.enabled (semverCompare "<1.36.0-0" $kube) -}}
{{- fail (printf "podCertificates.enabled needs Kubernetes 1.36 or newer (PodCertificateRequest; 1.36 with its feature gates, 1.37 by default); this cluster is %s. The other modes work on 1.31." $kube) -}}
{{- end -}}
{{- $ids := dict -}}
{{- range .Values.multiCluster.remoteClusters -}}
{{- if hasKey $ids .id -}}
{{- fail (printf "multiCluster.remoteClusters: %q appears twice" .id) -}}
{{- end -}}
{{- $_ := set $ids .id true -}}
{{- if or (eq .id $.Values.clusterId) (has .id $.Values.multiCluster.clusterAliases) -}}
{{- fail (printf "multiCluster.remoteClusters: %q is this cluster (clusterId or an alias)" .id) -}}
{{- end -}}
{{- if not (or .kubeconfigSecret .jwks) -}}
{{- fail (printf "multiCluster.remoteClusters: %q needs kubeconfigSecret (TokenReview through its API server) or jwks (offline)" .id) -}}
{{- end -}}
{{- with .jwks -}}
{{- if ne (len (compact (list (.url | default "") (.configMap | default "")))) 1 -}}
{{- fail "multiCluster.remoteClusters[].jwks: give exactly one of url and configMap" -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if .Values.oidc.enabled -}}
{{- if not .Values.jwtSvids.enabled -}}
{{- fail "oidc.enabled needs jwtSvids.enabled: OIDC discovery publishes the keys that sign JWT-SVIDs" -}}
{{- end -}}
{{- if not .Values.oidc.issuer -}}
{{- fail "oidc.enabled needs oidc.issuer: the https URL relying parties are given, and the `iss` of JWT-SVIDs, e.g. https://oidc.example.com" -}}
{{- end -}}
{{- if has (int .Values.oidc.port) (list 15012 15014) -}}
{{- fail (printf "oidc.port=%d is taken: 15012 is the CA's gRPC port and 15014 its metrics port; the default is 8443" (int .Values.oidc.port)) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.jwtSvids.enabled .Values.oidc.issuer -}}
{{- $issuer := toString .Values.oidc.issuer -}}
{{- if or (not (regexMatch "^https://[^/?#[:space:]][^?#[:space:]]*$" $issuer)) (hasSuffix "/" $issuer) -}}
{{- fail (printf "oidc.issuer=%q: want an https URL without a trailing slash, query or fragment (relying parties compare it byte for byte), e.g. https://oidc.example.com" $issuer) -}}
{{- end -}}
{{- end -}}
{{- range $list := list "allow" "deny" -}}
{{- range (get $.Values.podCertificates $list) -}}
{{- if not (regexMatch "^[^/,[:space:]]+(/[^/,[:space:]]+)?$" (toString .)) -}}
{{- fail (printf "podCertificates.%s: %q: want <namespace> or <namespace>/<service account>" $list (toString .)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The arguments of `signet-ca serve`, one per line as YAML list items. */}}
{{- define "signet.args" -}}
{{- $fullname := include "signet.fullname" . -}}
{{- $ns := .Release.Namespace -}}
{{- $dns := concat (list (printf "%s.%s.svc" $fullname $ns) (printf "%s.%s.svc.cluster.local" $fullname $ns)) .Values.extraServingDnsNames -}}
{{- /* OIDC without its own certificate is served with the CA's: it must name the issuer's host. */ -}}
{{- with include "signet.oidcIssuerHost" . -}}
{{- if not (has . $dns) -}}
{{- $dns = append $dns . -}}
{{- end -}}
{{- end -}}
- serve
- --cacerts-dir=/etc/cacerts
{{- if not .Values.cacerts.selfSigned }}
- --require-cacerts
{{- end }}
{{- if .Values.rotation.enabled }}
{{- if include "signet.nextCacerts" . }}
- --next-cacerts-dir=/etc/cacerts-next
{{- end }}
- {{ printf "--rotation-window=%v" (.Values.rotation.window) | quote }}
{{- end }}
- --state-dir=/var/lib/signet-ca
- {{ printf "--grpc-addr=%s:15012" .Values.listenAddress | quote }}
- {{ printf "--http-addr=%s:15014" .Values.listenAddress | quote }}
- {{ printf "--trust-domain=%v" (.Values.trustDomain) | quote }}
- {{ printf "--cluster-id=%v" (.Values.clusterId) | quote }}
- {{ printf "--token-audiences=%v" (join "," .Values.tokenAuth.audiences) | quote }}
- {{ printf "--serving-dns-names=%v" (join "," $dns) | quote }}
- {{ printf "--default-ttl=%v" (.Values.defaultTtl) | quote }}
- {{ printf "--max-ttl=%v" (.Values.maxTtl) | quote }}
- {{ printf "--max-connections-per-peer=%d" (int64 .Values.connections.maxPerPeer) | quote }}
{{- range .Values.connections.peerShares }}
- {{ printf "--peer-connection-share=%v" . | quote }}
{{- end }}
{{- if eq .Values.tokenAuth.mode "jwks" }}
- {{ printf "--jwt-issuer=%v" (.Values.tokenAuth.jwks.issuer) | quote }}
- {{ printf "--jwks=%v" (.Values.tokenAuth.jwks.url) | quote }}
- --no-token-review
{{- end }}
{{- if .Values.ambient.trustedNodeAccounts }}
- {{ printf "--trusted-node-accounts=%v" (join "," .Values.ambient.trustedNodeAccounts) | quote }}
{{- end }}
{{- if .Values.rootConfigMap.enabled }}
- {{ printf "--root-configmap=%v" (.Values.rootConfigMap.name) | quote }}
{{- if .Values.rootConfigMap.namespaceSelector }}
- {{ printf "--root-configmap-namespace-selector=%v" (.Values.rootConfigMap.namespaceSelector) | quote }}
{{- end }}
{{- end }}
{{- if .Values.clusterTrustBundle.enabled }}
- {{ printf "--cluster-trust-bundle-signer=%v" (.Values.clusterTrustBundle.signerName) | quote }}
{{- end }}
{{- if .Values.podCertificates.enabled }}
- {{ printf "--pod-certificate-signer=%v" (.Values.podCertificates.signerName) | quote }}
{{- range .Values.podCertificates.allow }}
- {{ printf "--pod-certificate-allow=%v" . | quote }}
{{- end }}
{{- range .Values.podCertificates.deny }}
- {{ printf "--pod-certificate-deny=%v" . | quote }}
{{- end }}
{{- end }}
{{- if .Values.istiodCert.enabled }}
- {{ printf "--istiod-cert-secret=%v/%s" (.Values.istiodCert.secretNamespace) (.Values.istiodCert.secretName) | quote }}
{{- $istiodNames := list }}
{{- range .Values.istiodCert.revisions }}
{{- $istiodNames = append $istiodNames (printf "istiod-%s.%s.svc" . $.Values.istiodCert.secretNamespace) }}
{{- end }}
{{- $istiodNames = concat $istiodNames .Values.istiodCert.dnsNames }}
{{- if $istiodNames }}
- {{ printf "--istiod-cert-dns-names=%v" (join "," $istiodNames) | quote }}
{{- end }}
- {{ printf "--istiod-cert-ttl=%v" (.Values.istiodCert.ttl) | quote }}
{{- end }}
{{- range .Values.multiCluster.clusterAliases }}
- {{ printf "--cluster-alias=%v" . | quote }}
{{- end }}
{{- range .Values.multiCluster.trustDomainAliases }}
- {{ printf "--trust-domain-alias=%v" . | quote }}
{{- end }}
{{- range .Values.multiCluster.remoteClusters }}
{{- $id := .id }}
{{- $dir := include "signet.remoteDir" .id }}
{{- if .kubeconfigSecret }}
- {{ printf "--remote-cluster=%s=%s/kubeconfig" $id $dir | quote }}
{{- end }}
{{- with .jwks }}
- {{ printf "--remote-jwks=%s=%s,%s" $id .issuer (.url | default (printf "%s/jwks.json" $dir)) | quote }}
{{- end }}
{{- end }}
{{- with .Values.limits }}
{{- if .maxConnections }}
- {{ printf "--max-connections=%d" (int64 .maxConnections) | quote }}
{{- end }}
{{- if .maxTokenReviews }}
- {{ printf "--max-token-reviews=%d" (int64 .maxTokenReviews) | quote }}
{{- end }}
{{- if .maxPending }}
- {{ printf "--max-pending=%d" (int64 .maxPending) | quote }}
{{- end }}
{{- if .maxPendingPerCaller }}
- {{ printf "--max-pending-per-caller=%d" (int64 .maxPendingPerCaller) | quote }}
{{- end }}
{{- if .signingThreads }}
- {{ printf "--signing-threads=%d" (int64 .signingThreads) | quote }}
{{- end }}
{{- end }}
{{- if include "signet.writes" . }}
- {{ printf "--leader-election-namespace=%v" ($ns) | quote }}
- {{ printf "--leader-election-lease=%v" (include "signet.leaseName" .) | quote }}
- --leader-election-identity=$(POD_NAME)
- {{ printf "--lease-duration=%v" (.Values.leaderElection.leaseDuration) | quote }}
- {{ printf "--lease-renew-deadline=%v" (.Values.leaderElection.renewDeadline) | quote }}
- {{ printf "--lease-retry-period=%v" (.Values.leaderElection.retryPeriod) | quote }}
{{- end }}
{{- range .Values.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end -}}
