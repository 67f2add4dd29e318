//! Istio's `COMPLIANCE_POLICY`, with the values and meanings of istiod and pilot-agent
//! (`pkg/model/fips.go` in Istio), and the rustls provider each value allows.
//!
//! | policy        | versions  | key exchange                          | cipher suites            |
//! |---------------|-----------|---------------------------------------|--------------------------|
//! | unset         | 1.2, 1.3  | X25519MLKEM768, X25519, P-256, P-384  | ring's (AES-GCM, ChaCha) |
//! | `pqc`         | 1.3       | X25519MLKEM768                        | AES-GCM                  |
//! | `fips-140-3`  | 1.2, 1.3  | X25519MLKEM768, P-256, P-384          | AES-GCM, ECDHE in 1.2    |
//! | `fips-140-2`  | 1.2       | P-256                                 | ECDHE AES-GCM            |
//!
//! `fips-140-3` is Istio's (P-256, P-384, AES-GCM) plus the hybrid group, which the
//! agent offers first under every policy that can carry it and Go's FIPS 140-3 mode
//! allows (its key comes from ML-KEM; X25519 alone is not an approved group). It
//! restricts the algorithms; ring is not a validated module, so it does not make Signet
//! one.
//! Istio only warns on an unknown value; Signet refuses to start.

use std::{fmt, str::FromStr};

use rustls::{
    CipherSuite, NamedGroup, SupportedCipherSuite, SupportedProtocolVersion,
    crypto::{CryptoProvider, SupportedKxGroup, ring},
    version::{TLS12, TLS13},
};

use crate::hybrid::X25519MLKEM768;

/// A value of `COMPLIANCE_POLICY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompliancePolicy {
    /// Unset: TLS 1.2 and 1.3, the hybrid group preferred, classical groups kept.
    #[default]
    Unset,
    /// `pqc`: TLS 1.3 with X25519MLKEM768 and nothing else.
    Pqc,
    /// `fips-140-3`: FIPS-approved groups and cipher suites only.
    Fips1403,
    /// `fips-140-2`: Istio's older FIPS policy, TLS 1.2 with P-256 only.
    Fips1402,
}

/// A `COMPLIANCE_POLICY` value Istio does not define.
#[derive(Debug, thiserror::Error)]
#[error(
    "{0:?} is not a compliance policy: Istio's values are pqc, fips-140-3 and fips-140-2 (or leave it unset)"
)]
pub struct UnknownPolicy(String);

impl FromStr for CompliancePolicy {
    type Err = UnknownPolicy;

    /// Exact, as Istio compares it; the empty string is unset.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "" => Ok(Self::Unset),
            "pqc" => Ok(Self::Pqc),
            "fips-140-3" => Ok(Self::Fips1403),
            "fips-140-2" => Ok(Self::Fips1402),
            other => Err(UnknownPolicy(other.to_owned())),
        }
    }
}

impl fmt::Display for CompliancePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Unset => "unset",
            Self::Pqc => "pqc",
            Self::Fips1403 => "fips-140-3",
            Self::Fips1402 => "fips-140-2",
        })
    }
}

/// The `--compliance-policy` flag both programs take.
#[derive(Debug, Clone, clap::Args)]
pub struct ComplianceArgs {
    /// Istio's compliance policy for TLS: unset (TLS 1.2 and 1.3, X25519MLKEM768
    /// preferred, classical groups kept), `pqc` (TLS 1.3 with X25519MLKEM768 only),
    /// `fips-140-3` (FIPS-approved groups and AES-GCM suites only) or `fips-140-2`
    /// (TLS 1.2 with P-256 only).
    #[arg(
        long,
        env = "COMPLIANCE_POLICY",
        default_value = "",
        hide_default_value = true,
        value_parser = CompliancePolicy::from_str
    )]
    pub compliance_policy: CompliancePolicy,
}

impl CompliancePolicy {
    /// The TLS versions allowed.
    pub fn versions(self) -> &'static [&'static SupportedProtocolVersion] {
        static BOTH: [&SupportedProtocolVersion; 2] = [&TLS13, &TLS12];
        static ONLY_13: [&SupportedProtocolVersion; 1] = [&TLS13];
        static ONLY_12: [&SupportedProtocolVersion; 1] = [&TLS12];
        match self {
            Self::Unset | Self::Fips1403 => &BOTH,
            Self::Pqc => &ONLY_13,
            Self::Fips1402 => &ONLY_12,
        }
    }

    /// Whether X25519MLKEM768 is allowed (and then always offered first).
    pub fn allows_hybrid(self) -> bool {
        !matches!(self, Self::Fips1402)
    }

    /// The key-exchange groups allowed, in order of preference.
    pub fn kx_groups(self) -> Vec<&'static dyn SupportedKxGroup> {
        use ring::kx_group::{SECP256R1, SECP384R1, X25519};
        match self {
            Self::Unset => vec![X25519MLKEM768, X25519, SECP256R1, SECP384R1],
            Self::Pqc => vec![X25519MLKEM768],
            Self::Fips1403 => vec![X25519MLKEM768, SECP256R1, SECP384R1],
            Self::Fips1402 => vec![SECP256R1],
        }
    }

    /// The cipher suites allowed, in ring's order of preference.
    pub fn cipher_suites(self) -> Vec<SupportedCipherSuite> {
        let allowed: &[CipherSuite] = match self {
            Self::Unset => return ring::ALL_CIPHER_SUITES.to_vec(),
            Self::Pqc => &TLS13_AES_GCM,
            Self::Fips1403 => &FIPS_140_3,
            Self::Fips1402 => &TLS12_ECDHE_AES_GCM,
        };
        ring::ALL_CIPHER_SUITES
            .iter()
            .filter(|s| allowed.contains(&s.suite()))
            .copied()
            .collect()
    }
}

