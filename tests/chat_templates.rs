//! Real chat templates (Llama 3.1/3.2, Mistral, SmolLM2, Qwen2.5, Hermes) rendered by us must
//! equal what transformers renders, byte for byte (goldens from
//! scripts/reference/chat_template_goldens.py), including the templates' own errors.

mod common;

use serde_json::Value;
use your_ai::data::chat_template::{ChatContext, ChatTemplate, TemplateError};

#[test]
fn templates_render_exactly_as_transformers() {
    check_goldens(ChatTemplate::new);
}

/// The same renders through the worker process the command-line tool uses (requests and
/// replies as JSON lines): nothing changes on the way.
#[test]
fn worker_process_renders_exactly_as_in_process() {
    check_goldens(|src| ChatTemplate::isolated(src, worker()));
}

/// One user message through `tpl`.
fn render_user(tpl: &ChatTemplate, content: &str) -> Result<String, TemplateError> {
    let msgs = [serde_json::json!({"role": "user", "content": content})];
    tpl.render(&ChatContext {
        messages: &msgs,
        ..Default::default()
    })
}

fn worker() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_BIN_EXE_your_ai"))
}

fn check_goldens(make: impl Fn(&str) -> Result<ChatTemplate, TemplateError>) {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat_templates");
    let goldens: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("goldens.json")).unwrap()).unwrap();
    assert!(goldens.len() >= 40);
    let today = chrono::Local::now().format("%d %b %Y").to_string();
    let mut checked = 0;
    for g in &goldens {
        let name = g["template"].as_str().unwrap();
        let case = g["case"].as_str().unwrap();
        let src = std::fs::read_to_string(dir.join(format!("{name}.jinja"))).unwrap();
        let tpl = make(&src).unwrap_or_else(|e| panic!("{name}: {e}"));
        let messages = g["messages"].as_array().unwrap().clone();
        let tools = g["tools"].as_array().cloned();
        let extra = g["extra_kwargs"].as_object().cloned().unwrap_or_default();
        let out = tpl.render(&ChatContext {
            messages: &messages,
            tools: tools.as_deref(),
            add_generation_prompt: g["add_generation_prompt"].as_bool().unwrap(),
            bos_token: g["bos_token"].as_str(),
            eos_token: g["eos_token"].as_str(),
            extra,
        });
        if name == "hermes" && case == "error_no_tools" {
            // Deliberate difference: Jinja2 raises on `for t in none`; minijinja iterates
            // nothing, so a Hermes conversation without tools renders with an empty tool list
            // instead of failing.
            assert!(out.unwrap().contains("<tools>  </tools>"));
        } else if g["expected_error"].as_bool() == Some(true) {
            let err = out.expect_err(&format!("{name}/{case} should fail"));
            let want = g["error"].as_str().unwrap_or("");
            if let Some(msg) = want.strip_prefix("TemplateError: ") {
                assert!(
                    matches!(&err, TemplateError::Raised(m) if m.contains(msg)),
                    "{name}/{case}: {err}"
                );
            }
        } else {
            let mut expected = g["expected"].as_str().unwrap().to_string();
            if let Some(p) = g.get("today_placeholder").and_then(Value::as_str) {
                expected = expected.replace(p, &today);
            }
            let out = out.unwrap_or_else(|e| panic!("{name}/{case}: {e}"));
            assert_eq!(out, expected, "{name}/{case}");
        }
        checked += 1;
    }
    assert_eq!(checked, goldens.len());
}

/// Fixed seeds keep CI reproducible; `HOSTILE_SEED=n` explores others.
fn seeded(base: u64) -> rand::rngs::StdRng {
    use rand::SeedableRng;
    let extra: u64 = std::env::var("HOSTILE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    rand::rngs::StdRng::seed_from_u64(base ^ extra.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

fn pick<'a, T>(rng: &mut rand::rngs::StdRng, xs: &'a [T]) -> &'a T {
    use rand::Rng;
    &xs[rng.random_range(0..xs.len())]
}

