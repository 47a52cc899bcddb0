//! Secrets out of text that is shown: URLs carry passwords (`amqp://user:pw@host`) and
//! API keys (`https://host/hook?api_key=...`) as often as headers do.

/// What a secret is replaced with.
pub const REDACTED: &str = "<redacted>";

/// `url` with the password of its user info and the value of every query parameter
/// replaced by [`REDACTED`]; everything else (scheme, user, host, path, fragment) as
/// written, so that the URL an operator configured is still recognisable. Text that is
/// not a URL has only its query, if any, redacted.
pub fn url(url: &str) -> String {
    let (before_fragment, fragment) = match url.split_once('#') {
        Some((b, f)) => (b, Some(f)),
        None => (url, None),
    };
    let (base, query) = match before_fragment.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (before_fragment, None),
    };
    let mut out = String::with_capacity(url.len());
    match base.split_once("://") {
        Some((scheme, rest)) => {
            out.push_str(scheme);
            out.push_str("://");
            let (authority, path) = match rest.find('/') {
                Some(i) => rest.split_at(i),
                None => (rest, ""),
            };
            match authority.rsplit_once('@') {
                Some((userinfo, host)) => {
                    match userinfo.split_once(':') {
                        Some((user, _password)) => {
                            out.push_str(user);
                            out.push(':');
                            out.push_str(REDACTED);
                        }
                        None => out.push_str(userinfo),
                    }
                    out.push('@');
                    out.push_str(host);
                }
                None => out.push_str(authority),
            }
            out.push_str(path);
        }
        None => out.push_str(base),
    }
    if let Some(query) = query {
        out.push('?');
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, _value)) => format!("{name}={REDACTED}"),
                None => pair.to_owned(),
            })
            .collect();
        out.push_str(&pairs.join("&"));
    }
    if let Some(fragment) = fragment {
        out.push('#');
        out.push_str(fragment);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_and_query_values_go() {
        assert_eq!(
            url("amqp://guest:s3cret@127.0.0.1:5672/%2f"),
            "amqp://guest:<redacted>@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            url("https://u:p@a:8/hook?api_key=K1&flag&b=2#top"),
            "https://u:<redacted>@a:8/hook?api_key=<redacted>&flag&b=<redacted>#top"
        );
        // A password holding '@' still goes whole.
        assert_eq!(
            url("redis://:p@ss@h:6379/0"),
            "redis://:<redacted>@h:6379/0"
        );
        assert_eq!(url("http://a/b"), "http://a/b");
        assert_eq!(url("not a url?token=x"), "not a url?token=<redacted>");
    }
}
