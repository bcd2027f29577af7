//! The embedded job store.
