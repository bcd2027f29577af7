//! A schema fuzzer for `POST /generate` and `POST /v1/images/generations`,
//! driven by the served OpenAPI document and `GET /info`: both directions,
//! through `Router::oneshot`.
//!
//! - Accepted: bodies whose every field is drawn inside its schema (type,
//!   minimum, maximum, exclusive minimum, length, enum), within the limits
//!   `/info` documents for the loaded cascade (steps, stages, sizes, noise
//!   levels, whether CLIP guidance is available) and the combinations the
//!   fields' descriptions state, are all accepted (202).
//! - Refused: a body with one field outside its schema (below its minimum,
//!   above its maximum, at an exclusive minimum, of another type, past its
//!   length, not in its enum, or unknown) is refused with a 4xx JSON error
//!   whose `param` names that field, and nothing is stored.

mod api_support;

use api_support::{get, post_json, Behaviour, Harness};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use diffusiond::worker::Readiness;
use std::sync::Arc;
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use serde_json::{json, Map, Value};

/// The spec and the live limits the bodies are drawn against.
struct Doc {
    spec: Value,
    info: Value,
}

impl Doc {
    /// Follows `$ref` and the `oneOf [schema, null]` of optional fields.
    fn resolve<'a>(&'a self, schema: &'a Value) -> &'a Value {
        if let Some(r) = schema["$ref"].as_str() {
            let name = r.rsplit('/').next().unwrap();
            return self.resolve(&self.spec["components"]["schemas"][name]);
        }
        if let Some(options) = schema["oneOf"].as_array() {
            if let Some(real) = options.iter().find(|o| o["type"] != "null") {
                if options.len() == 2 {
                    return self.resolve(real);
                }
            }
        }
        schema
    }

    fn body_schema(&self, name: &str) -> &Value {
        &self.spec["components"]["schemas"][name]
    }

    fn types(schema: &Value) -> Vec<String> {
        match &schema["type"] {
            Value::String(t) => vec![t.clone()],
            Value::Array(ts) => ts.iter().filter_map(|t| t.as_str().map(str::to_owned)).collect(),
            _ => vec![],
        }
    }

    fn base_max_steps(&self) -> i64 {
        self.info["stages"][0]["max_steps"].as_i64().unwrap()
    }
}

fn words(rng: &mut Xoshiro256PlusPlus, max_chars: usize) -> String {
    const WORDS: [&str; 8] = ["a", "red", "circle", "above", "two", "blue", "squares", "«ñ»"];
    let mut out = String::new();
    let target = rng.random_range(1..=max_chars.min(200));
    while out.chars().count() < target {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(WORDS[rng.random_range(0..WORDS.len())]);
    }
    out.chars().take(max_chars).collect::<String>().trim().to_owned() + "x"
}

/// A value for top-level field `name` of `GenerateBody` (or a field of that
/// name elsewhere), inside its schema and the documented limits; `None` for
/// fields drawn elsewhere.
fn valid(doc: &Doc, name: &str, schema: &Value, rng: &mut Xoshiro256PlusPlus) -> Option<Value> {
    let s = doc.resolve(schema);
    let info = &doc.info;
    let guidance_available = info["clip_guidance"]["available"].as_bool().unwrap();
    Some(match name {
        "prompt" | "negative_prompt" => json!(words(rng, s["maxLength"].as_u64().unwrap_or(4000) as usize - 1)),
        "size" => {
            let sizes = info["limits"]["sizes"].as_array().unwrap();
            sizes[rng.random_range(0..sizes.len())].clone()
        }
        "steps" => json!(rng.random_range(1..=doc.base_max_steps())),
        "stages" => json!(rng.random_range(1..=info["stages"].as_array().unwrap().len() as i64)),
        "n" => json!(rng.random_range(1..=info["limits"]["max_images"].as_i64().unwrap().min(s["maximum"].as_i64().unwrap()))),
        "seed" => json!(if rng.random_bool(0.2) { i64::MAX as u64 } else { rng.random_range(0..1u64 << 40) }),
        "preview_every" => json!(rng.random_range(1..=100)),
        "clip_guidance_scale" | "classifier_guidance_scale" if !guidance_available => json!(0.0),
        "source" | "variation" | "interpolate" | "stage_overrides" => return None,
        _ => match (Doc::types(s).first().map(String::as_str), s["enum"].as_array()) {
            (_, Some(options)) => options[rng.random_range(0..options.len())].clone(),
            (Some("number"), _) => {
                let (lo, hi) = (s["minimum"].as_f64().unwrap(), s["maximum"].as_f64().unwrap());
                json!(if rng.random_bool(0.2) { if rng.random_bool(0.5) { lo } else { hi } } else { rng.random_range(lo..=hi) })
            }
            (Some("integer"), _) => json!(rng.random_range(s["minimum"].as_i64().unwrap()..=s["maximum"].as_i64().unwrap())),
            other => panic!("no generator for `{name}` ({other:?}): the fuzzer must learn the new field"),
        },
    })
}