const TLS13_AES_GCM: [CipherSuite; 2] = [
    CipherSuite::TLS13_AES_128_GCM_SHA256,
    CipherSuite::TLS13_AES_256_GCM_SHA384,
];

const TLS12_ECDHE_AES_GCM: [CipherSuite; 4] = [
    CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
];

const FIPS_140_3: [CipherSuite; 6] = [
    TLS13_AES_GCM[0],
    TLS13_AES_GCM[1],
    TLS12_ECDHE_AES_GCM[0],
    TLS12_ECDHE_AES_GCM[1],
    TLS12_ECDHE_AES_GCM[2],
    TLS12_ECDHE_AES_GCM[3],
];

/// rustls's ring provider narrowed to what `policy` allows, the hybrid group first.
/// Signing and certificate verification stay ring's.
pub fn provider(policy: CompliancePolicy) -> CryptoProvider {
    CryptoProvider {
        cipher_suites: policy.cipher_suites(),
        kx_groups: policy.kx_groups(),
        ..ring::default_provider()
    }
}

/// Whether `provider` offers what `policy` allows, groups and suites in the same
/// order: for code that relies on rustls's process-wide default provider (tonic's
/// client TLS does).
pub fn follows(policy: CompliancePolicy, provider: &CryptoProvider) -> bool {
    let groups = |list: &[&'static dyn SupportedKxGroup]| -> Vec<NamedGroup> {
        list.iter().map(|g| g.name()).collect()
    };
    let suites = |list: &[SupportedCipherSuite]| -> Vec<CipherSuite> {
        list.iter().map(|s| s.suite()).collect()
    };
    groups(&provider.kx_groups) == groups(&policy.kx_groups())
        && suites(&provider.cipher_suites) == suites(&policy.cipher_suites())
}

/// A group's name as Envoy's `ssl.curves.*` statistics and OpenSSL spell it, for
/// metric labels and logs.
pub fn group_name(group: NamedGroup) -> &'static str {
    match group {
        NamedGroup::X25519MLKEM768 => "X25519MLKEM768",
        NamedGroup::X25519 => "X25519",
        NamedGroup::secp256r1 => "P-256",
        NamedGroup::secp384r1 => "P-384",
        NamedGroup::secp521r1 => "P-521",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_values_parse_and_others_are_refused() {
        assert_eq!(
            "".parse::<CompliancePolicy>().unwrap(),
            CompliancePolicy::Unset
        );
        assert_eq!(
            "pqc".parse::<CompliancePolicy>().unwrap(),
            CompliancePolicy::Pqc
        );
        assert_eq!(
            "fips-140-3".parse::<CompliancePolicy>().unwrap(),
            CompliancePolicy::Fips1403
        );
        assert_eq!(
            "fips-140-2".parse::<CompliancePolicy>().unwrap(),
            CompliancePolicy::Fips1402
        );
        for bad in ["PQC", " pqc", "fips", "fips-140-3 ", "mlkem", "none"] {
            let err = bad.parse::<CompliancePolicy>().unwrap_err().to_string();
            assert!(err.contains("pqc, fips-140-3 and fips-140-2"), "{err}");
        }
    }

    #[test]
    fn pqc_is_tls13_and_the_hybrid_alone() {
        let p = CompliancePolicy::Pqc;
        assert_eq!(p.versions().len(), 1);
        assert_eq!(p.versions()[0].version, rustls::ProtocolVersion::TLSv1_3);
        let groups: Vec<_> = p.kx_groups().iter().map(|g| g.name()).collect();
        assert_eq!(groups, [NamedGroup::X25519MLKEM768]);
        let suites: Vec<_> = p.cipher_suites().iter().map(|s| s.suite()).collect();
        assert_eq!(suites.len(), 2);
        assert!(suites.iter().all(|s| TLS13_AES_GCM.contains(s)));
    }

    #[test]
    fn fips_policies_hold_no_x25519_alone_nor_chacha() {
        for p in [CompliancePolicy::Fips1403, CompliancePolicy::Fips1402] {
            assert!(!p.kx_groups().iter().any(|g| g.name() == NamedGroup::X25519));
            for s in p.cipher_suites() {
                assert!(format!("{:?}", s.suite()).contains("_GCM_"), "{s:?}");
            }
        }
        assert_eq!(CompliancePolicy::Fips1403.cipher_suites().len(), 6);
        assert_eq!(CompliancePolicy::Fips1402.cipher_suites().len(), 4);
    }

    #[test]
    fn a_provider_follows_only_its_own_policy() {
        assert!(follows(
            CompliancePolicy::Pqc,
            &provider(CompliancePolicy::Pqc)
        ));
        assert!(!follows(
            CompliancePolicy::Pqc,
            &provider(CompliancePolicy::Unset)
        ));
        assert!(!follows(CompliancePolicy::Unset, &ring::default_provider()));
    }

    #[test]
    fn the_hybrid_group_is_offered_first_wherever_allowed() {
        for p in [
            CompliancePolicy::Unset,
            CompliancePolicy::Pqc,
            CompliancePolicy::Fips1403,
        ] {
            assert!(p.allows_hybrid());
            assert_eq!(p.kx_groups()[0].name(), NamedGroup::X25519MLKEM768);
            // A provider rustls accepts: suites and groups consistent.
            let provider = provider(p);
            rustls::ClientConfig::builder_with_provider(provider.into())
                .with_protocol_versions(p.versions())
                .unwrap();
        }
        assert!(!CompliancePolicy::Fips1402.allows_hybrid());
    }
}
