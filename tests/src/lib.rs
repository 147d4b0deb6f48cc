//! Shared helpers for Abide integration tests.
