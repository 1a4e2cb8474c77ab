//! Chat templates rendered with minijinja the way transformers renders them with Jinja2:
//! `trim_blocks` and `lstrip_blocks` on, `raise_exception` and `strftime_now` available, a
//! `tojson` that writes like Python's `json.dumps` (non-ASCII kept), and Python string/dict
//! methods (`.strip()`, `.startswith()`, `.items()`, ...) from minijinja-contrib.

use super::SpecialTokens;
use crate::error::{Error, Result};
use minijinja::value::{Kwargs, Value};
use minijinja::{context, Environment, ErrorKind};
use serde::Serialize;

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Rendering limits. Templates come from the files a model ships with, so a template is untrusted
/// input: it may loop, recurse, build huge values or print without end (docs/fuzzing.md). Real
/// templates use a few thousand steps per message and a few KB of output.
///
/// Interpreter steps (minijinja's fuel): a 2000-message conversation takes about 46 000 with
/// SmolLM2's template; a bare nested loop spends all of it in about half a second.
pub(crate) const FUEL: u64 = 10_000_000;
/// Nesting of macro calls and includes.
const RECURSION_LIMIT: usize = 100;
/// The rendered prompt.
pub(crate) const MAX_OUTPUT_BYTES: usize = 4 << 20;
/// Memory a render may take beyond what the process already holds (Linux: enforced in a child).
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
pub(crate) const MAX_MEMORY_BYTES: u64 = 1 << 30;
/// CPU time of one render (Linux: enforced in a child), a backstop behind the fuel.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
const MAX_CPU_SECONDS: u64 = 20;
/// `tojson(indent=...)`: Python accepts any width; templates use 2 or 4.
const MAX_JSON_INDENT: usize = 64;
/// Nesting of a value given to `tojson` (a namespace can hold itself).
const MAX_JSON_DEPTH: usize = 64;

pub(super) fn render(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    special: &SpecialTokens,
) -> Result<String> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_fuel(Some(FUEL));
    env.set_recursion_limit(RECURSION_LIMIT);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("raise_exception: {msg}"),
            ))
        },
    );
    env.add_function(
        "strftime_now",
        |fmt: String| -> std::result::Result<Value, minijinja::Error> {
            Ok(Value::from(strftime_utc(&fmt, now_unix_seconds())))
        },
    );
    env.add_filter("tojson", tojson);

    let compiled = env.template_from_str(template).map_err(|e| {
        Error::InvalidArgument(format!("chat template does not parse: {}", describe(&e)))
    })?;
    let ctx = context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        tools => Value::from(()),
        documents => Value::from(()),
        bos_token => special.bos.as_deref(),
        eos_token => special.eos.as_deref(),
        unk_token => special.unk.as_deref(),
        pad_token => special.pad.as_deref(),
        additional_special_tokens => special.additional.clone(),
    };
    isolated(|| render_bounded(&compiled, ctx)).map_err(Error::InvalidArgument)
}

/// Render with the fuel and recursion limits of the environment and the output cap.
fn render_bounded(
    template: &minijinja::Template<'_, '_>,
    ctx: Value,
) -> std::result::Result<String, String> {
    let mut out = CappedWriter {
        buf: Vec::new(),
        exceeded: false,
    };
    let rendered = template.render_captured_to(ctx, &mut out).map(drop);
    match rendered {
        Ok(()) => String::from_utf8(out.buf)
            .map_err(|_| "chat template: the output is not valid UTF-8".to_string()),
        Err(_) if out.exceeded => Err(output_limit_message()),
        Err(e) if e.kind() == ErrorKind::OutOfFuel => Err(format!(
            "chat template: step limit exceeded: rendering took more than {FUEL} steps \
             (a loop without end?)"
        )),
        Err(e) => Err(format!("chat template failed: {}", describe(&e))),
    }
}

fn output_limit_message() -> String {
    format!(
        "chat template: output limit exceeded: the rendered prompt is larger than {} MiB",
        MAX_OUTPUT_BYTES >> 20
    )
}

