//! `openapi/openapi.json` is what the code generates: a handler, schema or
//! status change without regenerating the file fails here.
//! Regenerate with `cargo run -- openapi -o openapi/openapi.json`.

#[test]
fn committed_openapi_document_matches_the_code() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi/openapi.json");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    let generated = diffusiond::api::openapi::openapi_json();
    assert!(committed == generated, "{} is stale or missing; regenerate it with `cargo run -- openapi -o openapi/openapi.json`", path.display());
}
