//! One file per resource; each handler carries its `#[utoipa::path]`, whose
//! `responses` list exactly the statuses it can return.
//!
//! | file | owns |
//! |---|---|
//! | `generate` | `POST /generate` (sync / async) and `PUT /jobs/{id}` |
//! | `jobs` | `GET /jobs/{id}`, its images, its events, `POST /jobs/{id}/cancel` |
//! | `openai` | `POST /v1/images/generations` |
//! | `meta` | `/health`, `/ready`, `/info`, `/metrics` |

pub mod generate;
pub mod jobs;
pub mod meta;
pub mod openai;
