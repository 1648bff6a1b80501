//! Log lines for journald: when stderr is the journal's stream, each line starts with the
//! syslog priority (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug), which journald turns
//! into the entry's priority (so `journalctl -u fkr-qemu -p warning` works), and carries no
//! timestamp of its own (journald stamps every entry).

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Whether stderr is journald's stream: systemd sets `$JOURNAL_STREAM` to its `<dev>:<inode>`
/// (compared, because children inherit the variable with stderr redirected elsewhere).
pub fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    stream.to_str() == Some(&format!("{}:{}", meta.dev(), meta.ino()))
}

/// Wraps an event formatter, prefixing each event with its syslog priority.
#[derive(Debug, Clone)]
pub struct Priority<F> {
    inner: F,
}

impl<F> Priority<F> {
    pub fn new(inner: F) -> Self {
        Priority { inner }
    }
}

fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

impl<S, N, F> FormatEvent<S, N> for Priority<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "<{}>", priority(event.metadata().level()))?;
        self.inner.format_event(ctx, writer, event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_carry_their_priority_and_no_timestamp() {
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || out.clone())
            .with_ansi(false)
            .with_max_level(Level::DEBUG)
            .event_format(Priority::new(
                tracing_subscriber::fmt::format().without_time(),
            ))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!("e");
            tracing::warn!("w");
            tracing::info!("VM fr-0000000a started for job 5");
            tracing::debug!("d");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].starts_with("<3>ERROR"), "{text}");
        assert!(lines[1].starts_with("<4> WARN"), "{text}");
        assert!(lines[2].starts_with("<6> INFO"), "{text}");
        assert!(
            lines[2].ends_with("VM fr-0000000a started for job 5"),
            "{text}"
        );
        assert!(lines[3].starts_with("<7>DEBUG"), "{text}");
    }
}