/// A writer that refuses to grow past [`MAX_OUTPUT_BYTES`].
struct CappedWriter {
    buf: Vec<u8>,
    exceeded: bool,
}

impl std::io::Write for CappedWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + data.len() > MAX_OUTPUT_BYTES {
            self.exceeded = true;
            return Err(std::io::Error::other(output_limit_message()));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Run a render in a forked child limited to [`MAX_MEMORY_BYTES`] more address space and
/// [`MAX_CPU_SECONDS`] of CPU. minijinja's own operators (`~`, `+`, `{% set %}` blocks, `join`)
/// build strings without a size limit, so only a process limit bounds the memory a template can
/// take; the child's result (at most the output cap) comes back through a pipe.
#[cfg(target_os = "linux")]
fn isolated(
    render: impl FnOnce() -> std::result::Result<String, String>,
) -> std::result::Result<String, String> {
    use std::io::Read;
    use std::os::fd::FromRawFd;

    let mut fds = [0i32; 2];
    // SAFETY: creates two descriptors owned by this function.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!(
            "chat template: cannot start the renderer: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: the child only renders (allocating through the system allocator, which stays
    // usable after fork), writes to the pipe and leaves with _exit, never returning here.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        let e = std::io::Error::last_os_error();
        // SAFETY: closing the descriptors created above.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
        return Err(format!("chat template: cannot start the renderer: {e}"));
    }
    if pid == 0 {
        // SAFETY: the child's own copies of the descriptors; limits apply to the child only.
        unsafe {
            libc::close(fds[0]);
            limit_this_process();
        }
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(render))
            .unwrap_or_else(|_| Err("chat template: the renderer panicked".to_string()));
        let (tag, body) = match &outcome {
            Ok(text) => (0u8, text.as_bytes()),
            Err(msg) => (1u8, msg.as_bytes()),
        };
        write_all_fd(fds[1], &[tag]);
        write_all_fd(fds[1], body);
        // SAFETY: ends the child without running the parent's exit handlers or destructors.
        unsafe { libc::_exit(0) }
    }

    // SAFETY: the parent's copy of the write end is not needed; the read end is owned here.
    unsafe { libc::close(fds[1]) };
    let pipe = unsafe { std::fs::File::from_raw_fd(fds[0]) };
    let cap = MAX_OUTPUT_BYTES as u64 + (64 << 10);
    let mut bytes = Vec::new();
    let read = pipe.take(cap).read_to_end(&mut bytes);
    let overfull = bytes.len() as u64 >= cap;
    if read.is_err() || overfull {
        // SAFETY: pid is our child, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let mut status = 0;
    loop {
        // SAFETY: reaps our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            break;
        }
    }
    if libc::WIFSIGNALED(status) {
        let signal = libc::WTERMSIG(status);
        return Err(match signal {
            libc::SIGXCPU => format!(
                "chat template: time limit exceeded: rendering took more than {MAX_CPU_SECONDS} s of CPU"
            ),
            libc::SIGKILL if overfull => output_limit_message(),
            _ => format!(
                "chat template: memory limit exceeded: rendering needed more than {} MiB of memory \
                 or overflowed its stack (the renderer stopped with signal {signal})",
                MAX_MEMORY_BYTES >> 20
            ),
        });
    }
    match (read, bytes.split_first()) {
        (Ok(_), Some((0, text))) if !overfull => String::from_utf8(text.to_vec())
            .map_err(|_| "chat template: the output is not valid UTF-8".to_string()),
        (Ok(_), Some((1, msg))) => Err(String::from_utf8_lossy(msg).into_owned()),
        _ => Err(format!(
            "chat template: the renderer ended without a result (wait status {status})"
        )),
    }
}

#[cfg(not(target_os = "linux"))]
fn isolated(
    render: impl FnOnce() -> std::result::Result<String, String>,
) -> std::result::Result<String, String> {
    render()
}