/// A whole body: each optional field present with probability ½, and the
/// combinations the fields' descriptions allow.
fn valid_body(doc: &Doc, rng: &mut Xoshiro256PlusPlus) -> Value {
    let schema = doc.body_schema("GenerateBody");
    let mut body = Map::new();
    for (name, field) in schema["properties"].as_object().unwrap() {
        if name == "prompt" || rng.random_bool(0.5) {
            if let Some(v) = valid(doc, name, field, rng) {
                body.insert(name.clone(), v);
            }
        }
    }
    // `stages` and `size` together name the same stage.
    if let (Some(size), Some(_)) = (body.get("size").cloned(), body.get("stages")) {
        let k = doc.info["stages"].as_array().unwrap().iter().position(|s| s["size"] == size).unwrap();
        body.insert("stages".into(), json!(k + 1));
    }
    // A stage override of the SR stage, when it runs.
    let stages = body.get("stages").and_then(Value::as_i64).unwrap_or(2);
    let size_is_base = body.get("size").is_some_and(|s| s == &doc.info["stages"][0]["size"]);
    if rng.random_bool(0.3) && stages > 1 && !size_is_base {
        let sr = &doc.info["stages"][1];
        let mut over = json!({"stage": 1, "steps": rng.random_range(2..=sr["max_steps"].as_i64().unwrap())});
        if rng.random_bool(0.5) {
            over["noise_level"] = json!(rng.random_range(0..=sr["max_noise_level"].as_i64().unwrap()));
        }
        if rng.random_bool(0.5) {
            // "It must leave at least one step to run": at least half of ≥ 2 steps does.
            over["strength"] = json!(rng.random_range(0.5..=1.0));
        }
        if rng.random_bool(0.5) {
            over["guidance_scale"] = json!(rng.random_range(0.0..=50.0));
        }
        body.insert("stage_overrides".into(), json!([over]));
    }
    // Variations or an interpolation (not both; an interpolation has n ≥ 2 frames).
    match rng.random_range(0..4) {
        0 => {
            body.insert("variation".into(), json!({"seed": rng.random_range(0..1u64 << 40), "strength": rng.random_range(0.0..=1.0)}));
        }
        1 => {
            body.insert("n".into(), json!(rng.random_range(2..=doc.info["limits"]["max_images"].as_i64().unwrap())));
            let mut interpolate = json!({"seed": rng.random_range(0..1u64 << 40)});
            if rng.random_bool(0.5) {
                interpolate["prompt"] = json!(words(rng, 100));
            }
            body.insert("interpolate".into(), interpolate);
        }
        _ => {}
    }
    Value::Object(body)
}

