//! Live text (README, "API"): with `--include-partial-messages`, the agent's
//! text deltas reach attached clients as `event: delta` frames without an
//! id, before the `text` event that completes their message, and are never
//! logged nor replayed.

use serde_json::Value;

use crate::harness::{Attached, Frame, Server, kinds};

/// Frames up to and including `turn_end`, keepalives left out.
async fn frames_until_turn_end(stream: &mut Attached) -> Vec<Frame> {
    let mut frames = Vec::new();
    loop {
        let frame = stream.next().await.expect("stream ended before turn_end");
        let end = matches!(&frame, Frame::Event { data, .. } if data["kind"] == "turn_end");
        if frame != Frame::Keepalive {
            frames.push(frame);
        }
        if end {
            return frames;
        }
    }
}

fn deltas(frames: &[Frame]) -> Vec<&Value> {
    frames.iter().filter_map(|f| if let Frame::Delta(d) = f { Some(d) } else { None }).collect()
}

const WORDS: &str = "Disk is nearly full on devvm";

#[tokio::test]
async fn deltas_without_ids_come_before_the_text_that_completes_their_message() {
    let server = Server::start();
    let (session, mut stream) = server.attached().await;
    server.start_turn(&session, &format!("stream 0 {WORDS}\nresult")).await;
    let frames = frames_until_turn_end(&mut stream).await;

    let streamed = deltas(&frames);
    let pieces: Vec<&str> = streamed.iter().map(|d| d["text"].as_str().unwrap()).collect();
    assert_eq!(pieces, ["Disk ", "is ", "nearly ", "full ", "on ", "devvm"], "one delta per word, in order");
    let message_id = streamed[0]["message_id"].as_str().unwrap().to_owned();
    assert!(message_id.starts_with("msg_"), "{message_id}");
    for delta in &streamed {
        let keys: Vec<&str> = delta.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["index", "message_id", "text"], "exactly the contract's fields: {delta}");
        assert_eq!((delta["message_id"].as_str(), delta["index"].as_u64()), (Some(message_id.as_str()), Some(0)));
    }
    let text_at = frames
        .iter()
        .position(|f| matches!(f, Frame::Event { data, .. } if data["kind"] == "text"))
        .expect("a text event");
    let last_delta_at = frames.iter().rposition(|f| matches!(f, Frame::Delta(_))).unwrap();
    assert!(last_delta_at < text_at, "every delta before the text: {frames:#?}");
    let Frame::Event { data: text, .. } = &frames[text_at] else { unreachable!() };
    assert_eq!(text["text"], WORDS);
    assert_eq!(text["message_id"], message_id.as_str(), "the text names the message its deltas built");
    assert_eq!(text["index"], 0);
    // On the wire: a named event with one data line and no id line, so an
    // EventSource keeps its last event id across it.
    let raw = String::from_utf8_lossy(&stream.raw);
    let first =
        format!("\n\nevent: delta\ndata: {{\"index\":0,\"message_id\":\"{message_id}\",\"text\":\"Disk \"}}\n\n");
    assert!(raw.contains(&first), "{raw}");

    // A client attaching now is replayed the log: the text, no delta.
    let mut again = server.attach(&session, None).await;
    let mut replay = Vec::new();
    loop {
        match again.next().await.expect("stream ended before caught-up") {
            Frame::CaughtUp => break,
            frame => replay.push(frame),
        }
    }
    assert!(deltas(&replay).is_empty(), "no delta is replayed: {replay:#?}");
    let events: Vec<Value> =
        replay.into_iter().filter_map(|f| if let Frame::Event { data, .. } = f { Some(data) } else { None }).collect();
    assert_eq!(kinds(&events), ["user", "text", "result", "turn_end"]);
    assert_eq!(events[1]["message_id"], message_id.as_str());
    // Nor from Last-Event-ID.
    let mut resumed = server.attach(&session, Some("0")).await;
    assert_eq!(kinds(&resumed.until_caught_up().await), ["text", "result", "turn_end"]);
    assert!(!String::from_utf8_lossy(&resumed.raw).contains("event: delta"));
}

/// A client that attaches while a message is being written starts from the
/// deltas that follow, and sees none after the message's text.
#[tokio::test]
async fn a_client_attaching_mid_message_gets_the_following_deltas_then_the_text() {
    let server = Server::start();
    let (session, mut first) = server.attached().await;
    let words = "one two three four five six seven eight nine ten eleven twelve";
    server.start_turn(&session, &format!("stream 0.2 {words}\nresult")).await;
    loop {
        if let Frame::Delta(d) = first.next().await.unwrap()
            && d["text"] == "three "
        {
            break;
        }
    }
    let mut late = server.attach(&session, None).await;
    let frames = frames_until_turn_end(&mut late).await;
    let caught_up = frames.iter().position(|f| *f == Frame::CaughtUp).unwrap();
    let text_at = frames.iter().position(|f| matches!(f, Frame::Event { data, .. } if data["kind"] == "text")).unwrap();
    assert!(caught_up < text_at, "the message was still being written when it attached");
    let got: String = deltas(&frames).iter().map(|d| d["text"].as_str().unwrap()).collect();
    assert!(!got.is_empty() && words.ends_with(&got), "a tail of the message: {got:?}");
    assert!(!frames[text_at..].iter().any(|f| matches!(f, Frame::Delta(_))), "{frames:#?}");
}

#[tokio::test]
async fn the_agent_is_asked_for_partial_messages_unless_the_setting_is_off() {
    for (server, asked) in
        [(Server::start(), true), (Server::options().env("BREAKGLASS_PARTIAL_MESSAGES", "false").start(), false)]
    {
        let session = server.open_session().await;
        let events = server.run_turn(&session, &format!("stream 0 {WORDS}\nresult")).await;
        assert_eq!(events[1]["text"], WORDS);
        let argv: Vec<String> = serde_json::from_value(server.agent_runs()[0]["argv"].clone()).unwrap();
        let end_of_options = argv.iter().position(|a| a == "--").unwrap();
        assert_eq!(argv[..end_of_options].contains(&"--include-partial-messages".to_owned()), asked, "{argv:?}");
    }
}
