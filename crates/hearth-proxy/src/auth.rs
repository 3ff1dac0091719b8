//! What a request asks for: its guest port and its endpoint token.

use http::HeaderMap;

use crate::websocket::Offered;

/// The request header carrying the endpoint token.
pub const AUTH_HEADER: &str = "x-aws-proxy-auth";
/// The request header choosing the guest port.
pub const PORT_HEADER: &str = "x-aws-proxy-port";

/// Tokens are under 1 KiB; the reference caps header values at 8000 characters.
/// Anything longer is refused without asking the backend.
pub(crate) const MAX_TOKEN: usize = 8192;

/// The port header or port subprotocol is not a number in 1-65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BadPort;

/// The endpoint token a request carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Token {
    Missing,
    /// Present but unusable (not visible ASCII, or far too long).
    Invalid,
    Present(String),
}

/// The guest port: the `X-aws-proxy-port` header, else the WebSocket
/// subprotocol `lambda-microvms.port.N`, else `default`. More than one port
/// header is an error too.
pub(crate) fn port(headers: &HeaderMap, offered: &Offered, default: u16) -> Result<u16, BadPort> {
    let mut values = headers.get_all(PORT_HEADER).iter();
    match (values.next(), values.next()) {
        (Some(value), None) => value.to_str().map_err(|_| BadPort).and_then(parse_port),
        (Some(_), Some(_)) => Err(BadPort),
        (None, _) => match &offered.port {
            Some(text) => parse_port(text),
            None => Ok(default),
        },
    }
}

/// A decimal port in 1-65535 (ASCII digits only, so no sign or spaces).
pub(crate) fn parse_port(text: &str) -> Result<u16, BadPort> {
    let text = text.trim_matches(|c| c == ' ' || c == '\t');
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(BadPort);
    }
    match text.parse::<u16>() {
        Ok(0) | Err(_) => Err(BadPort),
        Ok(port) => Ok(port),
    }
}

/// The token from `X-aws-proxy-auth` (first value), else from the WebSocket
/// subprotocol `lambda-microvms.authentication.<token>`.
pub(crate) fn token(headers: &HeaderMap, offered: &Offered) -> Token {
    let text = match headers.get(AUTH_HEADER) {
        Some(value) => match value.to_str() {
            Ok(text) => text.trim(),
            Err(_) => return Token::Invalid,
        },
        None => match &offered.token {
            Some(text) => text.as_str(),
            None => return Token::Missing,
        },
    };
    if text.is_empty() {
        Token::Missing
    } else if text.len() > MAX_TOKEN {
        Token::Invalid
    } else {
        Token::Present(text.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                *name,
                HeaderValue::from_str(value).unwrap_or(HeaderValue::from_static("?")),
            );
        }
        map
    }

    #[test]
    fn ports() {
        let none = Offered::default();
        assert_eq!(port(&headers(&[]), &none, 8080), Ok(8080));
        assert_eq!(
            port(&headers(&[(PORT_HEADER, "3000")]), &none, 8080),
            Ok(3000)
        );
        assert_eq!(port(&headers(&[(PORT_HEADER, " 1 ")]), &none, 8080), Ok(1));
        assert_eq!(
            port(&headers(&[(PORT_HEADER, "65535")]), &none, 8080),
            Ok(65535)
        );
        for bad in [
            "", "0", "65536", "-1", "+80", "80a", "0x50", "8 0", "999999", "1e3",
        ] {
            assert_eq!(
                port(&headers(&[(PORT_HEADER, bad)]), &none, 8080),
                Err(BadPort),
                "{bad:?}"
            );
        }
        let two = headers(&[(PORT_HEADER, "80"), (PORT_HEADER, "80")]);
        assert_eq!(port(&two, &none, 8080), Err(BadPort));
        let ws = Offered {
            port: Some("9000".into()),
            ..Offered::default()
        };
        assert_eq!(port(&headers(&[]), &ws, 8080), Ok(9000));
        assert_eq!(port(&headers(&[(PORT_HEADER, "81")]), &ws, 8080), Ok(81));
        let bad_ws = Offered {
            port: Some("x".into()),
            ..Offered::default()
        };
        assert_eq!(port(&headers(&[]), &bad_ws, 8080), Err(BadPort));
    }

    #[test]
    fn tokens() {
        let none = Offered::default();
        assert_eq!(token(&headers(&[]), &none), Token::Missing);
        assert_eq!(token(&headers(&[(AUTH_HEADER, "")]), &none), Token::Missing);
        assert_eq!(
            token(&headers(&[(AUTH_HEADER, "t1")]), &none),
            Token::Present("t1".into())
        );
        let long = "x".repeat(MAX_TOKEN + 1);
        assert_eq!(
            token(&headers(&[(AUTH_HEADER, &long)]), &none),
            Token::Invalid
        );
        let mut binary = HeaderMap::new();
        binary.insert(
            AUTH_HEADER,
            HeaderValue::from_bytes(b"\xfft").unwrap_or(HeaderValue::from_static("?")),
        );
        assert_eq!(token(&binary, &none), Token::Invalid);
        let ws = Offered {
            token: Some("t2".into()),
            ..Offered::default()
        };
        assert_eq!(token(&headers(&[]), &ws), Token::Present("t2".into()));
        assert_eq!(
            token(&headers(&[(AUTH_HEADER, "t1")]), &ws),
            Token::Present("t1".into())
        );
    }
}
