//! Calls: a Function run once over HTTP, synchronously, through the same
//! runners and warm workers as its row batches.
//!
//! `POST /v2/udfs/{id}/calls` places the call on a runner as a batch would
//! be placed (an idle warm worker of the revision first), sends it there
//! (`POST /v1/calls`, a call token), and answers with the worker's output.
//! The record of the call is written once the caller has the answer, off
//! the caller's path: a platform that dies in between loses the record of
//! calls it had answered, never an answer. Records are pruned after
//! `EngineConfig::call_retention`.

pub mod api;
pub mod store;
