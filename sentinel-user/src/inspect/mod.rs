//! Body inspection: which bodies an agent is sent (content types, size
//! caps), and their safe decompression (`decompress`).

pub mod decompress;

/// The media type of a `Content-Type` value, lowercased, without
/// parameters: `application/json` for `Application/JSON; charset=utf-8`.
pub fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Whether `content_type` is one of `eligible` (already lowercased media
/// types, as the configuration stores them).
pub fn eligible(content_type: Option<&str>, eligible: &[String]) -> bool {
    match content_type {
        Some(ct) => {
            let media = media_type(ct);
            eligible.contains(&media)
        }
        None => false,
    }
}

/// Whether the media type is text a guardrail can read.
pub fn textual(content_type: Option<&str>) -> bool {
    let Some(ct) = content_type else {
        return false;
    };
    let media = media_type(ct);
    media.starts_with("text/")
        || media.ends_with("+json")
        || media.ends_with("+xml")
        || matches!(
            media.as_str(),
            "application/json"
                | "application/xml"
                | "application/x-www-form-urlencoded"
                | "application/javascript"
                | "application/graphql"
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types_ignore_case_and_parameters() {
        let types = vec!["application/json".to_owned(), "text/plain".to_owned()];
        assert!(eligible(Some("Application/JSON; charset=utf-8"), &types));
        assert!(eligible(Some("text/plain"), &types));
        assert!(!eligible(Some("text/html"), &types));
        assert!(!eligible(None, &types));
        assert!(textual(Some("application/vnd.api+json")));
        assert!(!textual(Some("image/png")));
    }
}
