//! blockferry relay (process server): receives batches from agents, spools them
//! durably, and forwards them to the target.
