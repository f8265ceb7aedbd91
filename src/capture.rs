//! Reading a child's output without letting it grow memory without bound.

use tokio::io::{AsyncRead, AsyncReadExt};

/// Output kept from a stream, and how many bytes beyond the cap were dropped.
#[derive(Debug, Default)]
pub struct Captured {
    pub kept: Vec<u8>,
    pub dropped: usize,
}

impl Captured {
    /// Keeps what fits of `chunk` under `cap` bytes in all, counts the rest.
    pub fn keep(&mut self, chunk: &[u8], cap: usize) {
        let room = cap.saturating_sub(self.kept.len());
        let n = chunk.len().min(room);
        self.kept.extend_from_slice(&chunk[..n]);
        self.dropped += chunk.len() - n;
    }

    /// The kept bytes as text, with a note of what was dropped.
    pub fn into_text(self) -> String {
        let mut text = String::from_utf8_lossy(&self.kept).into_owned();
        if self.dropped > 0 {
            text.push_str(&format!("\n… [{} more bytes not shown]", self.dropped));
        }
        text
    }
}

/// Reads `reader` to its end (or first error), keeping the first `cap`
/// bytes. The rest is read and dropped, so a chatty child never blocks on a
/// full pipe.
pub async fn read_capped<R: AsyncRead + Unpin>(mut reader: R, cap: usize) -> Captured {
    let mut captured = Captured::default();
    let mut chunk = vec![0u8; 8192];
    loop {
        match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => return captured,
            Ok(n) => captured.keep(&chunk[..n], cap),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keeps_the_first_bytes_and_counts_the_rest() {
        let data = vec![b'x'; 20_000];
        let captured = read_capped(&data[..], 10_000).await;
        assert_eq!((captured.kept.len(), captured.dropped), (10_000, 10_000));
        assert!(captured.into_text().ends_with("\n… [10000 more bytes not shown]"));
        assert_eq!(read_capped(&b"short"[..], 10).await.into_text(), "short");
    }
}
