//! TLS for outgoing HTTPS (Databricks): rustls with the `ring` provider.
//!
//! reqwest is built without a provider of its own (its default, aws-lc-rs,
//! made the C build of aws-lc-sys the longest step of a cold build), so
//! the process-wide default must be installed before any client is built.

/// Installs `ring` as the process's rustls provider; a no-op if one is
/// already installed. Call before building any HTTPS client.
pub fn install_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err means another provider was installed first: it is used.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

#[cfg(test)]
mod tests {
    /// reqwest has no provider of its own: without ring installed, building
    /// an HTTPS client panics.
    #[test]
    fn an_https_client_builds_with_ring() {
        super::install_provider();
        super::install_provider();
        let client = reqwest::blocking::Client::builder()
            .https_only(true)
            .build();
        assert!(client.is_ok(), "{:?}", client.err());
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
    }
}
