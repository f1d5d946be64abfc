//! Export of a disk as a new VMDK.
