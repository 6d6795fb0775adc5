//! Presentation helpers: sizes (parsing and printing), local times, aligned tables.

use chrono::{Local, TimeZone};

/// Parses a size such as `4096`, `512M`, `2G`, `1GiB` or `64k` into bytes. Suffixes are
/// binary (1K = 1024) and case-insensitive: K, M, G, T, P, optionally followed by `iB` or
/// `B`; a bare `B` means bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "invalid size '{text}': write a whole number of bytes, optionally followed by K, M, G or T \
             (binary: 1K = 1024), e.g. 4096, 512M or 2G"
        )
    };
    let t = text.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits_end == 0 {
        return Err(bad());
    }
    let number: u64 = t[..digits_end].parse().map_err(|_| bad())?;
    let suffix = t[digits_end..].trim().to_ascii_lowercase();
    let shift = match suffix.as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        _ => return Err(bad()),
    };
    number.checked_mul(1u64 << shift).ok_or_else(|| format!("invalid size '{text}': too large"))
}

/// [`parse_size`] as a clap value parser.
pub fn parse_size_arg(text: &str) -> Result<u64, String> {
    parse_size(text)
}

/// A size for people: `0 B`, `512 B`, `4.0 KiB`, `1.5 GiB`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A size as the user asked to see it: exact bytes with `--bytes`, else [`human_size`].
pub fn size(bytes: u64, exact: bool) -> String {
    if exact { bytes.to_string() } else { human_size(bytes) }
}

/// Nanoseconds since the epoch as local time, `2024-05-01 13:45:02`.
pub fn local_time(ns: u64) -> String {
    let secs = (ns / 1_000_000_000) as i64;
    let nanos = (ns % 1_000_000_000) as u32;
    match Local.timestamp_opt(secs, nanos).single() {
        Some(t) => t.format("%Y-%m-%d %H:%M:%S").to_string(),
        None => "-".to_string(),
    }
}

/// How long ago `ms` (milliseconds since the epoch) was: `4 s ago`, `3 min ago`, `2 h ago`.
pub fn age_since_ms(ms: u64) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let secs = now.saturating_sub(ms) / 1000;
    match secs {
        0..120 => format!("{secs} s ago"),
        120..7200 => format!("{} min ago", secs / 60),
        _ => format!("{} h ago", secs / 3600),
    }
}

/// Nanoseconds since the epoch as an RFC 3339 local time with offset, for JSON.
pub fn rfc3339(ns: u64) -> String {
    let secs = (ns / 1_000_000_000) as i64;
    let nanos = (ns % 1_000_000_000) as u32;
    match Local.timestamp_opt(secs, nanos).single() {
        Some(t) => t.to_rfc3339_opts(chrono::SecondsFormat::Secs, false),
        None => String::new(),
    }
}

/// How a table column is aligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    /// Text, padded on the right.
    Left,
    /// Numbers, padded on the left.
    Right,
}

/// A table printed with aligned columns separated by two spaces.
#[derive(Debug)]
pub struct Table {
    headers: Vec<(&'static str, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new(headers: &[(&'static str, Align)]) -> Table {
        Table { headers: headers.to_vec(), rows: Vec::new() }
    }

    /// Adds a row (missing cells print empty).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as text, one line per row, header first.
    pub fn render(&self) -> String {
        let n = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|(h, _)| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(n) {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.headers.iter().map(|(h, _)| h.to_string()).collect();
        for cells in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, (_, align)) in self.headers.iter().enumerate() {
                let cell = cells.get(i).map(String::as_str).unwrap_or("");
                let pad = widths[i].saturating_sub(cell.chars().count());
                if i > 0 {
                    line.push_str("  ");
                }
                match align {
                    Align::Right => {
                        line.push_str(&" ".repeat(pad));
                        line.push_str(cell);
                    }
                    Align::Left => {
                        line.push_str(cell);
                        if i + 1 < n {
                            line.push_str(&" ".repeat(pad));
                        }
                    }
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Now, in nanoseconds since the Unix epoch.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("2 T"), Ok(2 << 40));
        for bad in ["", "G", "12Q", "1.5G", "-1", "1GG", "abc", "99999999999999999999"] {
            assert!(parse_size(bad).is_err(), "{bad} accepted");
        }
        assert!(parse_size("12Q").unwrap_err().contains("512M"));
        assert!(parse_size("20000000T").is_err());
    }

    #[test]
    fn sizes_print() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "1023 B");
        assert_eq!(human_size(4096), "4.0 KiB");
        assert_eq!(human_size(3 << 29), "1.5 GiB");
        assert_eq!(size(3 << 29, true), "1610612736");
    }

    #[test]
    fn table_aligns() {
        let mut t = Table::new(&[("ID", Align::Right), ("NAME", Align::Left), ("SIZE", Align::Right)]);
        t.row(vec!["0".into(), "a".into(), "1 B".into()]);
        t.row(vec!["10".into(), "long name".into(), "2.0 GiB".into()]);
        let s = t.render();
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], "ID  NAME          SIZE");
        assert_eq!(lines[1], " 0  a              1 B");
        assert_eq!(lines[2], "10  long name  2.0 GiB");
    }
}