/// Numbers a hostile template passes as widths, counts and ranges.
const NUMBERS: &[&str] = &[
    "0", "1", "3", "-1", "100", "100000", "1000000", "10**9", "10**12", "2**63", "9",
];

fn random_text(rng: &mut rand::rngs::StdRng) -> String {
    use rand::Rng;
    match rng.random_range(0..6) {
        0 => String::new(),
        1 => "hello".into(),
        2 => (0..rng.random_range(0..40))
            .map(|_| char::from_u32(rng.random_range(0..0x11_0000)).unwrap_or('?'))
            .collect(),
        3 => "{{ x }}{% if %}<|im_end|>\n\t\"\\".into(),
        // Huge content, now and then.
        4 if rng.random_range(0..20) == 0 => "x".repeat(1 << 20),
        _ => "ab %5d {:>3} é".into(),
    }
}

fn random_json(rng: &mut rand::rngs::StdRng, depth: usize) -> Value {
    use rand::Rng;
    match rng.random_range(0..if depth > 4 { 5 } else { 8 }) {
        0 => Value::Null,
        1 => Value::Bool(rng.random()),
        2 => serde_json::json!(rng.random_range(-1e6..1e6)),
        3 => serde_json::json!(rng.random::<i64>()),
        4 => Value::String(random_text(rng)),
        5 | 6 => Value::Array(
            (0..rng.random_range(0..4))
                .map(|_| random_json(rng, depth + 1))
                .collect(),
        ),
        _ => {
            let keys = ["type", "text", "name", "arguments", "content", "role", "k"];
            Value::Object(
                (0..rng.random_range(0..4))
                    .map(|_| (pick(rng, &keys).to_string(), random_json(rng, depth + 1)))
                    .collect(),
            )
        }
    }
}

fn random_message(rng: &mut rand::rngs::StdRng) -> Value {
    use rand::Rng;
    let roles = [
        "system",
        "user",
        "assistant",
        "assistant",
        "tool",
        "ipython",
        "wizard",
        "",
    ];
    let mut m = serde_json::Map::new();
    match rng.random_range(0..10) {
        0 => {}
        1 => {
            m.insert("role".into(), random_json(rng, 3));
        }
        _ => {
            m.insert("role".into(), Value::String(pick(rng, &roles).to_string()));
        }
    }
    match rng.random_range(0..8) {
        0 => {}
        1 => {
            m.insert("content".into(), random_json(rng, 0));
        }
        2 => {
            m.insert(
                "content".into(),
                serde_json::json!([{"type": "text", "text": random_text(rng)}, {"type": "image"}]),
            );
        }
        _ => {
            m.insert("content".into(), Value::String(random_text(rng)));
        }
    }
    if rng.random_range(0..5) == 0 {
        m.insert(
            "tool_calls".into(),
            serde_json::json!([{"type": "function", "function": {
                "name": random_text(rng), "arguments": random_json(rng, 2)}}]),
        );
    }
    if rng.random_range(0..10) == 0 {
        m.insert("extra".into(), random_json(rng, 0));
    }
    if rng.random_range(0..30) == 0 {
        return random_json(rng, 0);
    }
    Value::Object(m)
}

