//! The embedded web console (README "The web console"): served from the binary with types,
//! validators and a strict content security policy; presets from config.

use serde_json::Value;

use crate::harness::Server;

#[tokio::test]
async fn the_console_is_served_from_the_binary_with_a_strict_policy() {
    let server = Server::start();
    let page = server.client.get(server.url("/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let h = page.headers().clone();
    assert_eq!(h["content-type"], "text/html; charset=utf-8");
    assert_eq!(h["cache-control"], "no-cache");
    assert_eq!(h["x-content-type-options"], "nosniff");
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self';"), "{csp}");
    assert!(!csp.contains("unsafe-inline"));
    let etag = h["etag"].to_str().unwrap().to_owned();
    let html = page.text().await.unwrap();
    assert!(html.contains(r#"<script type="module" src="/app.js"></script>"#));
    assert_eq!(html.matches("<script").count(), 1, "no inline script");
    for needed in [
        r#"name="viewport""#,
        "viewport-fit=cover",
        r#"name="theme-color""#,
        "apple-mobile-web-app-capable",
        r#"rel="manifest""#,
    ] {
        assert!(html.contains(needed), "{needed}");
    }

    let again = server.client.get(server.url("/")).header("If-None-Match", &etag).send().await.unwrap();
    assert_eq!(again.status(), 304);

    for (path, content_type) in [
        ("/app.js", "text/javascript; charset=utf-8"),
        ("/transcript.js", "text/javascript; charset=utf-8"),
        ("/approval.js", "text/javascript; charset=utf-8"),
        ("/style.css", "text/css; charset=utf-8"),
        ("/manifest.webmanifest", "application/manifest+json; charset=utf-8"),
        ("/icon.svg", "image/svg+xml"),
        ("/sw.js", "text/javascript; charset=utf-8"),
    ] {
        let response = server.client.get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(response.headers()["content-type"], content_type, "{path}");
    }
    for (path, size) in [("/icon-192.png", 192u32), ("/icon-512.png", 512)] {
        let png = server.client.get(server.url(path)).send().await.unwrap().bytes().await.unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{path}");
        let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
        let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
        assert_eq!((width, height), (size, size), "{path}");
    }
    let manifest: Value =
        server.client.get(server.url("/manifest.webmanifest")).send().await.unwrap().json().await.unwrap();
    assert_eq!(manifest["display"], "standalone");
    assert_eq!(manifest["icons"].as_array().unwrap().len(), 3);

    assert_eq!(server.client.get(server.url("/nope.js")).send().await.unwrap().status(), 404);
    assert_eq!(server.client.get(server.url("/test/transcript.test.mjs")).send().await.unwrap().status(), 404);
    assert_eq!(server.client.post(server.url("/")).send().await.unwrap().status(), 405);
}

#[tokio::test]
async fn presets_come_from_the_configuration() {
    let server = Server::start();
    let defaults: Value = server.get("/api/presets").send().await.unwrap().json().await.unwrap();
    let labels: Vec<_> = defaults["presets"].as_array().unwrap().iter().map(|p| p["label"].as_str().unwrap()).collect();
    assert_eq!(labels, ["Triage", "Memory/OOM", "Disk", "Services", "QEMU wedged?"]);

    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("presets.toml");
    std::fs::write(&toml, "[[preset]]\nlabel = \"Web tier\"\nprompt = \"Is nginx on web01 serving?\"\n").unwrap();
    let server = Server::options().env("BREAKGLASS_PRESETS_FILE", toml.display().to_string()).start();
    let got: Value = server.get("/api/presets").send().await.unwrap().json().await.unwrap();
    assert_eq!(got["presets"], serde_json::json!([{"label": "Web tier", "prompt": "Is nginx on web01 serving?"}]));

    let json = dir.path().join("presets.json");
    std::fs::write(&json, r#"{"presets": [{"label": "DB", "prompt": "Is postgres up?"}]}"#).unwrap();
    let server = Server::options().env("BREAKGLASS_PRESETS_FILE", json.display().to_string()).start();
    let got: Value = server.get("/api/presets").send().await.unwrap().json().await.unwrap();
    assert_eq!(got["presets"][0]["label"], "DB");

    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"[{"label": "", "prompt": "x"}]"#).unwrap();
    let refused =
        crate::harness::spawn(dir.path(), &Server::options().env("BREAKGLASS_PRESETS_FILE", bad.display().to_string()));
    let log = refused.expect_err("a bad presets file stops the server");
    assert!(log.contains("BREAKGLASS_PRESETS_FILE"), "{log}");
}
