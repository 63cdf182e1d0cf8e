//! `application/x-www-form-urlencoded` text: query strings and form
//! bodies, as records and challenges read them.

/// `a=1&b=x%20y` as decoded pairs.
pub fn pairs(text: &str) -> impl Iterator<Item = (String, String)> + '_ {
    text.split('&').filter(|p| !p.is_empty()).map(|pair| {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(name), percent_decode(value))
    })
}

/// `%XX` escapes and `+` decoded; a malformed escape is kept as is.
pub fn percent_decode(text: &str) -> String {
    fn digit(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(h), Some(l)) => digit(*h).zip(digit(*l)).map(|(h, l)| h << 4 | l),
            _ => None,
        };
        match (decoded, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
            }
            (None, b'+') => {
                out.push(b' ');
                i += 1;
            }
            (None, b) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_escapes_and_plus_and_keeps_malformed_ones() {
        assert_eq!(percent_decode("%2Fa%20b+c%zz%"), "/a b c%zz%");
        let got: Vec<_> = pairs("a=1&&b=x%20y&c").collect();
        assert_eq!(
            got,
            [
                ("a".into(), "1".into()),
                ("b".into(), "x y".into()),
                ("c".into(), String::new())
            ]
        );
    }
}
