//! TOML and serde errors as a user reads them: the key's full name
//! (`limits.max_connections`) and what value was expected, in words, instead of a
//! snippet and Rust type names ("expected usize"). Owns wording only; must not read files.

/// `message` is the `toml` error text for `text`: "TOML parse error at line L, column
/// C", a snippet, then serde's message on the last line.
pub fn describe(text: &str, message: &str) -> String {
    let serde_message = message.lines().last().unwrap_or(message).trim();
    let key = line_number(message).and_then(|n| key_at(text, n));
    let said = words(serde_message);
    match (key, line_number(message)) {
        (Some(key), _) => format!("{key}: {said}"),
        (None, Some(n)) => format!("line {n}: {said}"),
        (None, None) => said,
    }
}

fn line_number(message: &str) -> Option<usize> {
    let rest = &message[message.find("at line ")? + "at line ".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// `table.key` for the `key = value` on line `n` (1-based), from the nearest
/// `[table]` header above it.
fn key_at(text: &str, n: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let line = lines.get(n.checked_sub(1)?)?;
    let key = line.split_once('=')?.0.trim().trim_matches('"');
    if key.is_empty() {
        return None;
    }
    let table = lines[..n - 1].iter().rev().find_map(|l| {
        let l = l.trim();
        (l.starts_with('[') && l.ends_with(']')).then(|| l.trim_matches(['[', ']']).trim())
    });
    Some(match table {
        Some(t) if !t.is_empty() => format!("{t}.{key}"),
        _ => key.to_owned(),
    })
}

/// "invalid type: string \"lots\", expected usize" → "expected a whole number, got
/// the string \"lots\"".
fn words(message: &str) -> String {
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(prefix) {
            if let Some((got, expected)) = rest.rsplit_once(", expected ") {
                return format!(
                    "expected {}, got {}",
                    expected_words(expected),
                    got_words(got)
                );
            }
        }
    }
    if let Some(rest) = message.strip_prefix("unknown field ") {
        return format!("unknown key {}", rest.replace('`', ""));
    }
    if let Some(rest) = message.strip_prefix("unknown variant ") {
        return format!("unknown value {}", rest.replace('`', ""));
    }
    if message == "invalid socket address syntax" {
        return "expected an address and port such as \"127.0.0.1:8080\"".into();
    }
    message.to_owned()
}

fn expected_words(expected: &str) -> String {
    match expected.trim() {
        "usize" | "u8" | "u16" | "u32" | "u64" | "u128" => "a whole number (0 or more)".into(),
        "isize" | "i8" | "i16" | "i32" | "i64" | "i128" => "a whole number".into(),
        "f32" | "f64" => "a number".into(),
        "a boolean" | "bool" => "true or false".into(),
        "a string" | "a borrowed string" => "a string (in quotes)".into(),
        "socket address" => "an address and port such as \"127.0.0.1:8080\"".into(),
        "path string" => "a path (a string in quotes)".into(),
        other => other.replace('`', ""),
    }
}

fn got_words(got: &str) -> String {
    let got = got.trim();
    for (kind, words) in [
        ("string ", "the string "),
        ("integer ", "the number "),
        ("floating point ", "the number "),
        ("boolean ", ""),
    ] {
        if let Some(v) = got.strip_prefix(kind) {
            return format!("{words}{}", v.trim_matches('`'));
        }
    }
    match got {
        "sequence" => "a list".into(),
        "map" => "a table".into(),
        other => other.replace('`', ""),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_string_for_a_number_is_said_in_words() {
        let text = "[limits]\nmax_connections = \"lots\"\n";
        let message = "TOML parse error at line 2, column 19\n  |\n2 | max_connections = \"lots\"\n  |                   ^^^^^^\ninvalid type: string \"lots\", expected usize";
        assert_eq!(
            super::describe(text, message),
            "limits.max_connections: expected a whole number (0 or more), got the string \"lots\""
        );
    }
}
