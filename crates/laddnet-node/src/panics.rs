//! Panics as one structured log event each, and a count.
//!
//! The standard library's hook writes free-form lines to stderr (and, with
//! `RUST_BACKTRACE` set, symbolizes a backtrace there: about 200 µs on this
//! project's machines, in the panicking session actor's way). A node
//! replaces it: a panic in a session actor is an event supervision
//! handles, so it is logged like the node's other events, with the thread
//! and the source location, and counted in `laddnet_panics_total`.
//!
//! Only a literal message (`panic!("…")`, `unreachable!()`) is logged
//! verbatim. A message formatted at run time can carry whatever the
//! failing code held (a token, a name), and logs never hold personal data:
//! it is withheld, and the location says where to look. A backtrace is
//! added when `RUST_BACKTRACE` (or `RUST_LIB_BACKTRACE`) asks for one; it
//! names functions and lines only.

use std::backtrace::{Backtrace, BacktraceStatus};
use std::panic::PanicHookInfo;
use std::sync::atomic::{AtomicU64, Ordering};

static PANICS: AtomicU64 = AtomicU64::new(0);

/// Panics in this process since it started.
pub fn count() -> u64 {
    PANICS.load(Ordering::Relaxed)
}

/// Replaces the process's panic hook with [`log_panic`].
pub fn install_hook() {
    std::panic::set_hook(Box::new(log_panic));
}

/// The hook: counts the panic and logs it as one `error` event.
pub fn log_panic(info: &PanicHookInfo<'_>) {
    PANICS.fetch_add(1, Ordering::Relaxed);
    if !tracing::enabled!(target: "laddnet::panic", tracing::Level::ERROR) {
        return;
    }
    let location = info
        .location()
        .map_or_else(|| "unknown".to_string(), |l| format!("{}:{}", l.file(), l.line()));
    let message = match info.payload().downcast_ref::<&'static str>() {
        Some(literal) => *literal,
        None => "(formatted at run time; withheld, it may hold personal data)",
    };
    let thread = std::thread::current();
    let thread = thread.name().unwrap_or("unnamed");
    let backtrace = Backtrace::capture();
    if backtrace.status() == BacktraceStatus::Captured {
        tracing::error!(target: "laddnet::panic", thread, location, panic_message = message, backtrace = %backtrace, "panicked");
    } else {
        tracing::error!(target: "laddnet::panic", thread, location, panic_message = message, "panicked");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Log output captured from the current thread's subscriber.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Runs `f` on a thread of its own whose panic goes through
    /// [`log_panic`] (called from a catch, as the hook would be: the
    /// process-wide hook is left alone so other tests' panics print as
    /// usual), and returns the JSON line it logged.
    fn logged(f: impl FnOnce() + Send + std::panic::UnwindSafe + 'static) -> serde_json::Value {
        // The hook is the process's: one test swaps it at a time.
        static HOOK: Mutex<()> = Mutex::new(());
        let _swap = HOOK.lock().unwrap_or_else(|p| p.into_inner());
        let out = Captured::default();
        let writer = out.clone();
        std::thread::Builder::new()
            .name("panicky".into())
            .spawn(move || {
                let subscriber = tracing_subscriber::fmt()
                    .json()
                    .with_writer(move || writer.clone())
                    .finish();
                tracing::subscriber::with_default(subscriber, || {
                    let previous = std::panic::take_hook();
                    std::panic::set_hook(Box::new(log_panic));
                    let caught = std::panic::catch_unwind(f);
                    std::panic::set_hook(previous);
                    assert!(caught.is_err());
                });
            })
            .unwrap()
            .join()
            .unwrap();
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let line = text
            .lines()
            .find(|l| l.contains("panicked"))
            .unwrap_or_else(|| panic!("no panic event in {text:?}"));
        serde_json::from_str(line).unwrap()
    }

    #[test]
    fn a_panic_is_one_structured_event_with_its_location() {
        let before = count();
        let event = logged(|| panic!("injected session fault"));
        assert_eq!(event["level"], "ERROR");
        assert_eq!(event["target"], "laddnet::panic");
        let fields = &event["fields"];
        assert_eq!(fields["panic_message"], "injected session fault");
        assert_eq!(fields["thread"], "panicky");
        let location = fields["location"].as_str().unwrap();
        assert!(location.starts_with("crates/laddnet-node/src/panics.rs:"), "{location}");
        assert!(count() > before);
    }

    #[test]
    fn a_formatted_message_is_withheld() {
        let token = "04A1B2C3D4E5F6";
        let event = logged(move || panic!("card {token} refused"));
        let line = event.to_string();
        assert!(!line.contains(token), "{line}");
        assert!(event["fields"]["panic_message"].as_str().unwrap().contains("withheld"));
        assert!(event["fields"]["location"].as_str().unwrap().contains("panics.rs"));
    }
}
