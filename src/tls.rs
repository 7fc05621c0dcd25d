//! Process-wide TLS setup shared by every rustls user (the RunPod and Prometheus HTTP clients;
//! tonic's server and client pick the same provider).

/// Installs ring as rustls' process-wide crypto provider, once. reqwest is built without a
/// provider of its own so the binary carries exactly one (ring, as tonic uses). Calling it
/// again, or after another part installed the same provider, is harmless.
pub(crate) fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