/// Lower this process's address-space, CPU and core-dump limits for a render; stderr goes to
/// /dev/null so that the allocator's or stack guard's abort message does not reach the user
/// (the parent reports the limit instead).
#[cfg(target_os = "linux")]
unsafe fn limit_this_process() {
    let page = libc::sysconf(libc::_SC_PAGESIZE).max(4096) as u64;
    let current = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map(|pages| pages * page);
    let lower = |resource, value: u64| {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(resource, &mut lim) == 0 {
            lim.rlim_cur = value.min(lim.rlim_max);
            libc::setrlimit(resource, &lim);
        }
    };
    if let Some(current) = current {
        lower(libc::RLIMIT_AS, current.saturating_add(MAX_MEMORY_BYTES));
    }
    lower(libc::RLIMIT_CPU, MAX_CPU_SECONDS);
    lower(libc::RLIMIT_CORE, 0);
    let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
    if null >= 0 {
        libc::dup2(null, 2);
        libc::close(null);
    }
}

#[cfg(target_os = "linux")]
fn write_all_fd(fd: i32, mut data: &[u8]) {
    while !data.is_empty() {
        // SAFETY: writes from a live slice to a descriptor this process owns.
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if n > 0 {
            data = &data[n as usize..];
        } else if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
        {
            continue;
        } else {
            return;
        }
    }
}

