//! `hearth logs ID [-f] [--since WHEN] [--json]`: a microVM's app output
//! through `GET /hearth/2025-09-09/microvms/{id}/logs`. Plain output prints
//! each line's message, stdout lines to stdout and stderr lines to stderr;
//! `--json` prints each event as one JSON line on stdout.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::Value;

use crate::connect::ConnectArgs;

/// Longest event line accepted from the server while following.
const MAX_EVENT_LINE: usize = 4 * 1024 * 1024;

#[derive(Debug, Args)]
pub struct AppLogsArgs {
    /// MicroVM id.
    id: String,
    /// Keep printing new lines until the microVM is terminated.
    #[arg(short, long)]
    follow: bool,
    /// Only lines from this long ago (`90s`, `10m`, `2h`, `1d`) or since this
    /// time (RFC 3339, e.g. `2026-12-06T21:00:00Z`, or epoch milliseconds).
    #[arg(long, value_name = "DURATION_OR_TIME")]
    since: Option<String>,
    #[command(flatten)]
    pub(crate) connect: ConnectArgs,
}

pub async fn logs(args: AppLogsArgs) -> Result<()> {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let since = args
        .since
        .as_deref()
        .map(|text| parse_since(text, now_ms))
        .transpose()?;
    let client = args.connect.client()?;
    let base = format!("/hearth/2025-09-09/microvms/{}/logs", args.id);
    let mut query: Vec<String> = Vec::new();
    if let Some(since) = since {
        query.push(format!("since={since}"));
    }
    let json = args.connect.json;
    if args.follow {
        query.push("follow=true".into());
        let mut body = client
            .get_extension_stream(&format!("{base}?{}", query.join("&")))
            .await?;
        let mut pending: Vec<u8> = Vec::new();
        while let Some(chunk) = body.chunk().await? {
            pending.extend_from_slice(&chunk);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let event: Value = serde_json::from_slice(&line[..end])
                    .context("the server sent a malformed event")?;
                print_event(&event, json)?;
            }
            if pending.len() > MAX_EVENT_LINE {
                bail!("the server sent an event line longer than {MAX_EVENT_LINE} bytes");
            }
        }
        return Ok(());
    }
    let mut offset: Option<String> = None;
    loop {
        let mut page_query = query.clone();
        if let Some(offset) = &offset {
            page_query.push(format!("offset={offset}"));
        }
        let page = client
            .call_extension(
                http::Method::GET,
                &format!("{base}?{}", page_query.join("&")),
                serde_json::json!({}),
            )
            .await?;
        let events = page
            .get("events")
            .and_then(Value::as_array)
            .map_or(&[][..], Vec::as_slice);
        for event in events {
            print_event(event, json)?;
        }
        let next = page
            .get("nextOffset")
            .and_then(Value::as_str)
            .map(str::to_string);
        if events.is_empty() || next.is_none() || next == offset {
            return Ok(());
        }
        offset = next;
    }
}

fn print_event(event: &Value, json: bool) -> Result<()> {
    if json {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{event}")?;
        out.flush()?;
        return Ok(());
    }
    let message = event.get("message").and_then(Value::as_str).unwrap_or("");
    if event.get("stream").and_then(Value::as_str) == Some("stderr") {
        let mut err = std::io::stderr().lock();
        writeln!(err, "{message}")?;
        err.flush()?;
    } else {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{message}")?;
        out.flush()?;
    }
    Ok(())
}

/// `--since` as epoch milliseconds: a duration back from `now_ms`, an RFC
/// 3339 time, or epoch milliseconds.
fn parse_since(text: &str, now_ms: u64) -> Result<u64> {
    let text = text.trim();
    if let Some(duration_ms) = parse_duration_ms(text) {
        return Ok(now_ms.saturating_sub(duration_ms));
    }
    if let Ok(ms) = text.parse::<u64>() {
        return Ok(ms);
    }
    parse_rfc3339_ms(text).with_context(|| {
        format!("--since {text:?}: expected a duration (10m, 2h), an RFC 3339 time or epoch ms")
    })
}

fn parse_duration_ms(text: &str) -> Option<u64> {
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let unit_ms = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    number.checked_mul(unit_ms)
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`.
pub(crate) fn parse_rfc3339_ms(text: &str) -> Option<u64> {
    let bytes = text.as_bytes();
    if bytes.len() < 20 || !matches!(bytes[10], b'T' | b't' | b' ') {
        return None;
    }
    let field = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = text.get(range)?;
        part.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    let (year, month, day) = (field(0..4)?, field(5..7)?, field(8..10)?);
    let (hour, minute, second) = (field(11..13)?, field(14..16)?, field(17..19)?);
    if bytes[4] != b'-' || bytes[7] != b'-' || bytes[13] != b':' || bytes[16] != b':' {
        return None;
    }
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    let mut rest = &text[19..];
    let mut millis = 0i64;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let padded = format!("{:0<3}", &fraction[..digits.min(3)]);
        millis = padded.parse().ok()?;
        rest = &fraction[digits..];
    }
    let offset_minutes = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            if rest.len() != 6 || rest.as_bytes()[3] != b':' {
                return None;
            }
            let hours: i64 = rest[1..3].parse().ok()?;
            let minutes: i64 = rest[4..6].parse().ok()?;
            sign * (hours * 60 + minutes)
        }
    };
    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset_minutes * 60;
    u64::try_from(seconds * 1000 + millis).ok()
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_accepts_durations_times_and_epoch_ms() {
        let now = 1_796_515_200_000;
        assert_eq!(parse_since("10m", now).ok(), Some(now - 600_000));
        assert_eq!(parse_since("2h", now).ok(), Some(now - 7_200_000));
        assert_eq!(parse_since("1d", now).ok(), Some(now - 86_400_000));
        assert_eq!(parse_since("1500ms", now).ok(), Some(now - 1500));
        assert_eq!(parse_since("42", now).ok(), Some(42));
        assert_eq!(
            parse_since("2026-12-06T00:00:00Z", now).ok(),
            Some(1_796_515_200_000)
        );
        assert_eq!(
            parse_since("2026-12-06T01:30:00.25+01:30", now).ok(),
            Some(1_796_515_200_250)
        );
        assert_eq!(
            parse_since("2000-02-29T00:00:00Z", now).ok(),
            Some(951_782_400_000)
        );
        for bad in [
            "",
            "10x",
            "yesterday",
            "2026-13-01T00:00:00Z",
            "2026-12-06T00:00:00",
        ] {
            assert!(parse_since(bad, now).is_err(), "{bad}");
        }
    }
}
