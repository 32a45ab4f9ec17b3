//! The `--help` checker run by both binaries' CLI tests (issue 16): every flag and argument of
//! every subcommand has a description, every subcommand ends with an example, and every README
//! section a help text points at exists.

use std::path::Path;
use std::process::Command;

/// `BIN ARGS --help` (stdout); fails the test when it does not succeed.
pub fn help(bin: &str, args: &[&str]) -> String {
    let out = Command::new(bin)
        .args(args)
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("{bin} starts: {e}"));
    assert!(out.status.success(), "{bin} {args:?} --help failed");
    String::from_utf8(out.stdout).expect("UTF-8 help")
}

/// The subcommands listed under `Commands:` (without `help`).
pub fn subcommands(top: &str) -> Vec<String> {
    top.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|c| *c != "help")
        .collect()
}

/// Flags and arguments of a help text that have no description: an entry line (`  -x`,
/// `  --flag`, `  <ARG>`, `  [ARG]`) whose text ends with its name and value, with no indented
/// line under it.
pub fn undescribed(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut missing = Vec::new();
    let mut in_section = false;
    for (i, line) in lines.iter().enumerate() {
        if !line.starts_with(' ') && !line.is_empty() {
            in_section = line.starts_with("Options:") || line.starts_with("Arguments:");
            continue;
        }
        if !in_section {
            continue;
        }
        let t = line.trim_start();
        let indent = line.len() - t.len();
        let is_entry = indent <= 6
            && (t.starts_with('-') || t.starts_with('<') || t.starts_with('['))
            && !t.starts_with("[default");
        if !is_entry {
            continue;
        }
        // Same-line description: two spaces after the flag spec.
        if t.contains("  ") {
            continue;
        }
        // Next-line description: the next non-empty line is indented further.
        let next = lines[i + 1..].iter().find(|l| !l.trim().is_empty());
        let described = next.is_some_and(|n| {
            let nt = n.trim_start();
            n.len() - nt.len() > indent && !nt.starts_with('-')
        });
        if !described {
            missing.push(t.to_string());
        }
    }
    missing
}

/// The README sections (`README, "…"` or `README's "…"`) a help text names that `readme` has
/// no heading for.
pub fn missing_readme_sections(text: &str, readme: &str) -> Vec<String> {
    let headings: Vec<String> = readme
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| l.trim_start_matches('#').trim().replace('`', ""))
        .collect();
    let mut missing = Vec::new();
    for part in text.split("README").skip(1) {
        let Some(rest) = part
            .trim_start_matches(['\'', 's', ',', ':', ' '])
            .strip_prefix('"')
        else {
            continue;
        };
        let Some(end) = rest.find('"') else { continue };
        let section = rest[..end].replace('`', "");
        if !headings.contains(&section) {
            missing.push(section);
        }
    }
    missing
}

/// Everything wrong with the help of `bin` (named `name` in the messages) and its subcommands:
/// undescribed flags, subcommands without an `Examples:` section, README sections that do not
/// exist. Also returns the subcommands it walked, for the caller's sanity checks.
pub fn problems(name: &str, bin: &str, readme: &Path) -> (Vec<String>, Vec<String>) {
    let readme = std::fs::read_to_string(readme).expect("README.md");
    let top = help(bin, &[]);
    let subs = subcommands(&top);
    let mut problems = Vec::new();
    let texts = std::iter::once((String::new(), top.clone()))
        .chain(subs.iter().map(|s| (format!(" {s}"), help(bin, &[s]))));
    for (sub, text) in texts {
        for flag in undescribed(&text) {
            problems.push(format!("{name}{sub}: {flag} has no description"));
        }
        if !sub.is_empty() && !text.contains("Examples:") {
            problems.push(format!("{name}{sub}: no Examples: section"));
        }
        for section in missing_readme_sections(&text, &readme) {
            problems.push(format!(
                "{name}{sub}: README section \"{section}\" does not exist"
            ));
        }
    }
    (problems, subs)
}

/// Fails the test on any of [`problems`], or when fewer than `at_least` subcommands (one of them
/// `must_have`) were found.
pub fn assert_complete(name: &str, bin: &str, readme: &Path, at_least: usize, must_have: &str) {
    let (problems, subs) = problems(name, bin, readme);
    assert!(
        subs.len() >= at_least && subs.iter().any(|s| s == must_have),
        "{name}: subcommands found: {subs:?}"
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checker_sees_a_missing_description() {
        let text = "Usage: x\n\nOptions:\n      --shards <SHARDS>\n      --lr <LR>  Peak learning rate\n      --output <DIR>\n          Output folder\n  -h, --help\n          Print help\n";
        assert_eq!(undescribed(text), vec!["--shards <SHARDS>".to_string()]);
    }

    #[test]
    fn the_checker_sees_a_section_that_does_not_exist() {
        let readme = "# Top\n## The `build` step\n";
        let text = "See the README, \"The `build` step\", and README's \"Nowhere\".";
        assert_eq!(
            missing_readme_sections(text, readme),
            vec!["Nowhere".to_string()]
        );
    }
}
