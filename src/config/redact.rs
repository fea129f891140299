//! Credentials kept out of every line the agent writes: one display form of the export endpoint,
//! and the rule that credentials never travel in clear text to another host.

/// The endpoint as every log line, error and printout shows it: the userinfo
/// (`https://user:password@…`) and the query (`?api-key=…`) replaced by `<redacted>`; scheme,
/// host, port and path kept, so that an operator still sees where the agent sends.
pub fn endpoint(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rfind('@') {
        Some(at) => format!("<redacted>{}", &authority[at..]),
        None => authority.to_string(),
    };
    let tail = match tail.find('?') {
        Some(q) => format!("{}?<redacted>", &tail[..q]),
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
}

/// The host of an `http(s)://` URL, without brackets or port; `None` when there is none.
fn host(url: &str) -> Option<&str> {
    let (_, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let host_port = authority.rsplit('@').next()?;
    if let Some(v6) = host_port.strip_prefix('[') {
        return v6.split_once(']').map(|(h, _)| h);
    }
    Some(host_port.rsplit_once(':').map_or(host_port, |(h, _)| h))
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Why sending these credentials to `url` would expose them: an `http://` endpoint on another
/// host, with an `authorization` header or client TLS files (which only make sense over TLS).
/// Other headers, such as a tenant id for a multi-tenant store, stay allowed.
pub fn credentials_in_clear<'a>(
    url: &str,
    mut header_names: impl Iterator<Item = &'a str>,
    client_tls: bool,
) -> Result<(), String> {
    let plain = url
        .split_once("://")
        .is_some_and(|(scheme, _)| scheme.eq_ignore_ascii_case("http"));
    if !plain || host(url).is_none_or(is_loopback) {
        return Ok(());
    }
    if header_names.any(|n| n.trim().eq_ignore_ascii_case("authorization")) {
        return Err(format!(
            "an authorization header would cross the network in clear text to {}: use https:// \
             (plain http:// is for a collector on this host only)",
            endpoint(url)
        ));
    }
    if client_tls {
        return Err(format!(
            "client TLS files are set but {} is plain http://: use https://",
            endpoint(url)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_and_query_are_redacted_the_rest_kept() {
        assert_eq!(
            endpoint("https://agent:s3cret@otel.example:4318/v1/metrics?api-key=k@y#f"),
            "https://<redacted>@otel.example:4318/v1/metrics?<redacted>"
        );
        assert_eq!(
            endpoint("http://user@[::1]:4317"),
            "http://<redacted>@[::1]:4317"
        );
        for plain in ["http://localhost:4317", "http://c/p@th", "no-scheme@x"] {
            assert_eq!(endpoint(plain), plain);
        }
    }

    #[test]
    fn credentials_may_go_in_clear_only_to_this_host() {
        let auth = ["Authorization"];
        for ok in [
            "http://localhost:4317",
            "http://127.0.0.1:4318/v1/metrics",
            "http://[::1]:4317",
            "https://otel.example:4317",
        ] {
            assert_eq!(
                credentials_in_clear(ok, auth.into_iter(), true),
                Ok(()),
                "{ok}"
            );
        }
        let err = credentials_in_clear("http://u:p@otel.example:4317", auth.into_iter(), false)
            .unwrap_err();
        assert!(
            err.contains("authorization header") && !err.contains("u:p"),
            "{err}"
        );
        let err =
            credentials_in_clear("http://10.0.0.5:4317", std::iter::empty(), true).unwrap_err();
        assert!(err.contains("client TLS files"), "{err}");
        assert_eq!(
            credentials_in_clear(
                "http://otel.example:4317",
                ["x-scope-orgid"].into_iter(),
                false
            ),
            Ok(()),
            "a tenant header is no credential"
        );
    }
}
