//! `your_ai serve`: loads the model and the named adapters, starts the generation thread and
//! the HTTP server, and prints the URL to give clients.

use crate::cli::ServeArgs;
use crate::error::{Error, Result};
use crate::model::lora::Adapter;
use crate::serve::{router, worker, App, QUEUE};
use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

pub fn run(a: ServeArgs) -> Result<()> {
    if a.api_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
        return Err(Error::Usage(
            "--api-key (or YOUR_AI_API_KEY) is empty: no request could match it; give a key, or leave it unset for no key".into(),
        ));
    }
    // Checked before the model loads.
    let cors = crate::serve::access::cors(&a.cors_origin).map_err(Error::Usage)?;
    let template = match &a.chat_template {
        Some(path) => {
            let bad =
                |why: String| Error::Usage(format!("--chat-template {}: {why}", path.display()));
            let src = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
            crate::data::chat_template::ChatTemplate::new(&src).map_err(|e| bad(e.to_string()))?;
            Some(src)
        }
        None => None,
    };
    let opts = crate::model::args::decode_options(&a.model, a.quantize.quantize)?;
    let mut loaded = crate::model::load(&a.model.model, &opts, None)?;
    if template.is_some() {
        loaded.tokenizer.chat_template = template;
    }
    let mut adapters = HashMap::new();
    let mut names = vec![];
    for (name, dir) in &a.adapter {
        if *name == loaded.name || adapters.contains_key(name) {
            return Err(Error::Usage(format!(
                "--adapter {name}={}: the name `{name}` is already taken (the base model is `{}`); give each adapter its own name",
                dir.display(),
                loaded.name
            )));
        }
        let adapter = Adapter::load_peft(dir, &loaded.model.cfg, &loaded.model.device)
            .map_err(|e| {
                Error::Usage(format!(
                    "--adapter {name}={}: {e}\n(give the directory `train` wrote, with adapter_config.json and adapter_model.safetensors)",
                    dir.display()
                ))
            })?;
        eprintln!(
            "adapter `{name}`: {} (rank {})",
            dir.display(),
            adapter.cfg.rank
        );
        adapters.insert(name.clone(), adapter);
        names.push(name.clone());
    }
    if !is_loopback(&a.host) && a.api_key.is_none() {
        eprintln!(
            "warning: --host {} accepts requests from other machines and no --api-key is set: anyone who can reach it can use the model",
            a.host
        );
    }
    let tokenizer = Arc::new(loaded.tokenizer);
    let context = loaded.model.cfg.max_position_embeddings;
    let (jobs, queue) = std::sync::mpsc::sync_channel(QUEUE);
    let worker_tok = tokenizer.clone();
    let model = loaded.model;
    let stopping = Arc::new(AtomicBool::new(false));
    let worker_stopping = stopping.clone();
    std::thread::Builder::new()
        .name("generate".into())
        .spawn(move || worker::run(model, worker_tok, adapters, queue, worker_stopping))
        .map_err(|e| Error::io("start the generation thread for", &a.model.model, e))?;
    let app = Arc::new(App {
        base: loaded.name.clone(),
        adapters: names.clone(),
        tokenizer,
        context,
        // Clients' tokens are compared trimmed (a header value's edges are not part of it).
        api_key: a.api_key.as_deref().map(|k| k.trim().to_string()),
        kv_cache: a.kv.kv_cache,
        jobs,
        next_id: AtomicU64::new(1),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::io("start the server's runtime for", &a.model.model, e))?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port))
            .await
            .map_err(|e| {
                Error::Usage(format!(
                    "--host {} --port {}: cannot listen there: {e} (is another server on that port? pick another with --port)",
                    a.host, a.port
                ))
            })?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io("read the listening address of", &a.host, e))?;
        let models: Vec<String> = std::iter::once(loaded.name.clone()).chain(names).collect();
        println!(
            "your_ai serve: OpenAI-compatible API at http://{addr}/v1 (models: {}); Ctrl-C stops",
            models.join(", ")
        );
        let _ = std::io::stdout().flush();
        axum::serve(listener, router(app, cors))
            .with_graceful_shutdown(shutdown(stopping))
            .await
            .map_err(|e| Error::io("serve on", addr.to_string(), e))
    })
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Resolves on Ctrl-C or SIGTERM, after setting `stopping`: the running generation ends at
/// its next token, waiting ones are turned away, and the server closes once their clients
/// have their answers. A second signal exits at once.
async fn shutdown(stopping: Arc<AtomicBool>) {
    signal().await;
    stopping.store(true, Ordering::Relaxed);
    eprintln!("your_ai serve: stopping (again to stop at once)");
    tokio::spawn(async {
        // A client that reads nothing would keep its connection, and the server, open.
        tokio::select! {
            _ = signal() => {
                eprintln!("your_ai serve: stopped at once");
                std::process::exit(130);
            }
            _ = tokio::time::sleep(GRACE) => {
                eprintln!(
                    "your_ai serve: stopped; connections still open after {} s were closed",
                    GRACE.as_secs()
                );
                std::process::exit(0);
            }
        }
    });
}

/// How long a stopping server waits for its clients to take their last answers.
const GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// The next Ctrl-C or SIGTERM.
async fn signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