/// A random template from pieces: real constructs, hostile loops and sizes, raised errors,
/// deep recursion, and fragments that do not parse.
fn random_template(rng: &mut rand::rngs::StdRng) -> String {
    use rand::Rng;
    let mut t = String::new();
    for _ in 0..rng.random_range(1..8) {
        let a = pick(rng, NUMBERS);
        let piece = match rng.random_range(0..26) {
            0 => "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}".to_string(),
            1 => "{{ messages[0].content | tojson }}".into(),
            2 => format!("{{{{ messages | tojson(indent={a}) }}}}"),
            3 => "{% if add_generation_prompt %}<|assistant|>{% endif %}".into(),
            4 => "{{ raise_exception('Conversation roles must alternate') }}".into(),
            5 => "{% for m in messages %}{{ m.content.strip().upper() }}{% endfor %}".into(),
            6 => format!("{{{{ 'x' * {a} }}}}"),
            7 => format!("{{% for i in range({a}) %}}.{{% endfor %}}"),
            8 if rng.random_range(0..8) == 0 => format!(
                "{{% for i in range({a}) %}}{{% for j in range({a}) %}}{{% endfor %}}{{% endfor %}}"
            ),
            9 => format!("{{{{ messages[0].content | indent({a}) }}}}"),
            10 => format!("{{{{ '%{a}d' | format(1) }}}}"),
            11 => format!("{{{{ '{{:>{a}}}'.format(1) }}}}"),
            12 => format!("{{{{ messages | batch({a}) | list | length }}}}"),
            13 => format!("{{{{ messages | slice({a}) | list | length }}}}"),
            14 => "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}".into(),
            15 if rng.random_range(0..4) == 0 => format!(
                "{{% set ns = namespace(x=[]) %}}{{% for i in range({a}) %}}{{% set ns.x = [ns.x] %}}{{% endfor %}}{{{{ ns.x | tojson }}}}"
            ),
            16 => "{% for t in tools %}{{ t.function.name }}{{ t | tojson(indent=2) }}{% endfor %}".into(),
            17 => "{{ messages[0]['tool_calls'][0]['function']['arguments'] | tojson }}".into(),
            18 => "{{ strftime_now('%d %b %Y %Q %') }}".into(),
            19 => "{% for m in messages %}{% if loop.index0 % 2 == 0 and m.role != 'user' %}{{ raise_exception('bad') }}{% endif %}{% endfor %}".into(),
            20 => format!("{{{{ messages[0].content.split('a', {a}) | join('-') }}}}"),
            21 => pick(rng, &["{% for", "{{", "{% endif %}", "{% if x %}", "}}", "{% set %}", "{{ ) }}", "{% macro %}", "{% endfor %}"]).to_string(),
            22 => format!("{{{{ messages[{a}] }}}}{{{{ messages[{a}].content }}}}"),
            23 => "{{ bos_token }}{{ eos_token ~ tools | length }}{{ documents }}".into(),
            24 => format!("{{{{ ({a}) / 0 }}}}{{{{ {a} // 0 }}}}"),
            _ => random_text(rng),
        };
        t.push_str(&piece);
    }
    t
}

/// Deletes, duplicates or inserts characters of a real template.
fn mutate(rng: &mut rand::rngs::StdRng, src: &str) -> String {
    use rand::Rng;
    let mut chars: Vec<char> = src.chars().collect();
    for _ in 0..rng.random_range(1..6) {
        if chars.is_empty() {
            break;
        }
        let at = rng.random_range(0..chars.len());
        match rng.random_range(0..3) {
            0 => {
                chars.remove(at);
            }
            1 => {
                let end = (at + rng.random_range(1..20)).min(chars.len());
                let dup: Vec<char> = chars[at..end].to_vec();
                chars.splice(at..at, dup);
            }
            _ => chars.insert(at, *pick(rng, &['{', '}', '%', '(', '"', '|', '-', ' '])),
        }
    }
    chars.into_iter().collect()
}

/// One render; every error names the problem. Returns (failed, seconds).
fn render_once(
    tpl: &ChatTemplate,
    messages: &[Value],
    tools: Option<&[Value]>,
    gen: bool,
) -> (bool, f64) {
    let t = std::time::Instant::now();
    let out = tpl.render(&ChatContext {
        messages,
        tools,
        add_generation_prompt: gen,
        bos_token: Some("<s>"),
        eos_token: Some("</s>"),
        extra: Default::default(),
    });
    let secs = t.elapsed().as_secs_f64();
    if let Err(e) = &out {
        let text = e.to_string();
        assert!(text.len() > 30, "a vague error: {text}");
        assert!(
            text.starts_with("the chat template")
                || text.starts_with("rendering the chat template"),
            "{text}"
        );
    }
    (out.is_err(), secs)
}

