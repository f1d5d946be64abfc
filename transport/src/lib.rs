//! The network shell shared by agent, relay and target: QUIC (quinn) with TLS 1.3
//! and mutual certificate authentication, the PKI, and proto frames over streams.
