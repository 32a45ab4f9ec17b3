//! The page's fixed parts: escaping, the style sheet and the one inline script (sortable tables,
//! sample filter). Nothing is fetched: no external script, style sheet or font.

use std::fmt::Write;

/// Text as HTML (element content and quoted attribute values).
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// A number with thin thousands separators (the raw value goes in `data-v`).
pub fn num(n: u64) -> String {
    let s = n.to_string();
    let mut o = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            o.push('\u{202f}');
        }
        o.push(ch);
    }
    o
}

pub fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

/// A numeric cell: shown with separators, sorted and read by tests through `data-v`.
pub fn td_num(o: &mut String, n: u64) {
    let _ = write!(o, "<td class=n data-v=\"{n}\">{}</td>", num(n));
}

/// A sortable table's head (a click on a column sorts by it; numeric cells by `data-v`).
pub fn thead(o: &mut String, id: &str, columns: &[&str]) {
    let _ = write!(o, "<table class=sortable id=\"{}\"><thead><tr>", esc(id));
    for c in columns {
        let _ = write!(o, "<th>{}</th>", esc(c));
    }
    o.push_str("</tr></thead><tbody>");
}

/// Seconds since 1970 as `YYYY-MM-DD HH:MM:SS UTC` (days to civil date: H. Hinnant's algorithm).
pub fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

pub const STYLE: &str = r#"
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#24364b;color:#fff;padding:14px 24px}
header h1{margin:0 0 4px;font-size:20px}
header .sub{opacity:.8;font-size:13px}
nav{position:sticky;top:0;background:#eef1f5;border-bottom:1px solid #d5dbe3;padding:6px 24px;z-index:2}
nav a{margin-right:16px;color:#24364b;text-decoration:none;font-weight:600}
main{padding:8px 24px 40px}
section{margin:18px 0 28px}
h2{font-size:17px;border-bottom:2px solid #d5dbe3;padding-bottom:3px}
h3{font-size:15px;margin:14px 0 6px}
table{border-collapse:collapse;background:#fff;margin:6px 0;font-size:13px}
th,td{border:1px solid #dde2e8;padding:3px 8px;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.sortable th{cursor:pointer;background:#eef1f5;user-select:none;white-space:nowrap}
table.sortable th:after{content:" \2195";opacity:.35}
table.sortable th.asc:after{content:" \2191";opacity:1}
table.sortable th.desc:after{content:" \2193";opacity:1}
dl.kv{display:grid;grid-template-columns:max-content auto;gap:2px 14px;margin:6px 0}
dl.kv dt{font-weight:600;color:#555}
dl.kv dd{margin:0;font-family:ui-monospace,monospace;font-size:12.5px;word-break:break-all}
.charts{display:flex;flex-wrap:wrap;gap:10px}
.charts figure{margin:0;background:#fff;border:1px solid #dde2e8}
.note{color:#666;font-size:12.5px}
details{margin:6px 0}
summary{cursor:pointer;font-weight:600}
.sample{background:#fff;border:1px solid #d5dbe3;border-radius:4px;margin:14px 0;padding:10px 14px}
.sample h3{margin:0 0 4px}
.sample .meta{font-size:12.5px;color:#555}
pre.conv{white-space:pre-wrap;word-break:break-word;background:#f6f7f9;border:1px solid #e3e6ea;padding:8px;font-size:12.5px;max-height:32em;overflow:auto}
pre.conv mark{background:#c8f0c8;color:#064b06;border-radius:2px}
pre.conv .img{background:#dfe8f7;color:#1d3f78;border:1px dashed #6a8cc7;border-radius:3px;padding:0 3px}
.tiles{display:flex;flex-wrap:wrap;gap:12px;margin-top:8px}
.tiles figure{margin:0}
.tiles figcaption{font-size:12px;color:#555}
.tiles img{border:1px solid #ccc;image-rendering:auto;max-width:100%}
.legend mark{background:#c8f0c8;color:#064b06}
.legend .img{background:#dfe8f7;border:1px dashed #6a8cc7;padding:0 3px}
input#filter{padding:3px 6px;width:24em}
"#;

/// Sorting (click a header; numbers by `data-v`) and the sample filter. Runs on the page's own
/// elements only.
pub const SCRIPT: &str = r#"
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, col) {
    th.addEventListener('click', function () {
      var asc = !th.classList.contains('asc');
      table.querySelectorAll('th').forEach(function (h) { h.classList.remove('asc', 'desc'); });
      th.classList.add(asc ? 'asc' : 'desc');
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      var key = function (tr) {
        var td = tr.cells[col];
        if (!td) return '';
        var v = td.getAttribute('data-v');
        return v !== null && v !== '' && !isNaN(Number(v)) ? Number(v) : td.textContent;
      };
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        var c = typeof x === 'number' && typeof y === 'number' ? x - y : String(x).localeCompare(String(y));
        return asc ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
var filter = document.getElementById('filter');
if (filter) {
  filter.addEventListener('input', function () {
    var q = filter.value.toLowerCase();
    document.querySelectorAll('.sample').forEach(function (s) {
      s.style.display = s.getAttribute('data-key').toLowerCase().indexOf(q) >= 0 ? '' : 'none';
    });
  });
}
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_formats() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        assert_eq!(num(1234567), "1\u{202f}234\u{202f}567");
        assert_eq!(num(12), "12");
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_796_601_600 + 3_725), "2026-12-07 01:02:05 UTC");
    }
}
