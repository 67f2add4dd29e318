//! The workload's identity: its private [`keys`] (made here, never sent), the CA
//! client ([`caclient`]) with what it trusts the CA by ([`catrust`]), the checks every
//! answer passes ([`svid`]), and the [`rotation`] loop that keeps the certificate
//! fresh on its pure [`schedule`], publishing through [`rotation::Publish`].

pub mod caclient;
pub mod catrust;
pub mod keys;
pub mod rotation;
pub mod schedule;
pub mod svid;
