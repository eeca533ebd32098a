//! Conformance emulators of the SaaS APIs sluice writes to. They reproduce the contracts that
//! matter to a sync client (authentication and token expiry, batch limits, partial failures,
//! rate limits with the real status codes, headers and bodies) and add a control plane under
//! `/_emu/` for tests: inspection, fault and latency injection, limits, and a movable clock.
//! Sources of each behaviour: `shared/reference/crm-erp-contracts.md` in the team's notes.

pub mod hubspot;
pub mod ratelimit;
pub mod salesforce;
