//! Bad input gets a clear JSON error and changes nothing (README, "API").

use serde_json::{Value, json};

use crate::harness::{Server, kinds};

async fn answer(request: reqwest::RequestBuilder) -> (u16, String) {
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    assert_eq!(response.headers()["content-type"], "application/json", "status {status}");
    let body: Value = response.json().await.unwrap();
    (status, body["detail"].as_str().expect("a detail").to_owned())
}

#[tokio::test]
async fn malformed_and_oversized_prompts() {
    let server = Server::start();
    let session = server.open_session().await;
    let url = format!("/api/session/{session}/prompt");
    let json_body = |body: &str| server.post(&url).header("content-type", "application/json").body(body.to_owned());

    assert_eq!(answer(json_body("{not json")).await.0, 400);
    assert_eq!(answer(json_body(r#"{"prompt": 5}"#)).await.0, 422);
    assert_eq!(answer(json_body(r#"{"model": "x"}"#)).await.0, 422);
    assert_eq!(answer(json_body(r#"[]"#)).await.0, 422);
    let (status, detail) = answer(json_body(r#"{"prompt": "  \n "}"#)).await;
    assert_eq!((status, detail.as_str()), (422, "prompt is empty"));
    // The body is read as JSON whatever its Content-Type says (curl --data).
    let (status, detail) = answer(server.post(&url).body(r#"{"prompt":""}"#)).await;
    assert_eq!((status, detail.as_str()), (422, "prompt is empty"));
    let form = server.post(&url).header("content-type", "application/x-www-form-urlencoded");
    assert_eq!(answer(form.body(r#"{"prompt":" "}"#)).await, (422, "prompt is empty".to_owned()));
    let (status, detail) = answer(server.post(&url).json(&json!({"prompt": "say a\u{0}b"}))).await;
    assert_eq!((status, detail.as_str()), (422, "prompt contains a NUL character"));
    let (status, detail) = answer(server.post(&url).json(&json!({"prompt": "hi", "model": "--evil"}))).await;
    assert_eq!(status, 422, "{detail}");

    let (status, detail) = answer(server.post(&url).json(&json!({"prompt": "a".repeat(100_001)}))).await;
    assert_eq!(status, 413);
    assert_eq!(detail, "prompt is 100001 characters; the limit is 100000");
    let (status, detail) = answer(server.post(&url).json(&json!({"prompt": "a".repeat(1_100_000)}))).await;
    assert_eq!(status, 413);
    assert!(detail.contains("larger than 1048576 bytes"), "{detail}");

    // Nothing above reached the log or the agent; the limit itself is accepted.
    assert!(server.agent_runs().is_empty());
    let events = server.run_turn(&session, &format!("replay basic\n{}", "b".repeat(99_980))).await;
    assert_eq!(kinds(&events)[0], "user");
    assert_eq!(events[0]["id"], 0, "the refused prompts left no trace in the log");
}

#[tokio::test]
async fn unknown_api_paths_and_methods_are_json() {
    let server = Server::start();
    assert_eq!(answer(server.get("/api/nope")).await, (404, "no such API endpoint".to_owned()));
    assert_eq!(answer(server.get("/api/session")).await.0, 405);
    assert_eq!(answer(server.client.get(server.url("/api/nope"))).await.0, 401, "auth comes first");
    let page = server.client.get(server.url("/nope")).send().await.unwrap();
    assert_eq!(page.status(), 404);
}

#[tokio::test]
async fn power_verbs_catalogue_and_refusals() {
    let server = Server::start();
    let catalogue: Value = server.get("/api/pve/verbs").send().await.unwrap().json().await.unwrap();
    assert_eq!(
        catalogue,
        json!({"verbs": ["cycle", "forensics", "reset", "start", "status", "stop"], "mutating": ["cycle", "reset", "start", "stop"]})
    );
    let (status, detail) = answer(server.post("/api/pve/reboot")).await;
    assert_eq!((status, detail.as_str()), (400, "unknown verb \"reboot\""));
    assert_eq!(answer(server.post("/api/pve/status;rm%20-rf%20%2F")).await.0, 400);
    let (status, detail) = answer(server.post("/api/pve/status")).await;
    assert_eq!((status, detail.as_str()), (503, "no hypervisor is configured: set BREAKGLASS_PVE_HOST"));
}

/// Whatever axum refuses before a handler runs (a query or path parameter
/// that does not parse) is an API error like any other: 400 and JSON.
#[tokio::test]
async fn malformed_queries_and_paths_answer_json_400() {
    let server = Server::start();
    let session = server.open_session().await;
    let get = |path: String| server.get(&path);
    let cases: Vec<(&str, reqwest::RequestBuilder)> = vec![
        ("a limit that is not a number", get("/api/sessions?limit=abc".into())),
        ("a negative limit", get("/api/sessions?limit=-1".into())),
        ("a limit beyond any integer", get("/api/sessions?limit=99999999999999999999999".into())),
        ("a limit given twice", get("/api/sessions?limit=1&limit=2".into())),
        ("an audit cursor that is not a number", get("/api/audit?before=yesterday".into())),
        ("an audit limit that is not a number", get("/api/audit?limit=1.5".into())),
        ("a format given twice", get(format!("/api/session/{session}/export?format=md&format=jsonl"))),
        ("a lastEventId given twice", get(format!("/api/session/{session}/stream?lastEventId=1&lastEventId=2"))),
        ("a session id that is not UTF-8", get("/api/session/%FF".into())),
        ("a session id that is not UTF-8, on a stream", get("/api/session/%FF/stream".into())),
        ("a session id that is not UTF-8, on a prompt", server.post("/api/session/%C0%AF/prompt")),
        ("a verb that is not UTF-8", server.post("/api/pve/%FF")),
    ];
    for (what, request) in cases {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let content_type = response.headers().get("content-type").cloned();
        let body = response.text().await.unwrap();
        assert_eq!(status, 400, "{what}: {body}");
        assert_eq!(content_type.as_ref().and_then(|v| v.to_str().ok()), Some("application/json"), "{what}: {body}");
        let detail: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{what}: {e}: {body}"));
        assert!(detail["detail"].as_str().is_some_and(|d| !d.is_empty()), "{what}: {body}");
    }
}
