fn main() {
    // With RUST_BACKTRACE set, candle captures a backtrace into each of its errors' messages: a
    // user's error stays one sentence (RUST_LIB_BACKTRACE governs library captures; panics
    // keep theirs). Set first, while this is the only thread.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    // A child of ours that renders chat templates under a memory ceiling (chat_template).
    if std::env::args_os().nth(1).as_deref()
        == Some(your_ai::data::chat_template::WORKER_ARG.as_ref())
    {
        std::process::exit(your_ai::data::chat_template::serve_worker());
    }
    your_ai::runtime::memory::configure_allocator();
    if let Ok(exe) = std::env::current_exe() {
        your_ai::data::chat_template::isolate_renders(exe);
    }
    let cli = match your_ai::cli::parse() {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(e.exit_code());
        }
    };
    // Output into a closed pipe (`your_ai models | head -1`) ends the process quietly, as Unix
    // tools do, instead of panicking in println!. The server keeps ignoring the signal: a
    // client that hangs up is an error on its socket, not the server's end.
    #[cfg(unix)]
    if !matches!(cli.command, your_ai::cli::Command::Serve(_)) {
        // SAFETY: restores the default disposition before any thread is started.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    init_logging(cli.verbose);
    match your_ai::runtime::device::set_threads(cli.threads) {
        Ok(n) => tracing::info!("{n} compute threads"),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(e.exit_code());
        }
    }
    if let Err(e) = your_ai::commands::run(cli) {
        eprintln!("error: {e}");
        std::process::exit(e.exit_code());
    }
}

/// Logs go to stderr; warnings only unless -v or RUST_LOG asks for more.
fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}
