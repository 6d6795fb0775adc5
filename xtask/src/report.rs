//! Printing: the machine, the date, tool versions and Markdown tables.

use crate::sys;

/// The machine a benchmark ran on, as printed above its table.
pub fn machine() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "(unknown: no model name in /proc/cpuinfo)".to_string());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines().find(|l| l.starts_with("MemTotal:")).and_then(|l| {
                l.trim_start_matches("MemTotal:").trim().trim_end_matches("kB").trim().parse::<u64>().ok()
            })
        })
        .map(|kib| sys::human(kib * 1024))
        .unwrap_or_else(|| "?".to_string());
    format!(
        "- Machine: {} CPUs (nproc), {model}, {mem} RAM, kernel {}\n- Date (start): {}",
        sys::first_line("nproc", &[]),
        sys::first_line("uname", &["-r"]),
        sys::first_line("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"]),
    )
}

/// A bullet line with the first output line of each `(program, args)`.
pub fn versions(tools: &[(&str, &[&str])]) -> String {
    let v: Vec<String> = tools.iter().map(|(p, a)| format!("`{}`", sys::first_line(p, a))).collect();
    format!("- Versions: {}", v.join(", "))
}

/// Renders a Markdown table; the first column is left-aligned, the others right-aligned.
pub fn table(header: &[String], rows: &[Vec<String>]) -> String {
    let cols = header.len();
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count().max(3)).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate().take(cols) {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::from("|");
        for (i, w) in width.iter().enumerate() {
            let c = cells.get(i).map(String::as_str).unwrap_or("");
            if i == 0 {
                s.push_str(&format!(" {c:<w$} |"));
            } else {
                s.push_str(&format!(" {c:>w$} |"));
            }
        }
        s
    };
    let mut out = line(header);
    out.push('\n');
    out.push('|');
    for (i, w) in width.iter().enumerate() {
        if i == 0 {
            out.push_str(&format!(" {} |", "-".repeat(*w)));
        } else {
            out.push_str(&format!(" {}: |", "-".repeat(w - 1)));
        }
    }
    out.push('\n');
    for r in rows {
        out.push_str(&line(r));
        out.push('\n');
    }
    out
}

/// An integer with thousands separators: `12,345`.
pub fn thousands(x: f64) -> String {
    let n = x.round().max(0.0) as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// A ratio like `0.85×`, or `n/a` when the denominator is zero.
pub fn ratio(num: f64, den: f64) -> String {
    if den > 0.0 { format!("{:.2}×", num / den) } else { "n/a".to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(ratio(1.0, 2.0), "0.50×");
        assert_eq!(ratio(1.0, 0.0), "n/a");
        let t = table(&["a".into(), "bb".into()], &[vec!["x".into(), "1".into()]]);
        assert_eq!(t, "| a   |  bb |\n| --- | --: |\n| x   |   1 |\n");
    }
}
