//! Trust changes the CA drives (docs/root-rotation.md), in one test binary: with the
//! CA on its files (`files`) and in a cluster against the stateful test API server
//! (`cluster`).

mod cluster;
mod files;
