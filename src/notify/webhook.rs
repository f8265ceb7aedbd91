//! The webhook channel (README "Notifications"): one POST per note to
//! `BREAKGLASS_NOTIFY_URL`, in ntfy's format (<https://docs.ntfy.sh/publish/>)
//! or as JSON for any other receiver. The only code that knows either.
//!
//! The URL may carry a token (a path nobody guesses, `?auth=`, a user
//! part): it is never logged whole, only its origin.

use base64::Engine;
use futures_util::future::BoxFuture;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderValue};

use super::{Channel, ChannelName, Delivered, Note, origin};

/// The body's shape (`BREAKGLASS_NOTIFY_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// ntfy: the body is the message; `Title`, `Priority`, `Tags` and
    /// `Click` headers carry the rest.
    Ntfy,
    /// `{"title","body","priority","url","kind","session"}`.
    Json,
}

#[derive(Debug)]
pub struct Webhook {
    url: reqwest::Url,
    format: Format,
    public_url: Option<String>,
    client: super::HttpClient,
}

impl Webhook {
    pub fn new(url: reqwest::Url, format: Format, public_url: Option<String>, client: super::HttpClient) -> Self {
        Webhook { url, format, public_url, client }
    }

    /// The request for a note: its headers and body.
    pub fn request(&self, note: &Note) -> (HeaderMap, Vec<u8>) {
        let mut headers = HeaderMap::new();
        let link = note.link(self.public_url.as_deref());
        match self.format {
            Format::Ntfy => {
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
                headers.insert("Title", header_text(&note.title));
                headers.insert("Priority", HeaderValue::from_static(note.priority.as_str()));
                headers.insert("Tags", HeaderValue::from_static(tags(note)));
                if let Some(link) = link.as_deref().and_then(|l| HeaderValue::from_str(l).ok()) {
                    headers.insert("Click", link);
                }
                (headers, note.body.clone().into_bytes())
            }
            Format::Json => {
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                (headers, note.to_json(self.public_url.as_deref()).to_string().into_bytes())
            }
        }
    }

    async fn post(&self, note: &Note) -> Delivered {
        let (headers, body) = self.request(note);
        let failure = match self.client.get().await {
            Err(why) => Some(why),
            Ok(client) => match client.post(self.url.clone()).headers(headers).body(body).send().await {
                Ok(response) if response.status().is_success() => None,
                Ok(response) => Some(format!("answered {}", response.status())),
                // reqwest's errors name the URL; this one must not be logged.
                Err(err) => Some(err.without_url().to_string()),
            },
        };
        match failure {
            None => Delivered { sent: 1, failed: 0 },
            Some(why) => {
                tracing::warn!(to = %origin(&self.url), kind = note.kind.as_str(), %why, "webhook notification failed");
                Delivered { sent: 0, failed: 1 }
            }
        }
    }
}

impl Channel for Webhook {
    fn name(&self) -> ChannelName {
        ChannelName::Webhook
    }

    fn deliver<'a>(&'a self, note: &'a Note) -> BoxFuture<'a, Delivered> {
        Box::pin(self.post(note))
    }
}

/// ntfy tags: an emoji short code ntfy shows before the title, then the kind.
fn tags(note: &Note) -> &'static str {
    match note.kind {
        super::NoteKind::Approval => "raising_hand,approval",
        super::NoteKind::TurnEnded => "speech_balloon,turn_ended",
        super::NoteKind::Power => "zap,power",
    }
}

/// A header value for any text: control characters become spaces, and a
/// text that is not ASCII is sent as an RFC 2047 encoded word, which ntfy
/// decodes (<https://docs.ntfy.sh/publish/#message-title>).
fn header_text(text: &str) -> HeaderValue {
    let clean: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if clean.is_ascii()
        && let Ok(value) = HeaderValue::from_str(&clean)
    {
        return value;
    }
    let encoded = base64::engine::general_purpose::STANDARD.encode(clean.as_bytes());
    HeaderValue::from_str(&format!("=?UTF-8?B?{encoded}?=")).unwrap_or_else(|_| HeaderValue::from_static("breakglass"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::{BODY_CHARS, Priority};
    use uuid::Uuid;

    fn webhook(format: Format, public_url: Option<&str>) -> Webhook {
        Webhook::new(
            "https://ntfy.example/secret-topic".parse().unwrap(),
            format,
            public_url.map(str::to_owned),
            crate::notify::HttpClient::default(),
        )
    }

    #[test]
    fn ntfy_format_puts_the_message_in_the_body_and_the_rest_in_headers() {
        let session = Uuid::new_v4();
        let note = Note::turn_ended(session, Ok("devvm answers again"));
        let (headers, body) = webhook(Format::Ntfy, Some("https://console.example")).request(&note);
        assert_eq!(body, b"devvm answers again");
        assert_eq!(headers["Title"], "Turn ended");
        assert_eq!(headers["Priority"], "default");
        assert_eq!(headers["Tags"], "speech_balloon,turn_ended");
        assert_eq!(headers["Click"], format!("https://console.example/?session={session}"));
        assert_eq!(headers[CONTENT_TYPE], "text/plain; charset=utf-8");

        let (headers, _) = webhook(Format::Ntfy, None).request(&note);
        assert!(headers.get("Click").is_none(), "no link without a public URL");
    }

    #[test]
    fn a_title_that_is_not_ascii_is_an_encoded_word_and_control_characters_go() {
        // A line break in a header value is never sent as one: the note
        // names the CR, and the header drops what is left of the break.
        let note = Note::approval(Uuid::new_v4(), "Bash\r\nX-Injected: 1", "rm -rf /");
        let (headers, _) = webhook(Format::Ntfy, None).request(&note);
        let title = headers["Title"].to_str().unwrap();
        assert!(!title.contains('\r') && !title.contains('\n'), "{title}");
        let mut plain = Note::approval(Uuid::new_v4(), "Bash", "x");
        plain.title = "Approval needed: Bash\r\nX-Injected: 1".into();
        let (headers, _) = webhook(Format::Ntfy, None).request(&plain);
        assert_eq!(headers["Title"], "Approval needed: Bash  X-Injected: 1");
        assert_eq!(headers["Priority"], "urgent");
        let note = Note::approval(Uuid::new_v4(), "Bäsh", "x");
        let (headers, _) = webhook(Format::Ntfy, None).request(&note);
        let expected = format!(
            "=?UTF-8?B?{}?=",
            base64::engine::general_purpose::STANDARD.encode("Approval needed: Bäsh".as_bytes())
        );
        assert_eq!(headers["Title"], expected.as_str());
    }

    #[test]
    fn json_format_carries_every_field() {
        let note = Note::power(crate::power::Verb::Reset, "pve", "exit 0");
        let (headers, body) = webhook(Format::Json, Some("https://console.example/")).request(&note);
        assert_eq!(headers[CONTENT_TYPE], "application/json");
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"title": "Power verb reset: exit 0", "body": "reset on pve: exit 0",
                "priority": Priority::High.as_str(), "url": "https://console.example/", "kind": "power",
                "session": null})
        );
        let long = Note::turn_ended(Uuid::new_v4(), Ok(&"word ".repeat(100)));
        assert_eq!(long.body.chars().count(), BODY_CHARS);
    }
}