/// Values outside `schema`, each with what it breaks.
fn invalid_values(doc: &Doc, schema: &Value) -> Vec<(Value, &'static str)> {
    let s = doc.resolve(schema);
    let mut out = Vec::new();
    if let Some(options) = s["enum"].as_array() {
        assert!(!options.contains(&json!("bogus")));
        out.push((json!("bogus"), "enum"));
        out.push((json!(3), "type"));
        return out;
    }
    match Doc::types(s).first().map(String::as_str) {
        Some(kind @ ("number" | "integer")) => {
            let step = if kind == "integer" { 1.0 } else { 0.5 };
            if let Some(min) = s["minimum"].as_f64() {
                out.push((json!(min - step), "minimum"));
            }
            if let Some(min) = s["exclusiveMinimum"].as_f64() {
                out.push((json!(min), "exclusiveMinimum"));
            }
            if let Some(max) = s["maximum"].as_f64() {
                out.push((json!(max + step), "maximum"));
            }
            if kind == "integer" {
                out.push((json!(1.5), "type"));
            }
            out.push((json!("7"), "type"));
            out.push((json!([1]), "type"));
        }
        Some("string") => {
            if let Some(max) = s["maxLength"].as_u64() {
                out.push((json!("a".repeat(max as usize + 1)), "maxLength"));
            }
            out.push((json!(12), "type"));
            out.push((json!({"text": "x"}), "type"));
        }
        Some("boolean") => {
            out.push((json!("yes"), "type"));
            out.push((json!(1), "type"));
        }
        Some("array") => out.push((json!("x"), "type")),
        Some("object") | None => out.push((json!(5), "type")),
        Some(other) => panic!("no invalid values for type {other}"),
    }
    out
}

/// `POST /generate`, answered with a job (202) rather than images.
fn async_generate(body: &Value) -> Request<Body> {
    let mut r = post_json("/generate", body);
    r.headers_mut().insert("prefer", "respond-async".parse().unwrap());
    r
}

async fn load(h: &Harness) -> Doc {
    Doc { spec: h.send(get("/openapi.json")).await.json(), info: h.send(get("/info")).await.json() }
}

#[tokio::test]
async fn bodies_drawn_inside_the_document_are_accepted() {
    let h = Harness::new(Behaviour::Hold);
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(2026);
    let runs = 300;
    // Without a CLIP, then with one of the base stage's size (`clip_guidance` in /info).
    for clip in [None, Some(16)] {
        let mut info = api_support::cascade_info();
        info.stages[0].0.clip_image_size = clip;
        h.readiness.send_replace(Readiness::Ready(Arc::new(info)));
        let doc = load(&h).await;
        assert_eq!(doc.info["clip_guidance"]["available"], clip.is_some());
        for i in 0..runs / 2 {
            let body = valid_body(&doc, &mut rng);
            let reply = h.send(async_generate(&body)).await;
            assert_eq!(reply.status, StatusCode::ACCEPTED, "body {i} is inside the document but was refused: {body}\n{}", reply.text());
        }
    }
    let doc = load(&h).await;
    // Strings at their documented length exactly.
    let max = doc.body_schema("GenerateBody")["properties"]["prompt"]["maxLength"].as_u64().unwrap() as usize;
    let longest = json!({"prompt": "é".repeat(max), "negative_prompt": "b".repeat(max)});
    assert_eq!(h.send(async_generate(&longest)).await.status, StatusCode::ACCEPTED);
    assert_eq!(h.store.len(), runs + 1);
}