/// The error with its cause chain, so `raise_exception`'s message reaches the user.
fn describe(e: &minijinja::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

fn limit_error(msg: String) -> minijinja::Error {
    minijinja::Error::new(ErrorKind::InvalidOperation, msg)
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent)`.
fn tojson(
    value: Value,
    indent: Option<Value>,
    kwargs: Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        Some(i) => Some(i),
        None => indent,
    };
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.as_i64() {
            Some(n) if (0..=MAX_JSON_INDENT as i64).contains(&n) => Some(n as usize),
            _ => {
                return Err(limit_error(format!(
                "chat template: tojson indent {v} is outside the limit of 0 to {MAX_JSON_INDENT}"
            )))
            }
        },
    };
    // transformers accepts these too; we always write like its defaults.
    for key in ["ensure_ascii", "separators", "sort_keys"] {
        let _: Option<Value> = kwargs.get(key)?;
    }
    kwargs.assert_all_used()?;
    let json = to_json(&value, 0)?;
    let mut out = String::new();
    write_python_json(&json, indent, 0, &mut out).map_err(|()| {
        limit_error(format!(
            "chat template: tojson output limit exceeded: more than {} MiB",
            MAX_OUTPUT_BYTES >> 20
        ))
    })?;
    Ok(Value::from_safe_string(out))
}

/// A template value as JSON, as its serde form, refusing nesting deeper than [`MAX_JSON_DEPTH`].
fn to_json(v: &Value, depth: usize) -> std::result::Result<serde_json::Value, minijinja::Error> {
    use minijinja::value::ValueKind as K;
    use serde_json::Value as J;
    if depth > MAX_JSON_DEPTH {
        return Err(limit_error(format!(
            "chat template: tojson nesting limit of {MAX_JSON_DEPTH} exceeded (a value that contains itself?)"
        )));
    }
    Ok(match v.kind() {
        K::Undefined | K::None => J::Null,
        K::Bool => J::Bool(v.is_true()),
        K::Number => {
            if let Some(i) = v.as_i64() {
                J::from(i)
            } else if let Ok(f) = f64::try_from(v.clone()) {
                serde_json::Number::from_f64(f).map_or(J::Null, J::Number)
            } else {
                serde_json::to_value(v).map_err(|e| limit_error(format!("tojson: {e}")))?
            }
        }
        K::String => J::String(v.as_str().unwrap_or_default().to_string()),
        K::Seq | K::Iterable => {
            let mut items = Vec::new();
            for item in v.try_iter()? {
                items.push(to_json(&item, depth + 1)?);
            }
            J::Array(items)
        }
        K::Map => {
            let mut map = serde_json::Map::new();
            for key in v.try_iter()? {
                let item = v.get_item(&key)?;
                let key = key.as_str().map_or_else(|| key.to_string(), str::to_string);
                map.insert(key, to_json(&item, depth + 1)?);
            }
            J::Object(map)
        }
        _ => serde_json::to_value(v).map_err(|e| limit_error(format!("tojson: {e}")))?,
    })
}

/// `json.dumps` layout: `", "`/`": "` separators inline, `","`/`": "` with newlines when indented.
/// Fails once the text passes [`MAX_OUTPUT_BYTES`].
fn write_python_json(
    v: &serde_json::Value,
    indent: Option<usize>,
    level: usize,
    out: &mut String,
) -> std::result::Result<(), ()> {
    use serde_json::Value as J;
    if out.len() > MAX_OUTPUT_BYTES {
        return Err(());
    }
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        J::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                write_python_json(item, indent, level + 1, out)?;
            }
            newline(out, level);
            out.push(']');
        }
        J::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                out.push_str(&serde_json::Value::String(k.clone()).to_string());
                out.push_str(": ");
                write_python_json(item, indent, level + 1, out)?;
            }
            newline(out, level);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
    if out.len() > MAX_OUTPUT_BYTES {
        return Err(());
    }
    Ok(())
}

fn now_unix_seconds() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Civil date from days since 1970-01-01 (proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A subset of C `strftime` (the directives chat templates use), in UTC.
pub(crate) fn strftime_utc(fmt: &str, unix_seconds: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = unix_seconds.div_euclid(86_400);
    let secs = unix_seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (secs / 3600, secs / 60 % 60, secs % 60);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let day_of_year = days - civil_days(year, 1, 1) + 1;
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('H') => out.push_str(&format!("{hour:02}")),
            Some('I') => out.push_str(&format!("{hour12:02}")),
            Some('M') => out.push_str(&format!("{minute:02}")),
            Some('S') => out.push_str(&format!("{second:02}")),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('B') => out.push_str(MONTHS[month as usize - 1]),
            Some('b') | Some('h') => out.push_str(&MONTHS[month as usize - 1][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('j') => out.push_str(&format!("{day_of_year:03}")),
            Some('F') => out.push_str(&format!("{year}-{month:02}-{day:02}")),
            Some('T') => out.push_str(&format!("{hour:02}:{minute:02}:{second:02}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 of a civil date.
fn civil_days(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = month as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_matches_known_dates() {
        // 2024-02-29T13:05:09Z, a Thursday, day 60 of a leap year (date -u -d @1709211909).
        let t = 1_709_211_909;
        assert_eq!(strftime_utc("%Y-%m-%d %H:%M:%S", t), "2024-02-29 13:05:09");
        assert_eq!(strftime_utc("%d %b %Y", t), "29 Feb 2024");
        assert_eq!(
            strftime_utc("%A %B %j %I%p %%", t),
            "Thursday February 060 01PM %"
        );
        assert_eq!(strftime_utc("%F", 0), "1970-01-01");
    }

    #[test]
    fn tojson_writes_like_python_json_dumps() {
        let v: serde_json::Value =
            serde_json::from_str(r#"{"a": [1, 2], "b": "é<", "c": {}}"#).unwrap_or_default();
        let mut inline = String::new();
        write_python_json(&v, None, 0, &mut inline).expect("small");
        // json.dumps({"a": [1, 2], "b": "é<", "c": {}}, ensure_ascii=False)
        assert_eq!(inline, r#"{"a": [1, 2], "b": "é<", "c": {}}"#);
        let mut indented = String::new();
        write_python_json(&v, Some(2), 0, &mut indented).expect("small");
        assert_eq!(
            indented,
            "{\n  \"a\": [\n    1,\n    2\n  ],\n  \"b\": \"é<\",\n  \"c\": {}\n}"
        );
    }
}