/// Thousands of random conversations through the real templates, random and mutated
/// templates through random conversations, and the data path's encoder over random JSONL
/// chats: no panic, no hang (each render is bounded by the engine's fuel), no unbounded
/// allocation, and every error says what went wrong. `HOSTILE_SEED=n` explores more.
#[test]
fn random_templates_and_conversations_never_panic_or_hang() {
    use rand::Rng;
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat_templates");
    let real: Vec<(String, String)> = [
        "hermes", "llama31", "llama32", "mistral", "qwen25", "smollm2",
    ]
    .iter()
    .map(|n| {
        (
            n.to_string(),
            std::fs::read_to_string(dir.join(format!("{n}.jinja"))).unwrap(),
        )
    })
    .collect();
    let mut rng = seeded(11);
    let (mut cases, mut errors, mut syntax, mut slowest) = (0usize, 0usize, 0usize, 0.0f64);
    let started = std::time::Instant::now();
    let conversation = |rng: &mut rand::rngs::StdRng| {
        let messages: Vec<Value> = (0..rng.random_range(0..7))
            .map(|_| random_message(rng))
            .collect();
        let tools: Option<Vec<Value>> = match rng.random_range(0..4) {
            0 => Some((0..rng.random_range(0..3)).map(|_| serde_json::json!({"type": "function", "function": {"name": random_text(rng), "parameters": random_json(rng, 1)}})).collect()),
            1 => Some(vec![random_json(rng, 0)]),
            _ => None,
        };
        (messages, tools)
    };
    let mut run = |tpl_src: &str, rng: &mut rand::rngs::StdRng, what: &str| {
        cases += 1;
        let tpl = match ChatTemplate::new(tpl_src) {
            Ok(t) => t,
            Err(e) => {
                syntax += 1;
                let text = e.to_string();
                assert!(matches!(e, TemplateError::Syntax(_)), "{what}: {text}");
                // minijinja names the line: "(in chat:N)".
                assert!(text.contains("chat:"), "{what}: no line in {text}");
                return;
            }
        };
        let (messages, tools) = conversation(rng);
        let (failed, secs) = render_once(&tpl, &messages, tools.as_deref(), rng.random());
        errors += usize::from(failed);
        slowest = slowest.max(secs);
        assert!(secs < 10.0, "{what}: a render took {secs:.1} s:\n{tpl_src}");
    };
    for i in 0..2_000 {
        let (name, src) = &real[i % real.len()];
        run(src, &mut rng, &format!("real template {name}, case {i}"));
    }
    for i in 0..3_000 {
        let src = random_template(&mut rng);
        run(&src, &mut rng, &format!("random template {i}:\n{src}"));
    }
    for i in 0..1_000 {
        let (name, src) = &real[i % real.len()];
        let src = mutate(&mut rng, src);
        run(&src, &mut rng, &format!("mutated {name}, case {i}"));
    }
    eprintln!(
        "{cases} template cases: {syntax} did not parse, {errors} renders failed cleanly; slowest render {slowest:.2} s; {:.1} s in all",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(cases, 6_000);
    assert!(syntax > 100 && errors > 100, "the generator lost its teeth");
}

/// Runaway templates stop quickly with a message that says why.
#[test]
fn runaway_templates_stop_with_a_clear_error() {
    let msgs = [serde_json::json!({"role": "user", "content": "hi"})];
    let ctx = ChatContext {
        messages: &msgs,
        ..Default::default()
    };
    for (src, needle) in [
        ("{% for i in range(10**9) %}x{% endfor %}", "range has too many elements"),
        (
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "instructions without finishing",
        ),
        ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursion"),
        ("{{ 'x' * 10**12 }}", "too large"),
        ("{% for i in range(1000) %}{{ 'x' * 10**8 }}{% endfor %}", "output passed"),
        ("{{ messages[0].content | indent(10**12) }}", "indent"),
        ("{{ messages | slice(10**12) | list }}", "slice"),
        ("{{ '%999999999999d' | format(1) }}", "format width"),
        ("{{ '{:>999999999999}'.format(1) }}", "format width"),
        ("{{ messages | tojson(indent=10**12) }}", "indent"),
        (
            "{% set ns = namespace(x=[]) %}{% for i in range(5000) %}{% set ns.x = [ns.x] %}{% endfor %}{{ ns.x | tojson }}",
            "nested deeper",
        ),
        // As deep as the fuel allows, printed and dropped: no stack overflow.
        (
            "{% set ns = namespace(x=[]) %}{% for i in range(1000) %}{% for j in range(1000) %}{% set ns.x = [ns.x] %}{% endfor %}{% endfor %}{{ ns.x }}",
            "instructions without finishing",
        ),
    ] {
        let t = std::time::Instant::now();
        let e = ChatTemplate::new(src)
            .unwrap()
            .render(&ctx)
            .expect_err(src)
            .to_string();
        let secs = t.elapsed().as_secs_f64();
        assert!(e.contains(needle), "{src}: {e}");
        assert!(secs < 10.0, "{src}: took {secs:.1} s");
        eprintln!("{secs:.3} s  {src}\n        → {e}");
    }
    // 200,000 levels, within the fuel: printed and dropped without overflowing the stack.
    let deep = "{% set ns = namespace(x=[]) %}{% for i in range(200) %}{% for j in range(1000) %}{% set ns.x = [ns.x] %}{% endfor %}{% endfor %}{{ ns.x | length }}|{{ ns.x }}";
    let out = ChatTemplate::new(deep).unwrap().render(&ctx).unwrap();
    assert!(
        out.starts_with("1|[[[[") && out.len() > 400_000,
        "{}",
        &out[..40]
    );
}

/// One instruction can double a value: within the fuel, a string or list grows past any
/// memory. In the worker process the render hits its memory ceiling, only the worker dies,
/// the error says why, and the same template renders the next conversation in a new worker.
#[test]
fn doubling_strings_and_lists_stop_at_the_worker_memory_ceiling() {
    for grow in [
        "{% set ns.v = ns.v ~ ns.v %}",
        "{% set ns.v = ns.v + ns.v %}",
        "{% set ns.v = [ns.v, ns.v] | join %}",
    ] {
        let init = if grow.contains("+") { "[1]" } else { "'ab'" };
        let src = format!(
            "{{% set ns = namespace(v={init}) %}}{{% if messages[0].content == 'boom' %}}\
             {{% for i in range(64) %}}{grow}{{% endfor %}}{{% endif %}}\
             {{{{ messages[0].content }}}}:{{{{ ns.v | length }}}}"
        );
        let tpl = ChatTemplate::isolated(&src, worker()).unwrap();
        let render = |content: &str| render_user(&tpl, content);
        let t = std::time::Instant::now();
        let e = render("boom").expect_err(grow).to_string();
        let secs = t.elapsed().as_secs_f64();
        eprintln!("{secs:.2} s  {grow}\n        → {e}");
        assert!(
            e.contains("needed more than 2 GiB of memory"),
            "{grow}: {e}"
        );
        assert!(secs < 60.0, "{grow}: {secs:.1} s");
        let ok = render("hi").unwrap();
        assert!(ok.starts_with("hi:"), "{ok}");
    }
}

/// A worker that cannot be started (the binary replaced mid-run) leaves renders in-process.
#[test]
fn an_unstartable_worker_falls_back_to_rendering_in_process() {
    let dir = tempfile::tempdir().unwrap();
    let tpl =
        ChatTemplate::isolated("{{ messages[0].content }}!", &dir.path().join("gone")).unwrap();
    let msgs = [serde_json::json!({"role": "user", "content": "hi"})];
    for _ in 0..3 {
        let ctx = ChatContext {
            messages: &msgs,
            ..Default::default()
        };
        assert_eq!(tpl.render(&ctx).unwrap(), "hi!");
    }
}

/// A few instructions that each copy a huge value run for minutes within the fuel: the
/// worker is stopped at the time limit, and the next render gets a new one.
#[test]
fn a_render_past_the_time_limit_is_stopped() {
    let src = "{% if messages[0].content == 'slow' %}{% set ns = namespace(s='x' * 10**8) %}\
               {% for i in range(100000) %}{% set ns.t = ns.s ~ 'y' %}{% endfor %}{% endif %}ok";
    let tpl = ChatTemplate::isolated(src, worker()).unwrap();
    let render = |content: &str| render_user(&tpl, content);
    let t = std::time::Instant::now();
    let e = render("slow").unwrap_err().to_string();
    let secs = t.elapsed().as_secs_f64();
    assert!(e.contains("took more than 30 s"), "{e}");
    assert!((29.0..60.0).contains(&secs), "{secs:.1} s");
    assert_eq!(render("fast").unwrap(), "ok");
}

/// The data path: random JSONL chats through the line parser and the encoder (rendering with
/// real and random templates, assistant spans from rendering offsets, tokenization) with the
/// real SmolLM2 tokenizer. No panic; every error names the file and line.
#[test]
fn random_chats_through_the_encoder_never_panic() {
    use rand::Rng;
    use your_ai::data::{parse_line, Encoder, Record};
    let g = your_ai::weights::GgufFile::open(&common::smollm2()).unwrap();
    let tokenizer = your_ai::data::tokenizer::Tokenizer::from_gguf(&g).unwrap();
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat_templates");
    let real: Vec<String> = [
        "hermes", "llama31", "llama32", "mistral", "qwen25", "smollm2",
    ]
    .iter()
    .map(|n| std::fs::read_to_string(dir.join(format!("{n}.jinja"))).unwrap())
    .collect();
    let mut rng = seeded(12);
    let (mut encoded, mut refused, mut failed) = (0, 0, 0);
    for i in 0..1_500 {
        let src = if i % 3 == 2 {
            random_template(&mut rng)
        } else {
            real[i % real.len()].clone()
        };
        let Ok(template) = ChatTemplate::new(&src) else {
            continue;
        };
        // Mostly well-formed turns, so that most lines get past the parser to the encoder.
        let mut messages: Vec<Value> = (0..rng.random_range(1..6))
            .map(|_| {
                if rng.random_bool(0.8) {
                    let role = *pick(&mut rng, &["system", "user", "assistant", "tool"]);
                    serde_json::json!({"role": role, "content": random_text(&mut rng)})
                } else {
                    random_message(&mut rng)
                }
            })
            .collect();
        if rng.random_bool(0.7) {
            messages
                .push(serde_json::json!({"role": "assistant", "content": random_text(&mut rng)}));
        }
        let line = serde_json::json!({"messages": messages}).to_string();
        let (example, fields) = match parse_line(&line) {
            Ok(x) => x,
            Err(e) => {
                assert!(!e.is_empty());
                refused += 1;
                continue;
            }
        };
        let enc = Encoder {
            tokenizer: &tokenizer,
            template: Some(template),
            mask_prompt: true,
            max_seq_length: 256,
        };
        let location = format!("fuzz.jsonl:{i}");
        let rec = Record {
            example,
            location: location.clone(),
            fields,
        };
        match enc.encode(&rec) {
            Ok(s) => {
                assert_eq!(s.ids.len(), s.trained.len());
                assert!(s.ids.len() <= 256);
                encoded += 1;
            }
            Err(e) => {
                let e = e.to_string();
                assert!(e.starts_with(&format!("{location}: ")), "{e}");
                failed += 1;
            }
        }
    }
    eprintln!("1500 chats: {refused} refused by the parser, {encoded} encoded, {failed} failed with file:line");
    assert!(
        encoded > 200 && failed > 50 && refused > 50,
        "the generator lost its teeth"
    );
}
