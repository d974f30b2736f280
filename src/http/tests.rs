//! Unit tests of the HTTP layer: status mapping, the route table against the OpenAPI
//! document, query decoding, token comparison, panics in handlers.

use super::*;

#[test]
fn a_panicking_handler_answers_500_with_its_message() {
    let (status, Reply::Json(body)) = answer(|| panic!("boom")) else {
        panic!("not JSON")
    };
    assert_eq!(status, 500);
    assert_eq!(body["status"], "error");
    assert!(body["detail"].as_str().unwrap().contains("boom"));
    // The same thread goes on answering.
    let (status, _) = answer(|| Ok(Reply::Json(json!({}))));
    assert_eq!(status, 200);
}

#[test]
fn the_openapi_document_lists_exactly_the_routes() {
    let doc: Value = serde_json::from_str(openapi::OPENAPI).expect("openapi.json is JSON");
    let paths = doc["paths"].as_object().unwrap();
    assert_eq!(paths.len(), Route::ALL.len(), "{:?}", paths.keys());
    for (path, operations) in paths {
        let route =
            Route::of(path).unwrap_or_else(|| panic!("{path} is documented but not served"));
        let methods: Vec<&str> = operations
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            methods.join(", "),
            route.method_name().to_lowercase(),
            "{path}"
        );
    }
    for route in Route::ALL {
        let served = paths.keys().any(|path| Route::of(path) == Some(route));
        assert!(served, "{route:?} is served but not documented");
    }
}

#[test]
fn tokens_compare_whole() {
    assert!(constant_time_eq(b"secret", b"secret"));
    assert!(!constant_time_eq(b"secret", b"secret2"));
    assert!(!constant_time_eq(b"", b"secret"));
    assert!(!constant_time_eq(b"secreT", b"secret"));
}

#[test]
fn query_strings_are_decoded() {
    let query = Query::parse("/stats?run_id=a%2Fb+c&container_name=&x");
    assert_eq!(query.get("run_id"), Some("a/b c"));
    assert_eq!(query.get("container_name"), None);
    assert_eq!(percent_decode("%4"), "%4");
    assert_eq!(percent_decode("%zz"), "%zz");
    assert_eq!(percent_decode("100%"), "100%");
    // Two hex digits, not whatever u8::from_str_radix takes (it took \"+1\").
    assert_eq!(percent_decode("%+1"), "% 1");
}

#[test]
fn every_error_has_its_status() {
    use crate::ledger::{Amount, Shortage};
    let shortage = Shortage {
        resource: "instances".into(),
        asked: Amount::ONE,
        left: Amount::ZERO,
        max: Amount::ONE,
        waiting: 0,
    };
    for (error, status) in [
        (Error::BadRequest("x".into()), 400),
        (Error::Unauthorized, 401),
        (Error::RequestTimeout("x".into()), 408),
        (Error::UnknownInstance("x".into()), 404),
        (Error::UnknownRoute("/x".into()), 404),
        (
            Error::MethodNotAllowed {
                path: "/stats".into(),
                allowed: "GET",
            },
            405,
        ),
        (
            Error::RunIdInUse {
                run_id: "x".into(),
                state: "running",
            },
            409,
        ),
        (
            Error::Gone {
                run_id: "x".into(),
                reason: "job 1 ended: TIMEOUT".into(),
            },
            410,
        ),
        (Error::BodyTooLarge { limit: 1 }, 413),
        (Error::Insufficient(shortage), 429),
        (Error::Gateway(GatewayError::Invalid("x".into())), 400),
        (
            Error::Gateway(GatewayError::LimitReached(
                crate::gateway::LimitHit::Calls { calls: 1, limit: 1 },
            )),
            429,
        ),
        (Error::Internal("x".into()), 500),
        (
            Error::Gateway(GatewayError::Upstream {
                upstream: "a".into(),
                attempts: 1,
                source: ureq::Error::ConnectionFailed,
            }),
            502,
        ),
        (
            Error::Gateway(GatewayError::Timeout {
                upstream: "a".into(),
                attempts: 1,
                timeout: Duration::from_secs(1),
            }),
            504,
        ),
        (Error::ShuttingDown, 503),
        (Error::Overloaded("x".into()), 503),
    ] {
        assert_eq!(status_of(&error), status, "{error:?}");
    }
}

#[test]
fn a_stream_key_is_seen_however_it_is_spelled() {
    assert!(may_stream(
        br#"{"run_id": "a", "cmd": "ls", "stream": true}"#
    ));
    assert!(may_stream(
        br#"{"run_id": "a", "cmd": "ls", "\u0073tream": true}"#
    ));
    assert!(may_stream(
        br#"{"run_id": "a", "cmd": "ls", "str\u0065am" : true}"#
    ));
    assert!(!may_stream(br#"{"run_id": "a", "cmd": "echo stream"}"#));
    let escaped = br#"{"run_id": "a", "cmd": "ls", "\u0073tream": true}"#;
    let command = crate::api::ExecCommand::parse(escaped).unwrap();
    assert!(command.stream, "the parser reads the escaped key as stream");
}
