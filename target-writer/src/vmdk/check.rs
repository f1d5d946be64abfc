//! Structural checker.