#[tokio::test]
async fn a_field_outside_the_document_is_refused_naming_it() {
    let h = Harness::new(Behaviour::Hold);
    let doc = load(&h).await;
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(7);
    let refuse = |body: Value, field: String, broke: &'static str| {
        let h = &h;
        async move {
            let reply = h.send(async_generate(&body)).await;
            assert!(reply.status.is_client_error(), "{field} ({broke}) was accepted: {body}");
            let param = reply.json()["error"]["param"].as_str().unwrap_or_default().to_owned();
            // A stage override's checked values are named by the stage they set: `stages[1].eta`.
            let names = |f: &str| param == f || param.starts_with(&format!("{f}.")) || param.starts_with(&format!("{f}["));
            assert!(names(&field) || (field == "stage_overrides" && names("stages")), "{field} ({broke}): the error names `{param}`: {}", reply.text());
        }
    };
    let mut probes = 0;
    let top = doc.body_schema("GenerateBody");
    for (name, field) in top["properties"].as_object().unwrap() {
        for (value, broke) in invalid_values(&doc, field) {
            let mut body = valid_body(&doc, &mut rng);
            body[name.as_str()] = value;
            refuse(body, name.clone(), broke).await;
            probes += 1;
        }
    }
    // Inside the nested objects: the stage override, the variation, the interpolation.
    let nested = [("StageOverrideBody", "stage_overrides"), ("VariationBody", "variation"), ("InterpolateBody", "interpolate")];
    for (schema_name, field) in nested {
        let schema = doc.body_schema(schema_name);
        for (name, sub) in schema["properties"].as_object().unwrap() {
            for (value, broke) in invalid_values(&doc, sub) {
                let mut inner = match field {
                    "stage_overrides" => json!({"stage": 1}),
                    "variation" => json!({"seed": 1, "strength": 0.5}),
                    _ => json!({"seed": 1}),
                };
                inner[name.as_str()] = value;
                let mut body = json!({"prompt": "a red circle", "n": 2});
                body[field] = if field == "stage_overrides" { json!([inner]) } else { inner };
                refuse(body, field.to_owned(), broke).await;
                probes += 1;
            }
        }
        // A required field missing, and an unknown one.
        for required in schema["required"].as_array().unwrap() {
            let mut inner = match field {
                "stage_overrides" => json!({"stage": 1}),
                "variation" => json!({"seed": 1, "strength": 0.5}),
                _ => json!({"seed": 1}),
            };
            inner.as_object_mut().unwrap().remove(required.as_str().unwrap());
            let mut body = json!({"prompt": "a red circle", "n": 2});
            body[field] = if field == "stage_overrides" { json!([inner]) } else { inner };
            refuse(body, field.to_owned(), "required").await;
            probes += 1;
        }
    }
    for _ in 0..20 {
        let mut body = valid_body(&doc, &mut rng);
        body["zz_unknown"] = json!(1);
        refuse(body, "zz_unknown".into(), "additionalProperties").await;
        probes += 1;
    }
    let mut no_prompt = valid_body(&doc, &mut rng);
    no_prompt.as_object_mut().unwrap().remove("prompt");
    refuse(no_prompt, "prompt".into(), "required").await;
    assert!(probes > 60, "{probes} probes");
    assert_eq!(h.store.len(), 0, "nothing refused is stored");
}

/// A value inside the schema of `ImagesRequest` field `name`, and the limits
/// of `/info`: its own fields here, the ones it shares with `GenerateBody` as
/// [`valid`] draws them.
fn valid_images_field(doc: &Doc, name: &str, schema: &Value, rng: &mut Xoshiro256PlusPlus) -> Option<Value> {
    Some(match name {
        "num_inference_steps" => json!(rng.random_range(1..=doc.base_max_steps())),
        // Streaming answers with events as the job runs; these bodies are answered whole.
        "stream" => json!(false),
        "partial_images" => return None,
        // Accepted and ignored, whatever they say.
        "background" | "model" | "moderation" | "quality" | "style" | "user" | "safety_identifier" => json!(words(rng, 20)),
        _ => return valid(doc, name, schema, rng),
    })
}

#[tokio::test]
async fn openai_generation_bodies_are_accepted_inside_the_document_and_refused_outside_it() {
    let h = Harness::new(Behaviour::Succeed);
    let doc = load(&h).await;
    let schema = doc.body_schema("ImagesRequest").clone();
    let fields = schema["properties"].as_object().unwrap();
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(11);
    let body = |rng: &mut Xoshiro256PlusPlus| {
        let mut body = Map::new();
        for (name, field) in fields {
            if name == "prompt" || rng.random_bool(0.5) {
                if let Some(v) = valid_images_field(&doc, name, field, rng) {
                    body.insert(name.clone(), v);
                }
            }
        }
        Value::Object(body)
    };
    for i in 0..100 {
        let b = body(&mut rng);
        let reply = h.send(post_json("/v1/images/generations", &b)).await;
        assert_eq!(reply.status, StatusCode::OK, "body {i} is inside the document but was refused: {b}\n{}", reply.text());
    }
    let stored = h.store.len();
    let mut probes = 0;
    for (name, field) in fields {
        for (value, broke) in invalid_values(&doc, field) {
            let mut b = body(&mut rng);
            b[name.as_str()] = value;
            let reply = h.send(post_json("/v1/images/generations", &b)).await;
            assert!(reply.status.is_client_error(), "{name} ({broke}) was accepted: {b}");
            assert_eq!(reply.json()["error"]["param"], name.as_str(), "{name} ({broke}): {}", reply.text());
            probes += 1;
        }
    }
    assert!(probes > 30, "{probes} probes");
    assert_eq!(h.store.len(), stored, "nothing refused is stored");
}
