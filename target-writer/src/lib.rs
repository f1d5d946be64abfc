//! blockferry target writer (master target): applies verified batches to VMDK
//! replicas and keeps the journal of recovery points.
